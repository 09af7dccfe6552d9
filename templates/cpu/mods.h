// A mod set's kernels (FlexModKernels): score_mod / mask_mod over one tile of scores, called
// by the attention kernels once per visited KV block, and block classification for building a
// BlockMask from a mask_mod (no dense mask needed).
//
// Preceded in the TU by FLEXJIT_ENTRY, mod_abi.h, cpu/common.h, the generated mod body and
// cpu/mods_local.h.
// Nothing here depends on shapes, dtypes or block sizes, so one compile of a mod set serves
// every attention kernel; the attention kernels in turn are compiled once per shape, for all
// mod sets.

#if !defined(FLEXJIT_ENTRY)
#error "mods.h needs FLEXJIT_ENTRY defined before it"
#endif

// ---- split compilation (cpu/split.h) ----
// Part 1 is the prefill layout's apply (queries along the unit-stride dim), part 2 the decode
// layout's, block classification and the entry: a new mod's compile, which the first call of
// every new mod waits for, runs on two cores. With relative-position tables part 1 also holds
// the tables' fill (the score_mod's costly terms, compiled once for both layouts).
#define FLEXJIT_PARTS 2
#if FLEXJIT_PART != 0
#define fjk_apply_q_inner FJK_PASTE(FLEXJIT_ENTRY, _apply_q_inner)
#define fjk_fill_diags FJK_PASTE(FLEXJIT_ENTRY, _fill_diags)
#endif

// ---- apply: s = score_mod(s) * log2 e, then mask_mod on partial blocks ----
// kKeysInner: the tile's keys are contiguous (ld == 1, the decode layout), so the inner loop
// runs along kv_idx; otherwise along q_idx (ld_m == 1, the prefill layout). Either way the
// inner loop is the unit-stride one, which is what lets the mod body vectorise.
// One unit-stride run of scores. `row` is a restrict parameter so that, once inlined, its
// stores are known not to alias the captured tensors the mod gathers from (a local restrict
// pointer carries no such fact): without it a buffer read kept the loop scalar.
// With relative-position tables (jit/codegen.cpp DiagPlanner) score i of the run reads entry
// u0 + i of `tabs`; without them both are unused (and FjScoreDiags is only declared).
struct FjScoreDiags;
template <bool kMask, bool kKeysInner>
static inline void fjk_apply_run(float* __restrict row, int inner, fj_i64 b, fj_i64 h,
                                 fj_i64 q_first, fj_i64 kv_first,
                                 const struct FlexModArgs* mod,
                                 const struct FjScoreDiags* tabs, int u0) {
  // A predicated vector tail where masked stores are cheap (cpu/common.h FJK_RUN_LOOP): half the
  // code, so a new mod compiles ~25% sooner (rows are whole vectors but for the last tile).
  FJK_RUN_LOOP
  for (int i = 0; i < inner; ++i) {
    const fj_i64 q_idx = kKeysInner ? q_first : q_first + i;
    const fj_i64 kv_idx = kKeysInner ? kv_first + i : kv_first;
    float s = row[i];
#if FLEXJIT_SCORE_DIAGS > 0
    s = flexjit_score_mod_diags(s, b, h, q_idx, kv_idx, mod, tabs, u0 + i) * FJK_LOG2E;
#elif FLEXJIT_HAS_SCORE_MOD
    s = flexjit_score_mod(s, b, h, q_idx, kv_idx, mod) * FJK_LOG2E;
#endif
#if FLEXJIT_HAS_MASK_MOD
    if (kMask) s = flexjit_mask_mod(b, h, q_idx, kv_idx, mod) ? s : FJK_NEG_INF;
#endif
    row[i] = s;
    (void)q_idx; (void)kv_idx;
  }
  (void)b; (void)h; (void)mod; (void)tabs; (void)u0;
}

#if FLEXJIT_SCORE_DIAGS > 0

// Entries [0, ci + co - 1) of a chunk's tables (see below): part 1, shared by both layouts. The
// pair of entry u is blended from its inner and outer offsets with a 0/1 factor rather than a
// branch on the layout, so the loop is not unswitched into two copies of the mod's terms.
// `tabs` is restrict and the error flag a local of its own (raised once at the end), so the
// table stores provably touch neither the buffers the terms read nor the flag. The loop stays
// scalar on purpose: it runs rows + cols - 1 times per tile, and vectorised (a gather-heavy T5
// bucket on AVX2) it cost a new mod's compile 10-25 ms for ~5 ms of a 65 ms call (Zen 2).
FJK_SPLIT_LINKAGE __attribute__((noinline)) void fjk_fill_diags(struct FjScoreDiags* __restrict tabs, int ci,
                                                                int co, fj_i64 b, fj_i64 h, fj_i64 q_base,
                                                                fj_i64 kv_base, int keys_inner,
                                                                const struct FlexModArgs* mod)
#if FLEXJIT_PART == 2
    ;
#else
{
  int bad = 0;
  struct FlexModArgs local = *mod;
  local.error_flag = &bad;
  const int k = keys_inner ? 1 : 0;
  FJK_SCALAR_LOOP
  for (int u = 0; u < ci + co - 1; ++u) {
    const int r = u - (co - 1);
    const int i = r > 0 ? r : 0, o = r > 0 ? 0 : -r;  // inner and outer offsets
    flexjit_score_diags_fill(tabs, u, b, h, q_base + (i + k * (o - i)), kv_base + (o + k * (i - o)), &local);
  }
  if (bad) *mod->error_flag = 1;
}
#endif

// The tile in chunks of at most FLEXJIT_DIAG_CHUNK x FLEXJIT_DIAG_CHUNK. Entry u of a chunk's
// tables holds the terms at inner offset - outer offset = u - (co - 1); it is computed at the
// chunk's pair (i, o) = (0, co - 1 - u) for u < co - 1, else (u - (co - 1), 0), which has that
// difference. Every difference a co x ci chunk holds is in [-(co - 1), ci - 1], and each occurs
// in it.
template <bool kMask, bool kKeysInner>
static inline void fjk_apply_tile_diags(const struct FlexModTile* t, fj_i64 b, fj_i64 h,
                                        const struct FlexModArgs* mod) {
  struct FjScoreDiags tabs;
  const int outer = kKeysInner ? t->mvalid : t->nvalid;
  const int inner = kKeysInner ? t->nvalid : t->mvalid;
  const fj_i64 ld_outer = kKeysInner ? t->ld_m : t->ld;
  FJK_ROLLED_LOOP
  for (int o0 = 0; o0 < outer; o0 += FLEXJIT_DIAG_CHUNK) {
    const int co = outer - o0 < FLEXJIT_DIAG_CHUNK ? outer - o0 : FLEXJIT_DIAG_CHUNK;
    FJK_ROLLED_LOOP
    for (int i0 = 0; i0 < inner; i0 += FLEXJIT_DIAG_CHUNK) {
      const int ci = inner - i0 < FLEXJIT_DIAG_CHUNK ? inner - i0 : FLEXJIT_DIAG_CHUNK;
      const fj_i64 q_base = t->q0 + (kKeysInner ? o0 : i0), kv_base = t->kv0 + (kKeysInner ? i0 : o0);
      fjk_fill_diags(&tabs, ci, co, b, h, q_base, kv_base, kKeysInner ? 1 : 0, mod);
      FJK_ROLLED_LOOP
      for (int o = 0; o < co; ++o)
        fjk_apply_run<kMask, kKeysInner>(t->s + (o0 + o) * ld_outer + i0, ci, b, h,
                                         kKeysInner ? q_base + o : q_base,
                                         kKeysInner ? kv_base : kv_base + o, mod, &tabs, co - 1 - o);
    }
  }
}
#endif

template <bool kMask, bool kKeysInner>
static void fjk_apply_tile(const struct FlexModTile* t, const struct FlexModArgs* shared) {
  int bad;  // cpu/mods_local.h
  struct FlexBuffer bufs[FJK_LOCAL_BUFFERS];
  float params[FJK_LOCAL_PARAMS];
  struct FlexModArgs local = fjk_local_mod(shared, &bad, bufs, params);
  const fj_i64 b = t->b, h = t->h;
#if FLEXJIT_SCORE_DIAGS > 0
  fjk_apply_tile_diags<kMask, kKeysInner>(t, b, h, &local);
#else
  const fj_i64 q0 = t->q0, kv0 = t->kv0;
  const int outer = kKeysInner ? t->mvalid : t->nvalid;
  const int inner = kKeysInner ? t->nvalid : t->mvalid;
  const fj_i64 ld_outer = kKeysInner ? t->ld_m : t->ld;
  FJK_ROLLED_LOOP
  for (int o = 0; o < outer; ++o)
    fjk_apply_run<kMask, kKeysInner>(t->s + o * ld_outer, inner, b, h,
                                     kKeysInner ? q0 + o : q0, kKeysInner ? kv0 : kv0 + o,
                                     &local, nullptr, 0);
#endif
  fjk_local_mod_end(bad, shared);
}

// The prefill layout (ld_m == 1): part 1.
FJK_SPLIT_LINKAGE __attribute__((noinline)) void fjk_apply_q_inner(const struct FlexModTile* t,
                                                                   const struct FlexModArgs* mod)
#if FLEXJIT_PART == 2
    ;
#else
{
  // `if constexpr`: a variant that cannot run (a mask pass without a mask_mod, a score pass
  // without a score_mod) is never instantiated, so a new mod compiles only the loops it uses.
  if constexpr (FLEXJIT_HAS_MASK_MOD) {
    if (t->mask) return fjk_apply_tile<true, false>(t, mod);
  }
  if constexpr (FLEXJIT_HAS_SCORE_MOD) fjk_apply_tile<false, false>(t, mod);
}
#endif

#if FLEXJIT_PART != 1  // the rest: part 2 (or the whole kernel)
static void fjk_apply(const struct FlexModTile* t, const struct FlexModArgs* mod) {
  const bool keys_inner = t->ld == 1 && t->ld_m != 1;
  if (!keys_inner) return fjk_apply_q_inner(t, mod);
  if constexpr (FLEXJIT_HAS_MASK_MOD) {  // as in fjk_apply_q_inner: only the variants that can run
    if (t->mask) return fjk_apply_tile<true, true>(t, mod);
  }
  if constexpr (FLEXJIT_HAS_SCORE_MOD) fjk_apply_tile<false, true>(t, mod);
}

// ---- classify ----
// 0 / 1 / 2 for one block. Rows are counted in full (a branch-free, vectorisable loop over
// kv_idx); the scan stops after the first row at which both a kept and a masked element
// have been seen, since the block is then partial whatever the rest holds.
static inline signed char fjk_classify_block(const struct FlexClassifyArgs* a, fj_i64 i, fj_i64 b,
                                             fj_i64 h, fj_i64 qb, fj_i64 kb) {
  fj_i64 q0 = qb * a->q_block_size, kv0 = kb * a->kv_block_size;
  fj_i64 q1 = q0 + a->q_block_size < a->Lq ? q0 + a->q_block_size : a->Lq;
  fj_i64 kv1 = kv0 + a->kv_block_size < a->Lkv ? kv0 + a->kv_block_size : a->Lkv;
  if (a->ranges != nullptr) {
    q0 = a->ranges[4 * i];
    q1 = a->ranges[4 * i + 1];
    kv0 = a->ranges[4 * i + 2];
    kv1 = a->ranges[4 * i + 3];
  }
  if (q0 >= q1 || kv0 >= kv1) return 0;  // clipped block is empty
#if FLEXJIT_HAS_MASK_MOD
  int bad = 0;  // as in fjk_apply_tile: a local error flag, raised once per block
  struct FlexModArgs local = a->mod;
  local.error_flag = &bad;
  const struct FlexModArgs* mod = &local;
  const fj_i64 width = kv1 - kv0;
  bool any_kept = false, any_masked = false;
  for (fj_i64 q = q0; q < q1; ++q) {
    fj_i64 kept = 0;
    for (fj_i64 kv = kv0; kv < kv1; ++kv) kept += flexjit_mask_mod(b, h, q, kv, mod) ? 1 : 0;
    any_kept |= kept > 0;
    any_masked |= kept < width;
    if (any_kept && any_masked) break;
  }
  if (bad) __atomic_store_n(a->mod.error_flag, 1, __ATOMIC_RELAXED);
  if (any_kept && any_masked) return 1;
  return any_kept ? 2 : 0;
#else
  (void)b; (void)h;
  return 2;  // no mask_mod: every element is kept
#endif
}

static void fjk_classify(const struct FlexClassifyArgs* a, fj_i64 begin, fj_i64 end) {
  for (fj_i64 i = begin; i < end; ++i) {
    const int* blk = a->blocks + 4 * i;
    a->out[i] = fjk_classify_block(a, i, blk[0], blk[1], blk[2], blk[3]);
  }
}

extern "C" void FLEXJIT_ENTRY(struct FlexModKernels* out) {
  out->apply = fjk_apply;
  out->classify = fjk_classify;
  out->has_score_mod = FLEXJIT_HAS_SCORE_MOD;
  out->has_mask_mod = FLEXJIT_HAS_MASK_MOD;
}
#endif  // FLEXJIT_PART != 1

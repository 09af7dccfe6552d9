// CPU forward (prefill) flash attention with FlexAttention score_mod / mask_mod: the driver.
//
// Preceded in the TU by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
// GQA_GROUP, FLEXJIT_ENTRY), mod_abi.h, cpu/common.h, cpu/prefill_item.h and one engine:
// cpu/prefill_fma.h (AVX-512 FMAs, every dtype) or cpu/prefill_amx.h (bf16 on AMX tiles). The
// engine owns the tile scratch (struct FjkTile), the packing and the two matmuls; this file owns
// what both share: the walk over KV blocks, the mods, the online softmax and the epilogue. No
// mod code is compiled in: the mods are a separately compiled FlexApplyModsFn
// (templates/cpu/mods.h) called once per KV block, so this kernel is compiled once per shape
// and serves every mod set.
//
// One work item = BLOCK_M query rows of one (b, hq). For each visited KV block of BLOCK_N
// columns:
//   S   = Q K^T                 (fp32; times c * log2(e) so the softmax can use exp2)
//   S   = score_mod(S), mask     (-inf where masked or kv_idx >= Lkv)
//   m'  = max(m, rowmax S)                      running row max (base 2)
//   P   = 2^(S - m'),  alpha = 2^(m - m')
//   l   = l * alpha + rowsum P                  running row sum
//   O   = O * alpha + P V                       unnormalised output
// and at the end out = O / l, lse = ln 2 * (m + log2 l).
//
// The scores and the softmax state use the S^T [n][m] layout (query rows along the 16 vector
// lanes, FlexModTile's layout): every engine's FjkTile has st (S^T, row stride kMP) and the
// per-row m, l and valid vectors. The engine interface, defined before this file:
//   kFjkScoresScaled         true: fjk_block_scores returns S * qscale; false: raw q.k
//   fjk_engine_begin/end     once per entry call (padding, AMX tile configuration)
//   fjk_item_begin           once per work item (pack Q, O = 0)
//   fjk_block_scores         S^T rows [0, nvalid) of one KV block
//   fjk_block_pv             O = O * alpha + P V, P^T in st rows [0, nvalid)
//   fjk_item_write_out       out = O * inv_l

// ---- split compilation (cpu/split.h) ----
// Part 1 is fjk_visit_block (the per-block work: Q K^T, mods call, softmax, P V), part 2
// everything around it (the walk, the work item, the entry).
#define FLEXJIT_PARTS 2
#if FLEXJIT_PART != 0
#define fjk_visit_block FJK_PASTE(FLEXJIT_ENTRY, _visit_block)
#endif

// ---- score_mod and mask_mod on S^T[n][m] (valid rows and columns only) ----
// The mods are only ever called with q_idx < Lq and kv_idx < Lkv (a mod may index a captured
// buffer by them). With a score_mod Q^T is scaled by `scale` only and apply_mods returns
// score_mod(s) * log2(e); without one Q^T already carries scale * log2(e).
static inline void fjk_apply_mods(float* st, const struct FlexPrefillArgs* a,
                                  const struct FjkItem* it, fj_i64 kv0, int nvalid,
                                  bool partial) {
  const bool mask = partial && a->has_mask_mod;
  if (a->apply_mods == nullptr || !(mask || a->has_score_mod)) return;
  struct FlexModTile tile;
  tile.ld = kMP;
  tile.ld_m = 1;
  tile.b = it->b;
  tile.kv0 = kv0;
  tile.nvalid = nvalid;
  tile.mask = mask ? 1 : 0;
  // One call per run of rows of one head (the whole tile unless GQA heads are packed).
  for (int m = 0; m < it->mvalid;) {
    const fj_i64 q = fjk_row_q(it, m);
    const fj_i64 left = it->packed_lq ? it->packed_lq - q : it->mvalid;
    const int run = left < it->mvalid - m ? (int)left : it->mvalid - m;
    tile.s = st + m;
    tile.h = fjk_row_head(it, m);
    tile.q0 = q;
    tile.mvalid = run;
    a->apply_mods(&tile, &a->mod);
    m += run;
  }
}

// ---- one KV block of BLOCK_N columns starting at kv0 ----
// partial: evaluate mask_mod per element (full blocks skip it). Columns >= Lkv are never
// scored: the softmax and P V loops stop at nvalid. next_kv0: the block visited next (-1:
// none), which the FMA engine prefetches meanwhile. Not inlined: its two call sites would
// double the compile time.
FJK_SPLIT_LINKAGE __attribute__((noinline)) void fjk_visit_block(const struct FlexPrefillArgs* a,
                                                                 const struct FjkItem* it,
                                                                 struct FjkTile* t, fj_i64 kv0,
                                                                 bool partial, fj_i64 next_kv0)
#if FLEXJIT_PART == 2
    ;
#else
{
  const fj_i64 left = it->lkv - kv0;
  if (left <= 0) return;
  const int nvalid = left < BLOCK_N ? (int)left : BLOCK_N;

  fjk_block_scores(a, it, t, kv0, nvalid, next_kv0);
  // Engines with kFjkScoresScaled == false return raw q.k. The softmax folds a positive qscale
  // into its exp2 argument for free; the mods need scaled scores, and a zero or negative qscale
  // cannot be folded into the row max, so those scale S^T in place first (cpu/common.h).
  float c = 1.0f;  // what the softmax still multiplies the scores by
  if (!kFjkScoresScaled) {
    if ((a->apply_mods != nullptr && a->has_score_mod) || !(it->qscale > 0.0f))
      fjk_scale_st<kMV, kMP>(t->st, nvalid, it->qscale);
    else
      c = it->qscale;
  }
  fjk_apply_mods(t->st, a, it, kv0, nvalid, partial);

  fj_v16f alpha[kMV];
  if (!fjk_softmax_st<kMV, kMP>(t->st, nvalid, c, t->m, t->l, t->valid, alpha)) return;  // cpu/common.h
  fjk_block_pv(a, it, t, alpha, kv0, nvalid, next_kv0);
}
#endif  // FLEXJIT_PART != 2

#if FLEXJIT_PART != 1  // the rest of the kernel: part 2 (or the whole kernel)

// The walk over visited blocks runs one block ahead of the computation, so each visit knows
// which block comes next and can prefetch it.
struct FjkWalk {
  fj_i64 kv0;    // pending block
  bool partial;  // pending block evaluates mask_mod
  bool pending;
};
static inline void fjk_walk_to(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                               struct FjkTile* t, struct FjkWalk* w, fj_i64 kv0, bool partial) {
  if (w->pending) fjk_visit_block(a, it, t, w->kv0, w->partial, kv0);
  w->kv0 = kv0;
  w->partial = partial;
  w->pending = true;
}

// Walks the blocks listed for this tile's mask q-block: `count` mask KV blocks from `idx`,
// each split into mask.kv_block_size / BLOCK_N sub-blocks; those past Lkv are skipped.
// (Not inlined into its two call sites: compile time.)
__attribute__((noinline)) static void fjk_walk_listed(const struct FlexPrefillArgs* a,
                                                      const struct FjkItem* it,
                                                      struct FjkTile* t, struct FjkWalk* w,
                                                      const int* idx, int count, bool partial) {
  const fj_i64 sub = a->mask.kv_block_size / BLOCK_N;
  for (int j = 0; j < count; ++j) {
    const fj_i64 base = (fj_i64)idx[j] * a->mask.kv_block_size;
    for (fj_i64 s = 0; s < sub && base + s * BLOCK_N < it->lkv; ++s)
      fjk_walk_to(a, it, t, w, base + s * BLOCK_N, partial);
  }
}

// ---- varlen: the KV blocks of a tile's band ----
// Rows [q0, q0 + mvalid) of a sequence with lq queries and it->lkv keys see keys in the band of
// FlexPrefillArgs.window_left / window_right (bottom-right aligned). Visits the BLOCK_N blocks
// that meet the union of the rows' bands, each partial where the band cuts it (or always, with
// a user mask_mod); rows whose band is empty see nothing and end with out 0, lse -inf.
__attribute__((noinline)) static void fjk_walk_band(const struct FlexPrefillArgs* a,
                                                    const struct FjkItem* it, struct FjkTile* t,
                                                    struct FjkWalk* w, fj_i64 lq) {
  const fj_i64 off = it->lkv - lq;                    // row i's diagonal is key i + off
  const fj_i64 first = it->q0 + off, last = it->q0 + it->mvalid - 1 + off;
  const fj_i64 wl = a->window_left, wr = a->window_right;
  fj_i64 lo = wl >= 0 ? first - wl : 0;               // keys [lo, hi) meet some row's band
  fj_i64 hi = wr >= 0 ? last + wr + 1 : it->lkv;
  if (lo < 0) lo = 0;
  if (hi > it->lkv) hi = it->lkv;
  for (fj_i64 kv0 = lo / BLOCK_N * BLOCK_N; kv0 < hi; kv0 += BLOCK_N) {
    const fj_i64 kv_last = (kv0 + BLOCK_N < it->lkv ? kv0 + BLOCK_N : it->lkv) - 1;
    // The band holds the whole block for every row iff the last row's lower edge and the first
    // row's upper edge leave it inside.
    const bool cut = (wl >= 0 && kv0 < last - wl) || (wr >= 0 && kv_last > first + wr);
    fjk_walk_to(a, it, t, w, kv0, cut || a->varlen_mask_all != 0);
  }
}

// ---- one work item (b, hq, m_block) ----
// Not inlined into the item loop: there its branches on launch constants (lse wanted, block
// mask present) would be unswitched, duplicating the whole body (compile time).
// h: the query head, or with pack_gqa the KV head. Varlen: b is the sequence.
__attribute__((noinline)) static void fjk_run_item(const struct FlexPrefillArgs* a,
                                                   struct FjkTile* t, fj_i64 b, fj_i64 h,
                                                   fj_i64 m_block) {
  struct FjkItem it;
  const bool varlen = a->cu_seqlens_q != nullptr;
  it.b = b;
  it.bt = varlen ? 0 : b;
  it.qoff = varlen ? a->cu_seqlens_q[b] : 0;
  const fj_i64 lq = varlen ? a->cu_seqlens_q[b + 1] - it.qoff : a->Lq;
  const fj_i64 kvoff = varlen ? a->cu_seqlens_k[b] : 0;
  it.lkv = varlen ? a->cu_seqlens_k[b + 1] - kvoff : a->Lkv;
  it.packed_lq = a->pack_gqa ? lq : 0;
  it.hq = a->pack_gqa ? h * GQA_GROUP : h;
  it.q0 = m_block * BLOCK_M;
  const fj_i64 rows = (a->pack_gqa ? GQA_GROUP * lq : lq) - it.q0;
  it.mvalid = rows < BLOCK_M ? (int)rows : BLOCK_M;
  const fj_i64 hkv = a->pack_gqa ? h : h / GQA_GROUP;
  const fj_i64 bk = a->Bkv == 1 || varlen ? 0 : b;
  it.k = (const fjk_elem*)a->k + bk * a->k_strides[0] + hkv * a->k_strides[1] + kvoff * a->k_strides[2];
  it.v = (const fjk_elem*)a->v + bk * a->v_strides[0] + hkv * a->v_strides[1] + kvoff * a->v_strides[2];

  // Scores are scaled by `scale` (and log2 e when no score_mod sees the natural-scale score).
  const bool score_mod = a->apply_mods != nullptr && a->has_score_mod;
  it.qscale = score_mod ? a->scale : a->scale * FJK_LOG2E;
  fjk_item_begin(a, &it, t);
  for (int i = 0; i < kMV; ++i) {
    t->m[i] = fjk_splat(FJK_NEG_INF);
    t->l[i] = fjk_splat(0.0f);
    t->valid[i] = fjk_iota() + (float)(16 * i) < (float)it.mvalid;
  }

  struct FjkWalk walk = {0, false, false};
  if (varlen) {
    fjk_walk_band(a, &it, t, &walk, lq);
  } else if (a->mask.kv_num_blocks == nullptr) {  // no block mask: every block, partial if masked
    for (fj_i64 kv0 = 0; kv0 < a->Lkv; kv0 += BLOCK_N)
      fjk_walk_to(a, &it, t, &walk, kv0, a->has_mask_mod != 0);
  } else {
    // BLOCK_M divides mask.q_block_size, so the tile lies in one mask q-block. Packed tiles
    // need mask.H == 1 and Lq <= mask.q_block_size (the runtime checks): q-block 0, any head.
    const fj_i64 mb = a->mask.B == 1 ? 0 : b, mh = a->mask.H == 1 ? 0 : it.hq;
    const fj_i64 qb = a->pack_gqa ? 0 : it.q0 / a->mask.q_block_size;
    const fj_i64 row = (mb * a->mask.H + mh) * a->mask.q_blocks + qb;
    fjk_walk_listed(a, &it, t, &walk, a->mask.kv_indices + row * a->mask.kv_indices_stride,
                    a->mask.kv_num_blocks[row], true);
    if (a->mask.full_kv_num_blocks != nullptr)
      fjk_walk_listed(a, &it, t, &walk, a->mask.full_kv_indices + row * a->mask.full_kv_indices_stride,
                      a->mask.full_kv_num_blocks[row], false);
  }
  if (walk.pending) fjk_visit_block(a, &it, t, walk.kv0, walk.partial, -1);

  // out = O / l. A fully masked row (l = 0: no finite score, or no block visited) writes 0
  // and lse = -inf instead of 0/0 = NaN.
  alignas(64) float inv_l[kMP], l[kMP], m2[kMP];
  for (int i = 0; i < kMV; ++i) {
    fjk_store(inv_l + 16 * i, t->l[i] > 0.0f ? 1.0f / t->l[i] : fjk_splat(0.0f));
    fjk_store(l + 16 * i, t->l[i]);
    fjk_store(m2 + 16 * i, t->m[i]);
  }
  fjk_item_write_out(a, &it, t, inv_l);
  if (a->lse != nullptr) {
    FJK_SCALAR_LOOP
    for (int m = 0; m < it.mvalid; ++m) {
      // lse = ln(sum_n e^s) = ln 2 * (m2 + log2 l), m2 the base-2 row max; l = 0 -> -inf.
      a->lse[it.bt * a->lse_strides[0] + fjk_row_head(&it, m) * a->lse_strides[1] +
             (it.qoff + fjk_row_q(&it, m)) * a->lse_strides[2]] =
          l[m] > 0.0f ? (float)(FJK_LN2 * ((double)m2[m] + fjk_log2(l[m]))) : FJK_NEG_INF;
    }
  }
}

extern "C" void FLEXJIT_ENTRY(const struct FlexPrefillArgs* a, fj_i64 begin, fj_i64 end) {
  struct FjkTile t;
  fjk_engine_begin(&t);
  if (a->varlen_items != nullptr) {
    for (fj_i64 item = begin; item < end; ++item) {
      const int* e = a->varlen_items + 2 * (item / a->Hq);
      fjk_run_item(a, &t, e[0], item % a->Hq, e[1]);
    }
    fjk_engine_end(&t);
    return;
  }
  const fj_i64 rows = a->pack_gqa ? GQA_GROUP * a->Lq : a->Lq;
  const fj_i64 heads = a->pack_gqa ? a->Hkv : a->Hq;
  const fj_i64 n_m_blocks = (rows + BLOCK_M - 1) / BLOCK_M;
  if (n_m_blocks > 0 && heads > 0) {  // else no work items exist
    for (fj_i64 item = begin; item < end; ++item) {
      const fj_i64 m_block = item % n_m_blocks, bh = item / n_m_blocks;
      fjk_run_item(a, &t, bh / heads, bh % heads, m_block);
    }
  }
  fjk_engine_end(&t);
}
#endif  // FLEXJIT_PART != 1

// CPU forward (prefill) flash attention with FlexAttention score_mod / mask_mod.
//
// Preceded in the TU by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
// GQA_GROUP, FLEXJIT_ENTRY), mod_abi.h and cpu/common.h. No mod code is compiled in: the mods
// are a separately compiled FlexApplyModsFn (templates/cpu/mods.h) called once per KV block,
// so this kernel is compiled once per shape and serves every mod set.
//
// One work item = BLOCK_M query rows of one (b, hq). For each visited KV block of BLOCK_N
// columns:
//   S   = Q K^T                 (fp32; log2(e)-scaled so the softmax can use exp2)
//   S   = score_mod(S), mask     (-inf where masked or kv_idx >= Lkv)
//   m'  = max(m, rowmax S)                      running row max (base 2)
//   P   = 2^(S - m'),  alpha = 2^(m - m')
//   l   = l * alpha + rowsum P                  running row sum
//   O   = O * alpha + P V                       unnormalised output
// and at the end out = O / l, lse = ln 2 * (m + log2 l).
//
// Layout: everything is kept TRANSPOSED, query rows along the 16 vector lanes. Q^T [d][m],
// S^T/P^T [n][m] and O^T [dv][m] are rows of BLOCK_M floats, so the per-row softmax state
// (m, l, alpha) is a few vectors and row max / row sum are plain elementwise max / add with
// no horizontal reductions. Both matmuls are register-blocked outer products: a vector of
// 16 query rows times a broadcast K (or V) element. K and V are read as broadcasts, so they
// are packed per block only to convert the dtype and gather the strides into fp32 rows
// (no transposes), and HEAD_DIM needs no vector tail. The next block's K and V are
// prefetched while the current one is computed.

#if !defined(FLEXJIT_DTYPE) || !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || \
    !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY)
#error "flash_prefill.h needs the spec macros defined before it"
#endif

#if FLEXJIT_DTYPE == 0
typedef float fjk_elem;
#elif FLEXJIT_DTYPE == 1
typedef unsigned short fjk_elem;  // bf16 bits
#elif FLEXJIT_DTYPE == 2
typedef _Float16 fjk_elem;
#else
#error "FLEXJIT_DTYPE must be 0 (fp32), 1 (bf16) or 2 (fp16)"
#endif

// ---- tile geometry (all compile time) ----
static constexpr int kMP = (BLOCK_M + 15) / 16 * 16;  // query rows padded to whole vectors
static constexpr int kMV = kMP / 16;                  // vectors per transposed row

// Register blocking. The query vectors are taken kMVC at a time (a chunk: up to 4 vectors,
// 64 rows); the Q K^T kernel keeps kMVC x kNG accumulators (kNG KV rows), the P V kernel
// kMVC x kDG (kDG output features): ~20-24 of the 32 zmm registers, leaving room for the
// kMVC operand vectors. Per step each issues kMVC vector loads and kNG (kDG) broadcasts for
// kMVC * kNG FMAs. The group size is picked near the register limit so that it (nearly)
// divides the width it tiles; the width is then padded to whole groups (zero rows/columns
// computed and ignored, at most a few percent) so no tail kernel is instantiated, which
// would cost compile time.
static constexpr int kMVC = kMV <= 4 ? kMV
                           : kMV % 4 == 0 ? 4
                           : kMV % 3 == 0 ? 3
                           : kMV % 2 == 0 ? 2 : 1;
static constexpr int kMaxGroup = 24 / kMVC;
static constexpr int fjk_round_up(int x, int g) { return (x + g - 1) / g * g; }
static constexpr int fjk_pick_group(int width) {
  int best = kMaxGroup;
  for (int g = kMaxGroup; g >= 1 && 4 * g >= 3 * kMaxGroup; --g)
    if (fjk_round_up(width, g) < fjk_round_up(width, best)) best = g;
  return best;
}
static constexpr int kNG = fjk_pick_group(BLOCK_N);
static constexpr int kNP = fjk_round_up(BLOCK_N, kNG);      // KV rows computed per block
static constexpr int kDG = fjk_pick_group(HEAD_DIM_V);
static constexpr int kDVP = fjk_round_up(HEAD_DIM_V, kDG);  // output features computed

// Row strides of the packed K and V blocks in floats: whole vectors (aligned 16-lane stores
// when packing), plus one cache line when that is a multiple of 64 floats (D = 64, 128, 256),
// which would otherwise put a column's rows into a few L1 sets.
static constexpr int fjk_row_stride(int width) {
  return fjk_round_up(width, 16) + (fjk_round_up(width, 16) % 64 == 0 ? 16 : 0);
}
static constexpr int kKS = fjk_row_stride(HEAD_DIM);
static constexpr int kVS = fjk_row_stride(kDVP);

static_assert(HEAD_DIM >= 1 && HEAD_DIM_V >= 1 && BLOCK_M >= 1 && BLOCK_N >= 1, "bad spec");
static_assert(GQA_GROUP >= 1, "bad GQA_GROUP");

// Per-thread scratch, on the stack of the entry (no heap, no statics).
struct FjkTile {
  alignas(64) float qt[HEAD_DIM * kMP];  // Q^T [d][m], pre-scaled; rows m >= Lq are 0
  alignas(64) float st[kNP * kMP];       // S^T then P^T [n][m]
  alignas(64) float ot[kDVP * kMP];      // O^T [dv][m], unnormalised
  alignas(64) float kp[kNP * kKS];       // K block in fp32 [n][d]; rows >= BLOCK_N stay 0
  alignas(64) float vp[BLOCK_N * kVS];   // V block in fp32 [n][dv]; columns >= Dv stay 0
  fj_v16f m[kMV];      // running row max of the base-2 scores (-inf: nothing seen yet)
  fj_v16f l[kMV];      // running row sum of 2^(s - m)
  fj_v16i valid[kMV];  // lane is a real query row (q_idx < Lq)
};
static_assert(sizeof(struct FjkTile) <= (1 << 20), "tile scratch exceeds 1 MiB of stack");

// One work item's coordinates and base pointers. Without pack_gqa the tile's rows are query
// rows q0.. of head hq. With pack_gqa (decode: a few query rows, GQA) they are the GQA_GROUP * Lq
// (head, query) pairs of one KV head, so K and V are streamed once per group, not once per
// query head: row r of the pairs is head hq + r / Lq, query r % Lq, and the tile holds pairs
// q0.. (hq is then the group's first head).
struct FjkItem {
  fj_i64 b, hq, q0;  // batch, query head (first of the group if packed), first row
  fj_i64 packed_lq;  // 0: not packed; else Lq
  int mvalid;        // rows of this tile that exist
  const fjk_elem* k; // k[bk, hkv, 0, 0]
  const fjk_elem* v; // v[bk, hkv, 0, 0]
};
static inline fj_i64 fjk_row_head(const struct FjkItem* it, int m) {
  return it->packed_lq ? it->hq + (it->q0 + m) / it->packed_lq : it->hq;
}
static inline fj_i64 fjk_row_q(const struct FjkItem* it, int m) {
  return it->packed_lq ? (it->q0 + m) % it->packed_lq : it->q0 + m;
}

// ---- prefetching the next block ----
// K and V stream from L3 (a head's K and V outgrow L2 at a few thousand rows) once per work
// item, and a plain pack loop would wait on every line. While one block is computed, each
// micro-kernel call prefetches (into L2) a share of the next block's rows, one cache line per
// inner step: K during Q K^T, V during P V. The next pack then reads from L2.
struct FjkPrefetch {
  const char* base;  // first row of the next block
  fj_i64 stride;     // row stride in bytes
  int rows;          // rows to prefetch (0: none)
};
static inline struct FjkPrefetch fjk_prefetch_plan(const fjk_elem* rows, fj_i64 s_row,
                                                   fj_i64 s_col, fj_i64 first, fj_i64 Lkv) {
  struct FjkPrefetch pf = {nullptr, 0, 0};
  if (first < 0 || first >= Lkv || s_col != 1) return pf;  // no next block / not row-contiguous
  pf.base = (const char*)(rows + first * s_row);
  pf.stride = s_row * (fj_i64)sizeof(fjk_elem);
  pf.rows = Lkv - first < BLOCK_N ? (int)(Lkv - first) : BLOCK_N;
  return pf;
}
// The share of one micro-kernel call: rows [r0, r0 + n) of the plan, kWidth elements each,
// one line per step i < lines.
template <int kWidth>
struct FjkPrefetchShare {
  static constexpr int kLinesPerRow = (kWidth * (int)sizeof(fjk_elem) + 63) / 64;
  const char* base;
  fj_i64 stride;
  int lines;
  FjkPrefetchShare(const struct FjkPrefetch* pf, int r0, int n)
      : base(pf->base), stride(pf->stride) {
    const int rows = pf->rows - r0 < n ? pf->rows - r0 : n;
    lines = rows > 0 ? rows * kLinesPerRow : 0;
    base += r0 * stride;
  }
  void step(int i) const {
    if (i < lines)
      __builtin_prefetch(base + (i / kLinesPerRow) * stride + (i % kLinesPerRow) * 64, 0, 2);
  }
};

// ---- packing ----

// Q^T[d][m] = q[row m][d] * c for the valid rows, 0 for the padding rows (which then score
// a finite 0 and are never written out). Once per work item, so a plain scalar transpose.
static inline void fjk_pack_q(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                              float c, float* __restrict qt) {
  const int mvalid = it->mvalid;
  const fj_i64 s_col = a->q_strides[3];
  if (mvalid < kMP) __builtin_memset(qt, 0, sizeof(float) * HEAD_DIM * kMP);
  FJK_SCALAR_LOOP
  for (int m = 0; m < mvalid; ++m) {
    const fjk_elem* row = (const fjk_elem*)a->q + it->b * a->q_strides[0] +
                          fjk_row_head(it, m) * a->q_strides[1] + fjk_row_q(it, m) * a->q_strides[2];
    FJK_SCALAR_LOOP
    for (int d = 0; d < HEAD_DIM; ++d) qt[d * kMP + m] = fjk_to_f32(row[d * s_col]) * c;
  }
}

// dst[r][c] = fp32(src[r * s_row + c * s_col]) for r < rows, c < width, row stride
// dst_stride; rows up to BLOCK_N are zeroed so the register-blocked kernels may read a whole
// group past the end of Lkv. One out-of-line copy serves K and V (compile time); it is
// bound by memory, not by loop overhead.
__attribute__((noinline)) static void fjk_pack_rows(const fjk_elem* src, fj_i64 s_row,
                                                    fj_i64 s_col, int rows, int width,
                                                    int dst_stride, float* __restrict dst) {
  const int vec_width = width / 16 * 16;
  if (s_col == 1) {  // the usual case: contiguous feature dim, 16-lane convert-copy
    FJK_ROLLED_LOOP
    for (int r = 0; r < rows; ++r) {
      const fjk_elem* s = src + r * s_row;
      float* d = dst + r * dst_stride;
      FJK_ROLLED_LOOP
      for (int c = 0; c < vec_width; c += 16) fjk_store(d + c, fjk_load16(s + c));
      FJK_SCALAR_LOOP
      for (int c = vec_width; c < width; ++c) d[c] = fjk_to_f32(s[c]);
    }
  } else {
    FJK_SCALAR_LOOP
    for (int r = 0; r < rows; ++r) {
      FJK_SCALAR_LOOP
      for (int c = 0; c < width; ++c)
        dst[r * dst_stride + c] = fjk_to_f32(src[r * s_row + c * s_col]);
    }
  }
  if (rows < BLOCK_N)
    __builtin_memset(dst + rows * dst_stride, 0, sizeof(float) * (BLOCK_N - rows) * dst_stride);
}

// ---- S^T = K Q^T, register-blocked ----
// kNG KV rows x kMVC query vectors: per d, kMVC vector loads of Q^T[d], kNG broadcasts of
// K[n][d], kNG * kMVC FMAs; the accumulators stay in registers over all of d.
static inline void fjk_qk_group(const float* __restrict qt, const float* __restrict kp,
                                float* __restrict st, const FjkPrefetchShare<HEAD_DIM>& pf) {
  FJK_ROLLED_LOOP
  for (int c = 0; c < kMV; c += kMVC) {  // one pass for BLOCK_M <= 64
    fj_v16f acc[kNG][kMVC];
#pragma clang loop unroll(full)
    for (int j = 0; j < kNG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) acc[j][i] = fjk_splat(0.0f);
    const float* qd = qt + 16 * c;  // Q^T[d][c..], K[0][d]: advanced one d per step
    const float* kd = kp;
    FJK_ROLLED_LOOP
    for (int d = 0; d < HEAD_DIM; ++d, qd += kMP, ++kd) {
      pf.step(c / kMVC * HEAD_DIM + d);
      fj_v16f q[kMVC];
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) q[i] = fjk_load(qd + 16 * i);
#pragma clang loop unroll(full)
      for (int j = 0; j < kNG; ++j) {
        const float k = kd[j * kKS];
#pragma clang loop unroll(full)
        for (int i = 0; i < kMVC; ++i) acc[j][i] += k * q[i];
      }
    }
#pragma clang loop unroll(full)
    for (int j = 0; j < kNG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) fjk_store(st + j * kMP + 16 * (c + i), acc[j][i]);
  }
}

// Scores for KV rows [0, nvalid), in whole groups (rows past nvalid are computed from zeroed K
// rows and never read). Group g also prefetches rows [g kNG, (g+1) kNG) of the next K.
static inline void fjk_scores(struct FjkTile* t, int nvalid, const struct FjkPrefetch* pf) {
  FJK_ROLLED_LOOP
  for (int g = 0; g * kNG < nvalid; ++g) {
    const FjkPrefetchShare<HEAD_DIM> share(pf, g * kNG, kNG);
    fjk_qk_group(t->qt, t->kp + g * kNG * kKS, t->st + g * kNG * kMP, share);
  }
}

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

// ---- online softmax over one block ----
// Updates m and l, turns S^T into P^T in place and returns alpha = 2^(m_old - m_new) per row.
// Returns false when every score of every real row is -inf: the block adds nothing (P = 0,
// alpha = 1), so the caller skips P V (masked-out sub-blocks of causal diagonals).
static inline bool fjk_softmax_block(struct FjkTile* t, int nvalid, fj_v16f* alpha) {
  fj_v16f mx[kMV];
  for (int i = 0; i < kMV; ++i) mx[i] = fjk_splat(FJK_NEG_INF);
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n)
    for (int i = 0; i < kMV; ++i) mx[i] = fjk_max(mx[i], fjk_load(t->st + n * kMP + 16 * i));
  bool any = false;
  for (int i = 0; i < kMV; ++i) any |= fjk_any((mx[i] != FJK_NEG_INF) & t->valid[i]);
  if (!any) return false;

  fj_v16f ref[kMV];
  for (int i = 0; i < kMV; ++i) {
    fj_v16f m_new = fjk_max(t->m[i], mx[i]);
    // -inf guard: a row with no finite score yet has m_new = -inf, and 2^(s - m_new) would
    // be 2^(-inf - -inf) = NaN. Such a row uses 0 as its reference instead: all its
    // s are -inf, so P = 2^-inf = 0 and alpha = 2^(-inf - 0) = 0 (O and l are still 0).
    ref[i] = m_new == FJK_NEG_INF ? fjk_splat(0.0f) : m_new;
    alpha[i] = fjk_exp2(t->m[i] - ref[i]);  // m_old = -inf gives 0: nothing to rescale
    t->m[i] = m_new;
  }
  fj_v16f sum[kMV];
  for (int i = 0; i < kMV; ++i) sum[i] = fjk_splat(0.0f);
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n) {
    for (int i = 0; i < kMV; ++i) {
      float* p = t->st + n * kMP + 16 * i;
      fj_v16f e = fjk_exp2(fjk_load(p) - ref[i]);  // masked s = -inf gives exactly 0
      fjk_store(p, e);
      sum[i] += e;
    }
  }
  for (int i = 0; i < kMV; ++i) t->l[i] = t->l[i] * alpha[i] + sum[i];
  return true;
}

// ---- O^T = O^T * alpha + V^T P^T, register-blocked ----
// kDG output features x kMVC query vectors: per KV row n, kMVC vector loads of P^T[n], kDG
// broadcasts of V[n][dv], kDG * kMVC FMAs; the accumulators stay in registers over the block.
static inline void fjk_pv_group(const float* __restrict pt, const float* __restrict vp,
                                float* __restrict ot, const fj_v16f* alpha, int nvalid,
                                const FjkPrefetchShare<HEAD_DIM_V>& pf) {
  FJK_ROLLED_LOOP
  for (int c = 0; c < kMV; c += kMVC) {  // one pass for BLOCK_M <= 64
    fj_v16f acc[kDG][kMVC];
#pragma clang loop unroll(full)
    for (int j = 0; j < kDG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i)
        acc[j][i] = fjk_load(ot + j * kMP + 16 * (c + i)) * alpha[c + i];
    const float* pn = pt + 16 * c;  // P^T[n][c..], V[n][0]: advanced one n per step
    const float* vn = vp;
    FJK_ROLLED_LOOP
    for (int n = 0; n < nvalid; ++n, pn += kMP, vn += kVS) {
      pf.step(c / kMVC * nvalid + n);
      fj_v16f p[kMVC];
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) p[i] = fjk_load(pn + 16 * i);
#pragma clang loop unroll(full)
      for (int j = 0; j < kDG; ++j) {
        const float v = vn[j];
#pragma clang loop unroll(full)
        for (int i = 0; i < kMVC; ++i) acc[j][i] += v * p[i];
      }
    }
#pragma clang loop unroll(full)
    for (int j = 0; j < kDG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) fjk_store(ot + j * kMP + 16 * (c + i), acc[j][i]);
  }
}

// All kDVP features in groups of kDG (the padding features have V = 0). Group g also
// prefetches its share of the next block's V rows.
static inline void fjk_pv(struct FjkTile* t, const fj_v16f* alpha, int nvalid,
                          const struct FjkPrefetch* pf) {
  constexpr int kGroups = kDVP / kDG, kRowsPerGroup = (BLOCK_N + kGroups - 1) / kGroups;
  FJK_ROLLED_LOOP
  for (int g = 0; g < kGroups; ++g) {
    const FjkPrefetchShare<HEAD_DIM_V> share(pf, g * kRowsPerGroup, kRowsPerGroup);
    fjk_pv_group(t->st, t->vp + g * kDG, t->ot + g * kDG * kMP, alpha, nvalid, share);
  }
}

// ---- one KV block of BLOCK_N columns starting at kv0 ----
// partial: evaluate mask_mod per element (full blocks skip it). Columns >= Lkv are never
// scored: the softmax and P V loops stop at nvalid. next_kv0: the block visited next (-1:
// none), prefetched meanwhile. Not inlined: its two call sites would double the compile time.
__attribute__((noinline)) static void fjk_visit_block(const struct FlexPrefillArgs* a,
                                                      const struct FjkItem* it,
                                                      struct FjkTile* t, fj_i64 kv0,
                                                      bool partial, fj_i64 next_kv0) {
  const fj_i64 left = a->Lkv - kv0;
  if (left <= 0) return;
  const int nvalid = left < BLOCK_N ? (int)left : BLOCK_N;

  fjk_pack_rows(it->k + kv0 * a->k_strides[2], a->k_strides[2], a->k_strides[3], nvalid,
                HEAD_DIM, kKS, t->kp);
  const struct FjkPrefetch pf_k =
      fjk_prefetch_plan(it->k, a->k_strides[2], a->k_strides[3], next_kv0, a->Lkv);
  fjk_scores(t, nvalid, &pf_k);
  fjk_apply_mods(t->st, a, it, kv0, nvalid, partial);

  fj_v16f alpha[kMV];
  if (!fjk_softmax_block(t, nvalid, alpha)) return;
  fjk_pack_rows(it->v + kv0 * a->v_strides[2], a->v_strides[2], a->v_strides[3], nvalid,
                HEAD_DIM_V, kVS, t->vp);
  const struct FjkPrefetch pf_v =
      fjk_prefetch_plan(it->v, a->v_strides[2], a->v_strides[3], next_kv0, a->Lkv);
  fjk_pv(t, alpha, nvalid, &pf_v);
}

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
// each split into mask_kv_block_size / BLOCK_N sub-blocks; those past Lkv are skipped.
// (Not inlined into its two call sites: compile time.)
__attribute__((noinline)) static void fjk_walk_listed(const struct FlexPrefillArgs* a,
                                                      const struct FjkItem* it,
                                                      struct FjkTile* t, struct FjkWalk* w,
                                                      const int* idx, int count, bool partial) {
  const fj_i64 sub = a->mask_kv_block_size / BLOCK_N;
  for (int j = 0; j < count; ++j) {
    const fj_i64 base = (fj_i64)idx[j] * a->mask_kv_block_size;
    for (fj_i64 s = 0; s < sub && base + s * BLOCK_N < a->Lkv; ++s)
      fjk_walk_to(a, it, t, w, base + s * BLOCK_N, partial);
  }
}

// ---- one work item (b, hq, m_block) ----
// Not inlined into the item loop: there its branches on launch constants (lse wanted, block
// mask present) would be unswitched, duplicating the whole body (compile time).
// h: the query head, or with pack_gqa the KV head.
__attribute__((noinline)) static void fjk_run_item(const struct FlexPrefillArgs* a,
                                                   struct FjkTile* t, fj_i64 b, fj_i64 h,
                                                   fj_i64 m_block) {
  struct FjkItem it;
  it.b = b;
  it.packed_lq = a->pack_gqa ? a->Lq : 0;
  it.hq = a->pack_gqa ? h * GQA_GROUP : h;
  it.q0 = m_block * BLOCK_M;
  const fj_i64 rows = (a->pack_gqa ? GQA_GROUP * a->Lq : a->Lq) - it.q0;
  it.mvalid = rows < BLOCK_M ? (int)rows : BLOCK_M;
  const fj_i64 hkv = a->pack_gqa ? h : h / GQA_GROUP;
  const fj_i64 bk = a->Bkv == 1 ? 0 : b;
  it.k = (const fjk_elem*)a->k + bk * a->k_strides[0] + hkv * a->k_strides[1];
  it.v = (const fjk_elem*)a->v + bk * a->v_strides[0] + hkv * a->v_strides[1];

  // Q^T carries scale (and log2 e when no score_mod sees the natural-scale score).
  const bool score_mod = a->apply_mods != nullptr && a->has_score_mod;
  const float qscale = score_mod ? a->scale : a->scale * FJK_LOG2E;
  fjk_pack_q(a, &it, qscale, t->qt);
  __builtin_memset(t->ot, 0, sizeof(t->ot));
  for (int i = 0; i < kMV; ++i) {
    t->m[i] = fjk_splat(FJK_NEG_INF);
    t->l[i] = fjk_splat(0.0f);
    t->valid[i] = fjk_iota() + (float)(16 * i) < (float)it.mvalid;
  }

  struct FjkWalk walk = {0, false, false};
  if (a->kv_num_blocks == nullptr) {  // no block mask: every block, partial if masked
    for (fj_i64 kv0 = 0; kv0 < a->Lkv; kv0 += BLOCK_N)
      fjk_walk_to(a, &it, t, &walk, kv0, a->has_mask_mod != 0);
  } else {
    // BLOCK_M divides mask_q_block_size, so the tile lies in one mask q-block. Packed tiles
    // need mask_H == 1 and Lq <= mask_q_block_size (the runtime checks): q-block 0, any head.
    const fj_i64 mb = a->mask_B == 1 ? 0 : b, mh = a->mask_H == 1 ? 0 : it.hq;
    const fj_i64 qb = a->pack_gqa ? 0 : it.q0 / a->mask_q_block_size;
    const fj_i64 row = (mb * a->mask_H + mh) * a->mask_q_blocks + qb;
    fjk_walk_listed(a, &it, t, &walk, a->kv_indices + row * a->kv_indices_stride,
                    a->kv_num_blocks[row], true);
    if (a->full_kv_num_blocks != nullptr)
      fjk_walk_listed(a, &it, t, &walk, a->full_kv_indices + row * a->full_kv_indices_stride,
                      a->full_kv_num_blocks[row], false);
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
  const fj_i64 os_col = a->out_strides[3];
  FJK_SCALAR_LOOP
  for (int m = 0; m < it.mvalid; ++m) {
    fjk_elem* orow = (fjk_elem*)a->out + b * a->out_strides[0] + fjk_row_head(&it, m) * a->out_strides[1] +
                     fjk_row_q(&it, m) * a->out_strides[2];
    FJK_SCALAR_LOOP
    for (int dv = 0; dv < HEAD_DIM_V; ++dv)
      fjk_from_f32(t->ot[dv * kMP + m] * inv_l[m], orow + dv * os_col);
  }
  if (a->lse != nullptr) {
    FJK_SCALAR_LOOP
    for (int m = 0; m < it.mvalid; ++m) {
      // lse = ln(sum_n e^s) = ln 2 * (m2 + log2 l), m2 the base-2 row max; l = 0 -> -inf.
      a->lse[b * a->lse_strides[0] + fjk_row_head(&it, m) * a->lse_strides[1] +
             fjk_row_q(&it, m) * a->lse_strides[2]] =
          l[m] > 0.0f ? (float)(FJK_LN2 * ((double)m2[m] + fjk_log2(l[m]))) : FJK_NEG_INF;
    }
  }
}

extern "C" void FLEXJIT_ENTRY(const struct FlexPrefillArgs* a, fj_i64 begin, fj_i64 end) {
  struct FjkTile t;
  // Padding the kernels compute with but packing never writes: K rows [BLOCK_N, kNP) and V
  // columns [Dv, kVS) must hold finite values (zeros), or NaN garbage could reach P V.
  __builtin_memset(t.kp + BLOCK_N * kKS, 0, sizeof(float) * (kNP - BLOCK_N) * kKS);
  if (kVS > HEAD_DIM_V) {
    FJK_SCALAR_LOOP
    for (int n = 0; n < BLOCK_N; ++n)
      __builtin_memset(t.vp + n * kVS + HEAD_DIM_V, 0, sizeof(float) * (kVS - HEAD_DIM_V));
  }
  const fj_i64 rows = a->pack_gqa ? GQA_GROUP * a->Lq : a->Lq;
  const fj_i64 heads = a->pack_gqa ? a->Hkv : a->Hq;
  const fj_i64 n_m_blocks = (rows + BLOCK_M - 1) / BLOCK_M;
  if (n_m_blocks <= 0 || heads <= 0) return;  // no work items exist
  for (fj_i64 item = begin; item < end; ++item) {
    const fj_i64 m_block = item % n_m_blocks, bh = item / n_m_blocks;
    fjk_run_item(a, &t, bh / heads, bh % heads, m_block);
  }
}

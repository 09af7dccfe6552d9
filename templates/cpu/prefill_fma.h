// The FMA engine of the CPU prefill kernel (fp32, fp16, and bf16 where AMX is not used): tile
// scratch, packing and the two matmuls on AVX-512 FMAs. Preceded by cpu/prefill_item.h,
// followed by the driver cpu/flash_prefill.h, which calls the engine interface at the end.
//
// Layout: everything is kept TRANSPOSED, query rows along the 16 vector lanes. Q^T [d][m],
// S^T/P^T [n][m] and O^T [dv][m] are rows of BLOCK_M floats, so the per-row softmax state
// (m, l, alpha) is a few vectors and row max / row sum are plain elementwise max / add with
// no horizontal reductions. Both matmuls are register-blocked outer products: a vector of
// 16 query rows times a broadcast K (or V) element. K and V are read as broadcasts, so they
// are packed per block only to convert the dtype and gather the strides into fp32 rows
// (no transposes), and HEAD_DIM needs no vector tail. The next block's K and V are
// prefetched while the current one is computed.

// Tile geometry and register blocking: cpu/prefill_lanes.h.
static constexpr int kNG = fjk_pick_group(BLOCK_N);
static constexpr int kNP = fjk_round_up(BLOCK_N, kNG);      // KV rows computed per block
static constexpr int kDG = fjk_pick_group(HEAD_DIM_V);
static constexpr int kDVP = fjk_round_up(HEAD_DIM_V, kDG);  // output features computed

static constexpr int kKS = fjk_row_stride(HEAD_DIM);
static constexpr int kVS = fjk_row_stride(kDVP);

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
    const fjk_elem* row = fjk_q_row(a, it, m);
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

// ---- the engine interface (what cpu/flash_prefill.h calls) ----

// Scores come out of fjk_block_scores already multiplied by the item's qscale (Q^T carries it).
static constexpr bool kFjkScoresScaled = true;

// Once per entry call: the padding the kernels compute with but packing never writes. K rows
// [BLOCK_N, kNP) and V columns [Dv, kVS) must hold finite values (zeros), or NaN garbage could
// reach P V.
static inline void fjk_engine_begin(struct FjkTile* t) {
  __builtin_memset(t->kp + BLOCK_N * kKS, 0, sizeof(float) * (kNP - BLOCK_N) * kKS);
  if (kVS > HEAD_DIM_V) {
    FJK_SCALAR_LOOP
    for (int n = 0; n < BLOCK_N; ++n)
      __builtin_memset(t->vp + n * kVS + HEAD_DIM_V, 0, sizeof(float) * (kVS - HEAD_DIM_V));
  }
}
static inline void fjk_engine_end(struct FjkTile* t) { (void)t; }

// Once per work item: Q^T (scaled by it->qscale) and O = 0.
static inline void fjk_item_begin(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                  struct FjkTile* t) {
  fjk_pack_q(a, it, it->qscale, t->qt);
  __builtin_memset(t->ot, 0, sizeof(t->ot));
}

// S^T rows [0, nvalid) for the KV block at kv0; prefetches the K block at next_kv0 (-1: none).
static inline void fjk_block_scores(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                    struct FjkTile* t, fj_i64 kv0, int nvalid, fj_i64 next_kv0) {
  fjk_pack_rows(it->k + kv0 * a->k_strides[2], a->k_strides[2], a->k_strides[3], nvalid,
                HEAD_DIM, kKS, t->kp);
  const struct FjkPrefetch pf_k =
      fjk_prefetch_plan(it->k, a->k_strides[2], a->k_strides[3], next_kv0, it->lkv);
  fjk_scores(t, nvalid, &pf_k);
}

// O = O * alpha + P V with P^T in S^T's rows [0, nvalid); prefetches the V block at next_kv0.
static inline void fjk_block_pv(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                struct FjkTile* t, const fj_v16f* alpha, fj_i64 kv0, int nvalid,
                                fj_i64 next_kv0) {
  fjk_pack_rows(it->v + kv0 * a->v_strides[2], a->v_strides[2], a->v_strides[3], nvalid,
                HEAD_DIM_V, kVS, t->vp);
  const struct FjkPrefetch pf_v =
      fjk_prefetch_plan(it->v, a->v_strides[2], a->v_strides[3], next_kv0, it->lkv);
  fjk_pv(t, alpha, nvalid, &pf_v);
}

// out[row m] = O[m] * inv_l[m] for the item's rows.
static inline void fjk_item_write_out(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                      const struct FjkTile* t, const float* inv_l) {
  fjk_write_out_t(a, it, t->ot, inv_l);
}

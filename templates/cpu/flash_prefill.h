// CPU forward (prefill) flash attention with FlexAttention score_mod / mask_mod.
//
// Preceded in the TU by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
// GQA_GROUP, FLEXJIT_ENTRY), mod_abi.h, cpu/common.h and the generated mod body
// (FLEXJIT_HAS_SCORE_MOD, FLEXJIT_HAS_MASK_MOD, flexjit_score_mod, flexjit_mask_mod).
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
// (no transposes), and HEAD_DIM / HEAD_DIM_V need no padding.

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
// Register blocking: the QK^T kernel keeps kMV x kNG accumulators (kNG KV columns), the PV
// kernel kMV x kDG (kDG output features); ~24 of the 32 zmm registers, leaving room for
// the kMV operand vectors. Per step it issues kMV vector loads and kNG broadcasts for
// kMV * kNG FMAs.
static constexpr int kNG = kMV <= 4 ? 24 / kMV : (16 / kMV > 0 ? 16 / kMV : 1);
static constexpr int kDG = kNG;

static_assert(HEAD_DIM >= 1 && HEAD_DIM_V >= 1 && BLOCK_M >= 1 && BLOCK_N >= 1, "bad spec");
static_assert(GQA_GROUP >= 1, "bad GQA_GROUP");

// Per-thread scratch, on the stack of the entry (no heap, no statics).
struct FjkTile {
  alignas(64) float qt[HEAD_DIM * kMP];       // Q^T [d][m], pre-scaled; rows m >= Lq are 0
  alignas(64) float st[BLOCK_N * kMP];        // S^T then P^T [n][m]
  alignas(64) float ot[HEAD_DIM_V * kMP];     // O^T [dv][m], unnormalised
  alignas(64) float kp[BLOCK_N * HEAD_DIM];   // K block in fp32 [n][d]
  alignas(64) float vp[BLOCK_N * HEAD_DIM_V]; // V block in fp32 [n][dv]
  fj_v16f m[kMV];      // running row max of the base-2 scores (-inf: nothing seen yet)
  fj_v16f l[kMV];      // running row sum of 2^(s - m)
  fj_v16i valid[kMV];  // lane is a real query row (q_idx < Lq)
};
static_assert(sizeof(struct FjkTile) <= (1 << 20), "tile scratch exceeds 1 MiB of stack");

// One work item's coordinates and base pointers.
struct FjkItem {
  fj_i64 b, hq, q0;  // batch, query head, first query row
  int mvalid;        // rows of this tile inside Lq
  const fjk_elem* k; // k[bk, hkv, 0, 0]
  const fjk_elem* v; // v[bk, hkv, 0, 0]
};

// ---- packing ----

// Q^T[d][m] = q[q0 + m][d] * c for the valid rows, 0 for the padding rows (which then score
// a finite 0 and are never written out).
static inline void fjk_pack_q(const fjk_elem* q, fj_i64 s_row, fj_i64 s_col, int mvalid,
                              float c, float* __restrict qt) {
  for (int m = 0; m < kMP; ++m) {
    const fjk_elem* row = q + m * s_row;
    if (m < mvalid) {
      for (int d = 0; d < HEAD_DIM; ++d) qt[d * kMP + m] = fjk_to_f32(row[d * s_col]) * c;
    } else {
      for (int d = 0; d < HEAD_DIM; ++d) qt[d * kMP + m] = 0.0f;
    }
  }
}

// dst[r][c] = fp32(src[r * s_row + c * s_col]) for r < rows; rows up to BLOCK_N are zeroed
// so the register-blocked kernels may read a whole group past the end of Lkv.
template <int W>
static inline void fjk_pack_rows(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col, int rows,
                                 float* __restrict dst) {
  if (s_col == 1) {  // the usual case: contiguous feature dim, vectorised convert-copy
    for (int r = 0; r < rows; ++r) {
      const fjk_elem* s = src + r * s_row;
      float* d = dst + r * W;
      for (int c = 0; c < W; ++c) d[c] = fjk_to_f32(s[c]);
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const fjk_elem* s = src + r * s_row;
      float* d = dst + r * W;
      for (int c = 0; c < W; ++c) d[c] = fjk_to_f32(s[c * s_col]);
    }
  }
  for (int i = rows * W; i < BLOCK_N * W; ++i) dst[i] = 0.0f;
}

// ---- S^T = K Q^T, register-blocked ----
// NG KV columns x kMV query vectors: per d, kMV vector loads of Q^T[d], NG broadcasts of
// K[n][d], NG * kMV FMAs.
template <int NG>
static inline void fjk_qk_group(const float* __restrict qt, const float* __restrict kp,
                                float* __restrict st) {
  fj_v16f acc[NG][kMV];
#pragma clang loop unroll(full)
  for (int j = 0; j < NG; ++j)
#pragma clang loop unroll(full)
    for (int i = 0; i < kMV; ++i) acc[j][i] = fjk_splat(0.0f);
  for (int d = 0; d < HEAD_DIM; ++d) {
    fj_v16f q[kMV];
#pragma clang loop unroll(full)
    for (int i = 0; i < kMV; ++i) q[i] = fjk_load(qt + d * kMP + 16 * i);
#pragma clang loop unroll(full)
    for (int j = 0; j < NG; ++j) {
      float k = kp[j * HEAD_DIM + d];
#pragma clang loop unroll(full)
      for (int i = 0; i < kMV; ++i) acc[j][i] += k * q[i];
    }
  }
#pragma clang loop unroll(full)
  for (int j = 0; j < NG; ++j)
#pragma clang loop unroll(full)
    for (int i = 0; i < kMV; ++i) fjk_store(st + j * kMP + 16 * i, acc[j][i]);
}

// Scores for columns [0, nvalid) (rounded up to whole groups; kp is zero past nvalid).
static inline void fjk_scores(const float* qt, const float* kp, float* st, int nvalid) {
  constexpr int kFull = BLOCK_N / kNG, kTail = BLOCK_N % kNG;
  int g = 0;
  for (; g < kFull && g * kNG < nvalid; ++g)
    fjk_qk_group<kNG>(qt, kp + g * kNG * HEAD_DIM, st + g * kNG * kMP);
  if constexpr (kTail != 0) {
    if (g == kFull && g * kNG < nvalid)
      fjk_qk_group<kTail>(qt, kp + g * kNG * HEAD_DIM, st + g * kNG * kMP);
  }
}

// ---- score_mod and mask_mod on S^T[n][m] (valid rows and columns only) ----
// The mods are only ever called with q_idx < Lq and kv_idx < Lkv (a mod may index a captured
// buffer by them). With a score_mod Q^T is scaled by `scale` only, so here
// s2 = score_mod(s * 1) * log2(e); without one Q^T already carries scale * log2(e).
template <bool kMask>
static inline void fjk_apply_mods(float* __restrict st, const struct FlexPrefillArgs* a,
                                  const struct FjkItem* it, fj_i64 kv0, int nvalid) {
  const struct FlexModArgs* mod = &a->mod;
  const fj_i64 b = it->b, h = it->hq, q0 = it->q0;
  const int mvalid = it->mvalid;
  for (int n = 0; n < nvalid; ++n) {
    float* row = st + n * kMP;
    const fj_i64 kv_idx = kv0 + n;
    for (int m = 0; m < mvalid; ++m) {
      float s = row[m];
#if FLEXJIT_HAS_SCORE_MOD
      s = flexjit_score_mod(s, b, h, q0 + m, kv_idx, mod) * FJK_LOG2E;
#endif
      if (kMask) s = flexjit_mask_mod(b, h, q0 + m, kv_idx, mod) ? s : FJK_NEG_INF;
      row[m] = s;
    }
  }
  (void)mod; (void)b; (void)h; (void)q0; (void)kv0;
}

// ---- online softmax over one block ----
// Updates m and l, turns S^T into P^T in place and returns alpha = 2^(m_old - m_new) per row.
// Returns false when every score of every real row is -inf: the block adds nothing (P = 0,
// alpha = 1), so the caller skips P V (masked-out sub-blocks of causal diagonals).
static inline bool fjk_softmax_block(struct FjkTile* t, int nvalid, fj_v16f* alpha) {
  fj_v16f mx[kMV];
  for (int i = 0; i < kMV; ++i) mx[i] = fjk_splat(FJK_NEG_INF);
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
// DG output features x kMV query vectors: per KV column n, kMV vector loads of P^T[n], DG
// broadcasts of V[n][dv], DG * kMV FMAs. The accumulators stay in registers over the block.
template <int DG>
static inline void fjk_pv_group(const float* __restrict pt, const float* __restrict vp,
                                float* __restrict ot, const fj_v16f* alpha, int nvalid) {
  fj_v16f acc[DG][kMV];
#pragma clang loop unroll(full)
  for (int j = 0; j < DG; ++j)
#pragma clang loop unroll(full)
    for (int i = 0; i < kMV; ++i) acc[j][i] = fjk_load(ot + j * kMP + 16 * i) * alpha[i];
  for (int n = 0; n < nvalid; ++n) {
    fj_v16f p[kMV];
#pragma clang loop unroll(full)
    for (int i = 0; i < kMV; ++i) p[i] = fjk_load(pt + n * kMP + 16 * i);
#pragma clang loop unroll(full)
    for (int j = 0; j < DG; ++j) {
      float v = vp[n * HEAD_DIM_V + j];
#pragma clang loop unroll(full)
      for (int i = 0; i < kMV; ++i) acc[j][i] += v * p[i];
    }
  }
#pragma clang loop unroll(full)
  for (int j = 0; j < DG; ++j)
#pragma clang loop unroll(full)
    for (int i = 0; i < kMV; ++i) fjk_store(ot + j * kMP + 16 * i, acc[j][i]);
}

static inline void fjk_pv(struct FjkTile* t, const fj_v16f* alpha, int nvalid) {
  constexpr int kFull = HEAD_DIM_V / kDG, kTail = HEAD_DIM_V % kDG;
  for (int g = 0; g < kFull; ++g)
    fjk_pv_group<kDG>(t->st, t->vp + g * kDG, t->ot + g * kDG * kMP, alpha, nvalid);
  if constexpr (kTail != 0)
    fjk_pv_group<kTail>(t->st, t->vp + kFull * kDG, t->ot + kFull * kDG * kMP, alpha, nvalid);
}

// ---- one KV block of BLOCK_N columns starting at kv0 ----
// partial: evaluate mask_mod per element (full blocks skip it). Columns >= Lkv are never
// scored: the loops stop at nvalid.
static inline void fjk_visit_block(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                   struct FjkTile* t, fj_i64 kv0, bool partial) {
  const fj_i64 left = a->Lkv - kv0;
  if (left <= 0) return;
  const int nvalid = left < BLOCK_N ? (int)left : BLOCK_N;

  fjk_pack_rows<HEAD_DIM>(it->k + kv0 * a->k_strides[2], a->k_strides[2], a->k_strides[3],
                          nvalid, t->kp);
  fjk_scores(t->qt, t->kp, t->st, nvalid);
#if FLEXJIT_HAS_MASK_MOD
  if (partial)
    fjk_apply_mods<true>(t->st, a, it, kv0, nvalid);
  else
#endif
  if (FLEXJIT_HAS_SCORE_MOD)
    fjk_apply_mods<false>(t->st, a, it, kv0, nvalid);
  (void)partial;

  fj_v16f alpha[kMV];
  if (!fjk_softmax_block(t, nvalid, alpha)) return;
  fjk_pack_rows<HEAD_DIM_V>(it->v + kv0 * a->v_strides[2], a->v_strides[2], a->v_strides[3],
                            nvalid, t->vp);
  fjk_pv(t, alpha, nvalid);
}

// Visits the blocks listed for this tile's mask q-block: `count` mask KV blocks from `idx`,
// each split into mask_kv_block_size / BLOCK_N sub-blocks.
static inline void fjk_visit_listed(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                    struct FjkTile* t, const int* idx, int count, bool partial) {
  const fj_i64 sub = a->mask_kv_block_size / BLOCK_N;
  for (int j = 0; j < count; ++j) {
    const fj_i64 base = (fj_i64)idx[j] * a->mask_kv_block_size;
    for (fj_i64 s = 0; s < sub; ++s) {
      const fj_i64 kv0 = base + s * BLOCK_N;
      if (kv0 >= a->Lkv) break;
      fjk_visit_block(a, it, t, kv0, partial);
    }
  }
}

// ---- one work item (b, hq, m_block) ----
static inline void fjk_run_item(const struct FlexPrefillArgs* a, struct FjkTile* t, fj_i64 b,
                                fj_i64 hq, fj_i64 m_block) {
  struct FjkItem it;
  it.b = b;
  it.hq = hq;
  it.q0 = m_block * BLOCK_M;
  const fj_i64 rows = a->Lq - it.q0;
  it.mvalid = rows < BLOCK_M ? (int)rows : BLOCK_M;
  const fj_i64 hkv = hq / GQA_GROUP;
  const fj_i64 bk = a->Bkv == 1 ? 0 : b;
  it.k = (const fjk_elem*)a->k + bk * a->k_strides[0] + hkv * a->k_strides[1];
  it.v = (const fjk_elem*)a->v + bk * a->v_strides[0] + hkv * a->v_strides[1];

  // Q^T carries scale (and log2 e when no score_mod sees the natural-scale score).
#if FLEXJIT_HAS_SCORE_MOD
  const float qscale = a->scale;
#else
  const float qscale = a->scale * FJK_LOG2E;
#endif
  const fjk_elem* q = (const fjk_elem*)a->q + b * a->q_strides[0] + hq * a->q_strides[1] +
                      it.q0 * a->q_strides[2];
  fjk_pack_q(q, a->q_strides[2], a->q_strides[3], it.mvalid, qscale, t->qt);
  for (int i = 0; i < HEAD_DIM_V * kMP; ++i) t->ot[i] = 0.0f;
  for (int i = 0; i < kMV; ++i) {
    t->m[i] = fjk_splat(FJK_NEG_INF);
    t->l[i] = fjk_splat(0.0f);
    t->valid[i] = fjk_iota() + (float)(16 * i) < (float)it.mvalid;
  }

  if (a->kv_num_blocks == nullptr) {  // no block mask: every block, partial if masked
    for (fj_i64 kv0 = 0; kv0 < a->Lkv; kv0 += BLOCK_N)
      fjk_visit_block(a, &it, t, kv0, FLEXJIT_HAS_MASK_MOD != 0);
  } else {
    // BLOCK_M divides mask_q_block_size, so the tile lies in one mask q-block.
    const fj_i64 mb = a->mask_B == 1 ? 0 : b, mh = a->mask_H == 1 ? 0 : hq;
    const fj_i64 qb = it.q0 / a->mask_q_block_size;
    const fj_i64 row = (mb * a->mask_H + mh) * a->mask_q_blocks + qb;
    fjk_visit_listed(a, &it, t, a->kv_indices + row * a->kv_indices_stride, a->kv_num_blocks[row],
                     true);
    if (a->full_kv_num_blocks != nullptr)
      fjk_visit_listed(a, &it, t, a->full_kv_indices + row * a->full_kv_indices_stride,
                       a->full_kv_num_blocks[row], false);
  }

  // out = O / l. A fully masked row (l = 0: no finite score, or no block visited) writes 0
  // and lse = -inf instead of 0/0 = NaN.
  alignas(64) float inv_l[kMP];
  for (int i = 0; i < kMV; ++i) {
    const fj_v16f l = t->l[i];
    const fj_v16f inv = l > 0.0f ? 1.0f / l : fjk_splat(0.0f);
    fjk_store(inv_l + 16 * i, inv);
  }
  fjk_elem* out = (fjk_elem*)a->out + b * a->out_strides[0] + hq * a->out_strides[1] +
                  it.q0 * a->out_strides[2];
  const fj_i64 os_row = a->out_strides[2], os_col = a->out_strides[3];
  for (int m = 0; m < it.mvalid; ++m) {
    fjk_elem* orow = out + m * os_row;
    const float s = inv_l[m];
    for (int dv = 0; dv < HEAD_DIM_V; ++dv)
      fjk_from_f32(t->ot[dv * kMP + m] * s, orow + dv * os_col);
  }
  if (a->lse != nullptr) {
    float* lse = a->lse + b * a->lse_strides[0] + hq * a->lse_strides[1];
    for (int m = 0; m < it.mvalid; ++m) {
      const float l = t->l[m / 16][m % 16], m2 = t->m[m / 16][m % 16];
      // lse = ln(sum_n e^s) = ln 2 * (m2 + log2 l), m2 the base-2 row max; l = 0 -> -inf.
      lse[(it.q0 + m) * a->lse_strides[2]] =
          l > 0.0f ? (float)(FJK_LN2 * ((double)m2 + fjk_log2(l))) : FJK_NEG_INF;
    }
  }
}

extern "C" void FLEXJIT_ENTRY(const struct FlexPrefillArgs* a, fj_i64 begin, fj_i64 end) {
  struct FjkTile t;
  const fj_i64 n_m_blocks = (a->Lq + BLOCK_M - 1) / BLOCK_M;
  for (fj_i64 item = begin; item < end; ++item) {
    const fj_i64 m_block = item % n_m_blocks, bh = item / n_m_blocks;
    fjk_run_item(a, &t, bh / a->Hq, bh % a->Hq, m_block);
  }
}

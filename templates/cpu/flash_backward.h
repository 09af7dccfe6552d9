// CPU backward flash attention with FlexAttention score_mod / mask_mod (FlexBackwardArgs in
// mod_abi.h): FlashAttention-2's recomputation scheme, no L x L buffer, no atomics.
//
// Preceded in the TU by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
// GQA_GROUP, FLEXJIT_ENTRY), mod_abi.h, cpu/common.h and cpu/elem.h. Like the forward kernel it
// holds no mod code: the mods come as the forward's apply_mods and the score_mod's derivative as
// apply_grad (templates/cpu/mods_grad.h), both compiled apart, so this kernel is compiled once
// per shape for every mod set.
//
// Layout: query rows along the 16 vector lanes, as in the forward FMA engine. Per (q-block,
// KV block) pair, with Q^T [d][m], dO^T [dv][m] packed once per q-block:
//   S^T  [n][m] = K Q^T (scale folded into Q^T)      dP^T [n][m] = V dO^T
//   P^T         = 2^(score_mod(S^T) log2 e - lse log2 e), masked -> 0
//   dS'^T       = P^T (dP^T - delta)                  dS^T = apply_grad(S^T, dS'^T)
// pass 1 (an item = one KV block): dV [n][dv] += P^T dO, dK [n][d] += dS^T Q (rows of dO / Q);
// pass 2 (an item = one q-block):  dQ^T [d][m] += K^T dS^T.
// All five products are one register-blocked routine, fjb_gemm: C[i][:] (+)= sum_k A(i, k) B[k][:]
// with the B rows and C rows whole vectors and A read as broadcasts at any strides.

#if !defined(FLEXJIT_DTYPE) || !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || \
    !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY)
#error "the backward kernel needs the spec macros defined before it"
#endif
static_assert(HEAD_DIM >= 1 && HEAD_DIM_V >= 1 && BLOCK_M >= 1 && BLOCK_N >= 1 && GQA_GROUP >= 1, "bad spec");

static constexpr int kMP = fjk_round_up(BLOCK_M, 16);   // query rows padded to whole vectors
static constexpr int kDP = fjk_round_up(HEAD_DIM, 16);  // row strides of Q / K / dK rows
static constexpr int kDVP = fjk_round_up(HEAD_DIM_V, 16);

// ---- C[i][0, W) (+)= sum_{k < kdim} A[i * asi + k * ask] * B[k * ldb + (0, W)] ----
// W, ldb, ldc multiples of 16 floats and B, C 64-byte aligned. A block is kR rows by kCV vectors
// of accumulators (16 + 4 operand registers at the widest), over the whole k range.
template <int kCV, int kR>
static inline void fjb_gemm_block(int kdim, const float* __restrict A, fj_i64 asi, fj_i64 ask,
                                  const float* __restrict B, fj_i64 ldb, float* __restrict C,
                                  fj_i64 ldc, bool acc) {
  fj_v16f c[kR][kCV];
#pragma clang loop unroll(full)
  for (int r = 0; r < kR; ++r)
#pragma clang loop unroll(full)
    for (int v = 0; v < kCV; ++v) c[r][v] = acc ? fjk_load(C + r * ldc + 16 * v) : fjk_splat(0.0f);
  FJK_ROLLED_LOOP
  for (int k = 0; k < kdim; ++k) {
    fj_v16f b[kCV];
#pragma clang loop unroll(full)
    for (int v = 0; v < kCV; ++v) b[v] = fjk_load(B + k * ldb + 16 * v);
#pragma clang loop unroll(full)
    for (int r = 0; r < kR; ++r) {
      const float a = A[r * asi + k * ask];
#pragma clang loop unroll(full)
      for (int v = 0; v < kCV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma clang loop unroll(full)
  for (int r = 0; r < kR; ++r)
#pragma clang loop unroll(full)
    for (int v = 0; v < kCV; ++v) fjk_store(C + r * ldc + 16 * v, c[r][v]);
}

#if defined(__AVX512F__)
static constexpr int kFjbRows = 4;  // 4 x 4 accumulators in 32 zmm registers
#else
static constexpr int kFjbRows = 2;  // AVX2 / SSE: a 16-lane vector takes 2-4 registers
#endif

template <int W, int kR>
static inline void fjb_gemm_rows(int kdim, const float* A, fj_i64 asi, fj_i64 ask, const float* B,
                                 fj_i64 ldb, float* C, fj_i64 ldc, bool acc) {
  constexpr int kV = W / 16, kFull = kV / 4, kRem = kV % 4;
  FJK_ROLLED_LOOP
  for (int c = 0; c < kFull; ++c)
    fjb_gemm_block<4, kR>(kdim, A, asi, ask, B + 64 * c, ldb, C + 64 * c, ldc, acc);
  if constexpr (kRem > 0)
    fjb_gemm_block<kRem, kR>(kdim, A, asi, ask, B + 64 * kFull, ldb, C + 64 * kFull, ldc, acc);
}

template <int W>
__attribute__((noinline)) static void fjb_gemm(int rows, int kdim, const float* A, fj_i64 asi,
                                               fj_i64 ask, const float* B, fj_i64 ldb, float* C,
                                               fj_i64 ldc, bool acc) {
  static_assert(W % 16 == 0, "whole vectors");
  int r = 0;
  FJK_ROLLED_LOOP
  for (; r + kFjbRows <= rows; r += kFjbRows)
    fjb_gemm_rows<W, kFjbRows>(kdim, A + r * asi, asi, ask, B, ldb, C + r * ldc, ldc, acc);
  FJK_ROLLED_LOOP
  for (; r < rows; ++r) fjb_gemm_rows<W, 1>(kdim, A + r * asi, asi, ask, B, ldb, C + r * ldc, ldc, acc);
}

// ---- packing ----

// dst[r][c] = fp32(src[r * s_row + c * s_col]) * mul for r < rows, c < width; columns
// [width, dst_stride) and rows [rows, pad_rows) are zeroed.
__attribute__((noinline)) static void fjb_pack_rows(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col,
                                                    int rows, int width, float mul, int dst_stride,
                                                    int pad_rows, float* __restrict dst) {
  FJK_SCALAR_LOOP
  for (int r = 0; r < rows; ++r) {
    const fjk_elem* s = src + r * s_row;
    float* d = dst + r * dst_stride;
    for (int c = 0; c < width; ++c) d[c] = fjk_to_f32(s[c * s_col]) * mul;
    for (int c = width; c < dst_stride; ++c) d[c] = 0.0f;
  }
  if (rows < pad_rows) __builtin_memset(dst + rows * dst_stride, 0, sizeof(float) * (pad_rows - rows) * dst_stride);
}

// Transposed: dst[c][m] = fp32(src[m * s_row + c * s_col]) * mul for m < rows (padding lanes 0).
__attribute__((noinline)) static void fjb_pack_t(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col, int rows,
                                                 int width, float mul, float* __restrict dst) {
  if (rows < kMP) __builtin_memset(dst, 0, sizeof(float) * width * kMP);
  FJK_SCALAR_LOOP
  for (int m = 0; m < rows; ++m) {
    const fjk_elem* s = src + m * s_row;
    FJK_SCALAR_LOOP
    for (int c = 0; c < width; ++c) dst[c * kMP + m] = fjk_to_f32(s[c * s_col]) * mul;
  }
}

// ---- one q-block's operands: Q^T (scaled), dO^T, base-2 lse and delta per row ----
struct FjbQ {
  alignas(64) float qt[HEAD_DIM * kMP];    // Q^T * scale
  alignas(64) float dot[HEAD_DIM_V * kMP]; // dO^T
  alignas(64) float lse2[kMP];             // lse * log2 e; +inf for rows that take no gradient
  alignas(64) float delta[kMP];
  fj_i64 b, h, q0;
  int mvalid;
};

static inline const fjk_elem* fjb_row(const void* base, const fj_i64* st, fj_i64 b, fj_i64 h, fj_i64 i) {
  return (const fjk_elem*)base + b * st[0] + h * st[1] + i * st[2];
}

static inline void fjb_load_q(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 h, fj_i64 q0,
                              struct FjbQ* t) {
  t->b = b;
  t->h = h;
  t->q0 = q0;
  const fj_i64 left = a->Lq - q0;
  t->mvalid = left < BLOCK_M ? (int)left : BLOCK_M;
  fjb_pack_t(fjb_row(a->q, a->q_strides, b, h, q0), a->q_strides[2], a->q_strides[3], t->mvalid, HEAD_DIM,
             a->scale, t->qt);
  fjb_pack_t(fjb_row(a->dout, a->dout_strides, b, h, q0), a->dout_strides[2], a->dout_strides[3], t->mvalid,
             HEAD_DIM_V, 1.0f, t->dot);
  const float* delta = a->delta + (b * a->Hq + h) * a->Lq + q0;
  FJK_SCALAR_LOOP
  for (int m = 0; m < kMP; ++m) {
    const float l = m < t->mvalid ? a->lse[b * a->lse_strides[0] + h * a->lse_strides[1] +
                                           (q0 + m) * a->lse_strides[2]]
                                  : FJK_NEG_INF;
    // A row with lse = -inf (fully masked: out 0) or NaN gets P = 2^(s - inf) = 0: no gradient.
    t->lse2[m] = l > FJK_NEG_INF ? l * FJK_LOG2E : __builtin_inff();
    t->delta[m] = m < t->mvalid ? delta[m] : 0.0f;
  }
}

// ---- one (q-block, KV block) pair: dS^T into ds, P^T into st ----
struct FjbPair {
  alignas(64) float st[BLOCK_N * kMP];    // S^T, then P^T
  alignas(64) float ds[BLOCK_N * kMP];    // dP^T, then dS^T
  alignas(64) float sraw[BLOCK_N * kMP];  // S^T as score_mod saw it (natural scale)
};

// kp [BLOCK_N][kDP], vp [BLOCK_N][kDVP]: the KV block in fp32, rows >= nvalid zero. partial:
// evaluate mask_mod. grad: buffer gradient accumulators (pass 2) or null. Returns false when the
// pair contributes nothing (every P is 0).
static bool fjb_pair(const struct FlexBackwardArgs* a, const struct FjbQ* q, const float* kp,
                     const float* vp, fj_i64 kv0, int nvalid, bool partial, const struct FlexGradArgs* grad,
                     struct FjbPair* t) {
  fjb_gemm<kMP>(nvalid, HEAD_DIM, kp, kDP, 1, q->qt, kMP, t->st, kMP, false);
  const bool score_mod = a->apply_mods != nullptr && a->has_score_mod;
  const bool mask = partial && a->apply_mods != nullptr && a->has_mask_mod;
  if (score_mod && a->apply_grad != nullptr) __builtin_memcpy(t->sraw, t->st, sizeof(float) * nvalid * kMP);
  if (!score_mod) {  // apply_mods takes base-2 scores without a score_mod
    FJK_ROLLED_LOOP
    for (int n = 0; n < nvalid; ++n)
      for (int i = 0; i < kMP / 16; ++i)
        fjk_store(t->st + n * kMP + 16 * i, fjk_load(t->st + n * kMP + 16 * i) * FJK_LOG2E);
  }
  if (score_mod || mask) {
    struct FlexModTile tile;
    tile.s = t->st;
    tile.ld = kMP;
    tile.ld_m = 1;
    tile.b = q->b;
    tile.h = q->h;
    tile.q0 = q->q0;
    tile.kv0 = kv0;
    tile.mvalid = q->mvalid;
    tile.nvalid = nvalid;
    tile.mask = mask ? 1 : 0;
    a->apply_mods(&tile, &a->mod);
  }
  // P^T = 2^(s - lse2): masked s = -inf and rows with lse2 = +inf give exactly 0.
  fj_v16i any = {};
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n)
    for (int i = 0; i < kMP / 16; ++i) {
      const fj_v16f p = fjk_exp2(fjk_load(t->st + n * kMP + 16 * i) - fjk_load(q->lse2 + 16 * i));
      fjk_store(t->st + n * kMP + 16 * i, p);
      any |= p > 0.0f;
    }
  if (!fjk_any(any)) return false;
  // dP^T = V dO^T, then dS'^T = P^T (dP^T - delta).
  fjb_gemm<kMP>(nvalid, HEAD_DIM_V, vp, kDVP, 1, q->dot, kMP, t->ds, kMP, false);
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n)
    for (int i = 0; i < kMP / 16; ++i) {
      float* d = t->ds + n * kMP + 16 * i;
      const fj_v16f p = fjk_load(t->st + n * kMP + 16 * i);
      // p = 0 must give 0 even where dP is not finite (masked keys of a non-finite V row).
      fjk_store(d, p == 0.0f ? fjk_splat(0.0f) : p * (fjk_load(d) - fjk_load(q->delta + 16 * i)));
    }
  if (score_mod && a->apply_grad != nullptr) {
    struct FlexModGradTile gt;
    gt.s = t->sraw;
    gt.ds = t->ds;
    gt.ld = kMP;
    gt.b = q->b;
    gt.h = q->h;
    gt.q0 = q->q0;
    gt.kv0 = kv0;
    gt.mvalid = q->mvalid;
    gt.nvalid = nvalid;
    a->apply_grad(&gt, &a->mod, grad);
  }
  return true;
}

// ---- pass 0: delta = rowsum(dout * out) ----
static void fjb_delta_item(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 h, fj_i64 mb) {
  const fj_i64 q0 = mb * BLOCK_M;
  const fj_i64 q1 = q0 + BLOCK_M < a->Lq ? q0 + BLOCK_M : a->Lq;
  FJK_SCALAR_LOOP
  for (fj_i64 i = q0; i < q1; ++i) {
    const fjk_elem* o = fjb_row(a->out, a->out_strides, b, h, i);
    const fjk_elem* g = fjb_row(a->dout, a->dout_strides, b, h, i);
    float s = 0.0f;
    for (int d = 0; d < HEAD_DIM_V; ++d)
      s += fjk_to_f32(o[d * a->out_strides[3]]) * fjk_to_f32(g[d * a->dout_strides[3]]);
    a->delta[(b * a->Hq + h) * a->Lq + i] = s;
  }
}

// ---- the block lists of one mask row ----
// Calls visit(pos, partial) for every BLOCK-sized sub-block (of `sub` per mask block, size
// `step`) of the mask blocks listed in row `row` of m (partial list, then full), positions below
// `limit`; without a block mask every sub-block of [0, limit), partial iff has_mask_mod.
template <typename F>
static inline void fjb_walk(const struct FlexBackwardArgs* a, const struct FlexBlockMaskArgs* m, fj_i64 row,
                            fj_i64 mask_block, fj_i64 step, fj_i64 limit, F&& visit) {
  if (m->kv_num_blocks == nullptr) {
    for (fj_i64 p = 0; p < limit; p += step) visit(p, a->has_mask_mod != 0);
    return;
  }
  for (int list = 0; list < 2; ++list) {
    const int* num = list == 0 ? m->kv_num_blocks : m->full_kv_num_blocks;
    if (num == nullptr) continue;
    const int* idx = list == 0 ? m->kv_indices + row * m->kv_indices_stride
                               : m->full_kv_indices + row * m->full_kv_indices_stride;
    for (int j = 0; j < num[row]; ++j) {
      const fj_i64 base = (fj_i64)idx[j] * mask_block;
      for (fj_i64 p = base; p < base + mask_block && p < limit; p += step) visit(p, list == 0);
    }
  }
}

// ---- pass 1: dK and dV of one KV block (b, hkv, n_block) ----
struct FjbKv {
  alignas(64) float kp[BLOCK_N * kDP];
  alignas(64) float vp[BLOCK_N * kDVP];
  alignas(64) float dk[BLOCK_N * kDP];
  alignas(64) float dv[BLOCK_N * kDVP];
  alignas(64) float qr[BLOCK_M * kDP];    // Q rows (unscaled)
  alignas(64) float dor[BLOCK_M * kDVP];  // dO rows
  struct FjbQ q;
  struct FjbPair pair;
};
static_assert(sizeof(struct FjbKv) <= (3 << 19), "pass 1 scratch exceeds 1.5 MiB of stack");

__attribute__((noinline)) static void fjb_kv_item(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 hkv,
                                                  fj_i64 nb) {
  struct FjbKv t;
  const fj_i64 kv0 = nb * BLOCK_N;
  const int nvalid = a->Lkv - kv0 < BLOCK_N ? (int)(a->Lkv - kv0) : BLOCK_N;
  fjb_pack_rows(fjb_row(a->k, a->k_strides, b, hkv, kv0), a->k_strides[2], a->k_strides[3], nvalid, HEAD_DIM,
                1.0f, kDP, BLOCK_N, t.kp);
  fjb_pack_rows(fjb_row(a->v, a->v_strides, b, hkv, kv0), a->v_strides[2], a->v_strides[3], nvalid,
                HEAD_DIM_V, 1.0f, kDVP, BLOCK_N, t.vp);
  __builtin_memset(t.dk, 0, sizeof(t.dk));
  __builtin_memset(t.dv, 0, sizeof(t.dv));
  const struct FlexBlockMaskArgs* m = &a->mask_t;
  for (fj_i64 g = 0; g < GQA_GROUP; ++g) {
    const fj_i64 hq = hkv * GQA_GROUP + g;
    fj_i64 row = 0;
    if (m->kv_num_blocks != nullptr) {
      const fj_i64 mb = m->B == 1 ? 0 : b, mh = m->H == 1 ? 0 : hq;
      row = (mb * m->H + mh) * m->q_blocks + kv0 / m->kv_block_size;
    }
    fjb_walk(a, m, row, m->q_block_size, BLOCK_M, a->Lq, [&](fj_i64 q0, bool partial) {
      fjb_load_q(a, b, hq, q0, &t.q);
      if (!fjb_pair(a, &t.q, t.kp, t.vp, kv0, nvalid, partial, nullptr, &t.pair)) return;
      const int mv = t.q.mvalid;
      fjb_pack_rows(fjb_row(a->dout, a->dout_strides, b, hq, q0), a->dout_strides[2], a->dout_strides[3], mv,
                    HEAD_DIM_V, 1.0f, kDVP, 0, t.dor);
      fjb_pack_rows(fjb_row(a->q, a->q_strides, b, hq, q0), a->q_strides[2], a->q_strides[3], mv, HEAD_DIM,
                    1.0f, kDP, 0, t.qr);
      fjb_gemm<kDVP>(nvalid, mv, t.pair.st, kMP, 1, t.dor, kDVP, t.dv, kDVP, true);  // dV += P^T dO
      fjb_gemm<kDP>(nvalid, mv, t.pair.ds, kMP, 1, t.qr, kDP, t.dk, kDP, true);      // dK += dS^T Q
    });
  }
  float* dk = a->dk + ((b * a->Hkv + hkv) * a->Lkv + kv0) * HEAD_DIM;
  float* dv = a->dv + ((b * a->Hkv + hkv) * a->Lkv + kv0) * HEAD_DIM_V;
  FJK_SCALAR_LOOP
  for (int n = 0; n < nvalid; ++n) {
    for (int d = 0; d < HEAD_DIM; ++d) dk[n * HEAD_DIM + d] = t.dk[n * kDP + d] * a->scale;
    for (int d = 0; d < HEAD_DIM_V; ++d) dv[n * HEAD_DIM_V + d] = t.dv[n * kDVP + d];
  }
}

// ---- pass 2: dQ (and buffer gradients) of one q-block (b, hq, m_block) ----
struct FjbQItem {
  alignas(64) float kp[BLOCK_N * kDP];
  alignas(64) float vp[BLOCK_N * kDVP];
  alignas(64) float dqt[HEAD_DIM * kMP];
  struct FjbQ q;
  struct FjbPair pair;
};
static_assert(sizeof(struct FjbQItem) <= (3 << 19), "pass 2 scratch exceeds 1.5 MiB of stack");

__attribute__((noinline)) static void fjb_q_item(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 hq,
                                                 fj_i64 mb) {
  struct FjbQItem t;
  const fj_i64 hkv = hq / GQA_GROUP;
  fjb_load_q(a, b, hq, mb * BLOCK_M, &t.q);
  __builtin_memset(t.dqt, 0, sizeof(t.dqt));
  const struct FlexBlockMaskArgs* m = &a->mask;
  fj_i64 row = 0;
  if (m->kv_num_blocks != nullptr) {
    const fj_i64 bb = m->B == 1 ? 0 : b, hh = m->H == 1 ? 0 : hq;
    row = (bb * m->H + hh) * m->q_blocks + t.q.q0 / m->q_block_size;
  }
  fjb_walk(a, m, row, m->kv_block_size, BLOCK_N, a->Lkv, [&](fj_i64 kv0, bool partial) {
    const int nvalid = a->Lkv - kv0 < BLOCK_N ? (int)(a->Lkv - kv0) : BLOCK_N;
    fjb_pack_rows(fjb_row(a->k, a->k_strides, b, hkv, kv0), a->k_strides[2], a->k_strides[3], nvalid,
                  HEAD_DIM, 1.0f, kDP, BLOCK_N, t.kp);
    fjb_pack_rows(fjb_row(a->v, a->v_strides, b, hkv, kv0), a->v_strides[2], a->v_strides[3], nvalid,
                  HEAD_DIM_V, 1.0f, kDVP, BLOCK_N, t.vp);
    if (!fjb_pair(a, &t.q, t.kp, t.vp, kv0, nvalid, partial, a->grad, &t.pair)) return;
    fjb_gemm<kMP>(HEAD_DIM, nvalid, t.kp, 1, kDP, t.pair.ds, kMP, t.dqt, kMP, true);  // dQ^T += K^T dS^T
  });
  float* dq = a->dq + ((b * a->Hq + hq) * a->Lq + t.q.q0) * HEAD_DIM;
  FJK_SCALAR_LOOP
  for (int m2 = 0; m2 < t.q.mvalid; ++m2)
    for (int d = 0; d < HEAD_DIM; ++d) dq[m2 * HEAD_DIM + d] = t.dqt[d * kMP + m2] * a->scale;
}

extern "C" void FLEXJIT_ENTRY(const struct FlexBackwardArgs* a, fj_i64 begin, fj_i64 end) {
  if (a->pass == 1) {
    const fj_i64 nnb = (a->Lkv + BLOCK_N - 1) / BLOCK_N;
    for (fj_i64 item = begin; item < end; ++item) {
      const fj_i64 bh = item / nnb;
      fjb_kv_item(a, bh / a->Hkv, bh % a->Hkv, item % nnb);
    }
    return;
  }
  const fj_i64 nmb = (a->Lq + BLOCK_M - 1) / BLOCK_M;
  for (fj_i64 item = begin; item < end; ++item) {
    const fj_i64 bh = item / nmb;
    if (a->pass == 0) fjb_delta_item(a, bh / a->Hq, bh % a->Hq, item % nmb);
    else fjb_q_item(a, bh / a->Hq, bh % a->Hq, item % nmb);
  }
}

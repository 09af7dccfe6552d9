// CPU backward flash attention with FlexAttention score_mod / mask_mod (FlexBackwardArgs in
// mod_abi.h): FlashAttention-2's recomputation scheme, no L x L buffer, no atomics.
//
// Preceded in the TU by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
// GQA_GROUP, FLEXJIT_ENTRY), mod_abi.h, cpu/common.h and cpu/elem.h. Like the forward kernel it
// holds no mod code: the mods come as the forward's apply_mods and the score_mod's derivative as
// apply_grad (templates/cpu/mods_grad.h), both compiled apart, so this kernel is compiled once
// per shape for every mod set.
//
// A unit of pass 1 walks a chunk of KV blocks; for each, the q-blocks that visit it. Layout: keys
// along the 16 vector lanes. The KV block is packed once (K rows, K^T and V^T), and per visited
// q-block only rows are packed (Q * scale and dO: contiguous, vectorised), so the per-pair
// packing stays small next to the five products:
//   S  [m][n] = (scale Q) K^T              dP [m][n] = dO V^T
//   P         = 2^(score_mod(S) log2 e - lse log2 e), masked -> 0
//   dS'       = P (dP - delta)             dS = apply_grad(S, dS')
//   dV [n][dv] += P^T dO                   dK [n][d] += dS^T (scale Q)
//   dQ [m][d]  += dS K                     (into the chunk's own partial; pass 2 sums them)
// All five are one register-blocked routine, fjb_gemm: C[i][:] (+)= sum_k A(i, k) B[k][:] with
// the B rows and C rows whole vectors and A read as broadcasts at any strides (fp32 FMAs, or
// vdpbf16ps on bf16 pairs).

#if !defined(FLEXJIT_DTYPE) || !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || \
    !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY)
#error "the backward kernel needs the spec macros defined before it"
#endif
static_assert(HEAD_DIM >= 1 && HEAD_DIM_V >= 1 && BLOCK_M >= 1 && BLOCK_N >= 1 && GQA_GROUP >= 1, "bad spec");

static constexpr int kNP = fjk_round_up(BLOCK_N, 16);   // keys padded to whole vectors
static constexpr int kDP = fjk_round_up(HEAD_DIM, 16);  // row strides of Q / K / dK / dQ rows
static constexpr int kDVP = fjk_round_up(HEAD_DIM_V, 16);

// ---- C[i][0, W) (+)= sum_{k < kdim} A[i * asi + k * ask] * B[k * ldb + (0, W)] ----
// W, ldb, ldc multiples of 16 (elements of B / C) and B, C 64-byte aligned. A block is kR rows by
// kCV vectors of accumulators (16 + 4 operand registers at the widest), over the whole k range.
// The operands: FjbF32 (fp32 A and B, FMAs) or, with bf16 inputs, FjbBf16Pairs (below: every
// element a bf16 pair along k, vdpbf16ps); C is fp32 either way.
struct FjbF32 {
  typedef float elem;
  typedef fj_v16f vec;
  static vec load(const elem* p) { return fjk_load(p); }
  static fj_v16f madd(fj_v16f c, vec b, elem a) { return c + a * b; }
};

template <typename Op, int kCV, int kR>
static inline void fjb_gemm_block(int kdim, const typename Op::elem* __restrict A, fj_i64 asi, fj_i64 ask,
                                  const typename Op::elem* __restrict B, fj_i64 ldb, float* __restrict C,
                                  fj_i64 ldc, bool acc) {
  fj_v16f c[kR][kCV];
#pragma clang loop unroll(full)
  for (int r = 0; r < kR; ++r)
#pragma clang loop unroll(full)
    for (int v = 0; v < kCV; ++v) c[r][v] = acc ? fjk_load(C + r * ldc + 16 * v) : fjk_splat(0.0f);
  FJK_ROLLED_LOOP
  for (int k = 0; k < kdim; ++k) {
    typename Op::vec b[kCV];
#pragma clang loop unroll(full)
    for (int v = 0; v < kCV; ++v) b[v] = Op::load(B + k * ldb + 16 * v);
#pragma clang loop unroll(full)
    for (int r = 0; r < kR; ++r) {
      const typename Op::elem a = A[r * asi + k * ask];
#pragma clang loop unroll(full)
      for (int v = 0; v < kCV; ++v) c[r][v] = Op::madd(c[r][v], b[v], a);
    }
  }
#pragma clang loop unroll(full)
  for (int r = 0; r < kR; ++r)
#pragma clang loop unroll(full)
    for (int v = 0; v < kCV; ++v) fjk_store(C + r * ldc + 16 * v, c[r][v]);
}

#if defined(__AVX512F__)
static constexpr int kFjbRows = 4;  // 4 x 4 accumulators (6 x 4 measured no faster)
#else
static constexpr int kFjbRows = 2;  // AVX2 / SSE: a 16-lane vector takes 2-4 registers
#endif

template <typename Op, int W, int kR>
static inline void fjb_gemm_rows(int kdim, const typename Op::elem* A, fj_i64 asi, fj_i64 ask,
                                 const typename Op::elem* B, fj_i64 ldb, float* C, fj_i64 ldc, bool acc) {
  constexpr int kV = W / 16, kFull = kV / 4, kRem = kV % 4;
  FJK_ROLLED_LOOP
  for (int c = 0; c < kFull; ++c)
    fjb_gemm_block<Op, 4, kR>(kdim, A, asi, ask, B + 64 * c, ldb, C + 64 * c, ldc, acc);
  if constexpr (kRem > 0)
    fjb_gemm_block<Op, kRem, kR>(kdim, A, asi, ask, B + 64 * kFull, ldb, C + 64 * kFull, ldc, acc);
}

// Rows in blocks of kFjbRows, then blocks of 2, then single rows.
template <int W, typename Op = FjbF32>
__attribute__((noinline)) static void fjb_gemm(int rows, int kdim, const typename Op::elem* A, fj_i64 asi,
                                               fj_i64 ask, const typename Op::elem* B, fj_i64 ldb, float* C,
                                               fj_i64 ldc, bool acc) {
  static_assert(W % 16 == 0, "whole vectors");
  int r = 0;
  FJK_ROLLED_LOOP
  for (; r + kFjbRows <= rows; r += kFjbRows)
    fjb_gemm_rows<Op, W, kFjbRows>(kdim, A + r * asi, asi, ask, B, ldb, C + r * ldc, ldc, acc);
  if constexpr (kFjbRows > 2) {
    FJK_ROLLED_LOOP
    for (; r + 2 <= rows; r += 2) fjb_gemm_rows<Op, W, 2>(kdim, A + r * asi, asi, ask, B, ldb, C + r * ldc, ldc, acc);
  }
  FJK_ROLLED_LOOP
  for (; r < rows; ++r) fjb_gemm_rows<Op, W, 1>(kdim, A + r * asi, asi, ask, B, ldb, C + r * ldc, ldc, acc);
}

// ---- bf16 products on vdpbf16ps / BFDOT (FLEXJIT_BWD_DPBF16, bf16 inputs on hosts with
// AVX512-BF16, or Arm's FEAT_BF16) ----
// The same products with the reduced dimension taken two at a time: a B row holds 16 lanes of
// bf16 PAIRS (dwords) and A is read as one pair per step, so one vdpbf16ps (four 128-bit BFDOTs
// on Arm, which pair their operands the same way: cpu/common.h fjk_bfdot16) does two
// multiply-adds per lane. Q, K, V and dO are bf16 already (exact); P and dS are rounded to bf16
// for the products, as FlashAttention does; every sum stays fp32.
#ifndef FLEXJIT_BWD_DPBF16
#define FLEXJIT_BWD_DPBF16 0
#endif
#if FLEXJIT_BWD_DPBF16
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FJB_DP_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define FJB_DP_X86 0
#else
#error "the backward's bf16 dot products need AVX512-BF16 + AVX512-BW (x86) or FEAT_BF16 (Arm)"
#endif
#if FLEXJIT_DTYPE != 1
#error "the backward's bf16 dot products need bf16 inputs"
#endif
typedef unsigned fjb_u32;
typedef unsigned short fjb_v16h_u __attribute__((vector_size(32), aligned(2)));
typedef unsigned fjb_v16u_u __attribute__((vector_size(64), aligned(4)));
static constexpr int kDPairs = (HEAD_DIM + 1) / 2, kDVPairs = (HEAD_DIM_V + 1) / 2;
static constexpr int kMPairs = (BLOCK_M + 1) / 2, kNPairs = kNP / 2;

// The operands of fjb_gemm with bf16 pairs: kdim counts pairs; one vdpbf16ps per A pair and B
// vector does two multiply-adds per lane.
struct FjbBf16Pairs {
  typedef fjb_u32 elem;
#if FJB_DP_X86
  typedef __bf16 vec __attribute__((vector_size(64)));
  static vec load(const elem* p) { return __builtin_bit_cast(vec, *(const fj_v16u*)p); }
  static fj_v16f madd(fj_v16f c, vec b, elem a) {
    return __builtin_ia32_dpbf16ps_512(c, b, __builtin_bit_cast(vec, (fj_v16u){} + a));
  }
#else
  typedef fj_v16u vec;
  static vec load(const elem* p) { return *(const fj_v16u*)p; }
  static fj_v16f madd(fj_v16f c, vec b, elem a) { return fjk_bfdot16(c, b, (fj_v16u){} + a); }
#endif
};

// dst[r][p] = (src[r][2p], src[r][2p + 1]) for r < rows, p < (width + 1) / 2 (an odd width's last
// partner 0): bf16 rows as pairs, the A operand of S and dP.
__attribute__((noinline)) static void fjb_pack_pairs(const unsigned short* src, fj_i64 s_row, fj_i64 s_col, int rows,
                                                     int width, int dst_stride, fjb_u32* __restrict dst) {
  FJK_SCALAR_LOOP
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < (width + 1) / 2; ++p) {
      const unsigned lo = src[r * s_row + 2 * p * s_col];
      const unsigned hi = 2 * p + 1 < width ? src[r * s_row + (2 * p + 1) * s_col] : 0u;
      dst[r * dst_stride + p] = lo | (hi << 16);
    }
}

// dst[p][c] = (src[2p][c], src[2p + 1][c]) for c < width (lanes up to dst_stride 0), a row past
// `rows` 0: bf16 rows interleaved in pairs, the B operand when the reduction runs over rows.
__attribute__((noinline)) static void fjb_pack_row_pairs(const unsigned short* src, fj_i64 s_row, fj_i64 s_col,
                                                         int rows, int width, int dst_stride,
                                                         fjb_u32* __restrict dst) {
  const int vec = s_col == 1 ? width / 16 * 16 : 0;
  FJK_ROLLED_LOOP
  for (int p = 0; p < (rows + 1) / 2; ++p) {
    const unsigned short* r0 = src + 2 * p * s_row;
    const unsigned short* r1 = r0 + s_row;
    const bool has1 = 2 * p + 1 < rows;
    fjb_u32* d = dst + p * dst_stride;
    FJK_ROLLED_LOOP
    for (int c = 0; c < vec; c += 16) {
      const fj_v16u lo = __builtin_convertvector(*(const fjb_v16h_u*)(r0 + c), fj_v16u);
      const fj_v16u hi = has1 ? __builtin_convertvector(*(const fjb_v16h_u*)(r1 + c), fj_v16u) : (fj_v16u){};
      *(fj_v16u*)(d + c) = lo | (hi << 16);
    }
    FJK_SCALAR_LOOP
    for (int c = vec; c < width; ++c)
      d[c] = (unsigned)r0[c * s_col] | ((has1 ? (unsigned)r1[c * s_col] : 0u) << 16);
    FJK_SCALAR_LOOP
    for (int c = width; c < dst_stride; ++c) d[c] = 0;
  }
}

// dst[p][n] = (src[n][2p], src[n][2p + 1]) for n < rows (lanes [rows, kNP) 0): a KV block
// transposed in pairs, the B operand of S (K) and dP (V). Once per KV block of a unit.
__attribute__((noinline)) static void fjb_pack_t_pairs(const unsigned short* src, fj_i64 s_row, fj_i64 s_col, int rows,
                                                       int width, fjb_u32* __restrict dst) {
  const int pairs = (width + 1) / 2;
  if (rows < kNP) __builtin_memset(dst, 0, sizeof(fjb_u32) * pairs * kNP);
  FJK_SCALAR_LOOP
  for (int n = 0; n < rows; ++n)
    for (int p = 0; p < pairs; ++p) {
      const unsigned lo = src[n * s_row + 2 * p * s_col];
      const unsigned hi = 2 * p + 1 < width ? src[n * s_row + (2 * p + 1) * s_col] : 0u;
      dst[p * kNP + n] = lo | (hi << 16);
    }
}

// dst[p][n] = (bf16 x[2p][n], bf16 x[2p + 1][n]) for p < (rows + 1) / 2 (a row past `rows` 0), x
// fp32 [m][kNP]: P or dS as the A operand of dV / dK (read with asi 1, ask kNP). Per 16 lanes:
// one two-vector convert (round to nearest even) and one interleaving word permute.
static inline void fjb_pack_f32_row_pairs(const float* __restrict x, int rows, fjb_u32* __restrict dst) {
  FJK_ROLLED_LOOP
  for (int p = 0; p < (rows + 1) / 2; ++p) {
    const bool has1 = 2 * p + 1 < rows;
    FJK_ROLLED_LOOP
    for (int i = 0; i < kNP / 16; ++i) {
      const fj_v16f lo = fjk_load(x + 2 * p * kNP + 16 * i);
      const fj_v16f hi = has1 ? fjk_load(x + (2 * p + 1) * kNP + 16 * i) : fjk_splat(0.0f);
      const fj_v32h both = fjk_cvt2_bf16(hi, lo);
      *(fj_v32h*)(dst + p * kNP + 16 * i) = __builtin_shufflevector(
          both, both, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12,
          28, 13, 29, 14, 30, 15, 31);
    }
  }
}

// dst[m][p] = (bf16 x[m][2p], bf16 x[m][2p + 1]) for m < rows: dS rows in pairs of keys, the A
// operand of dQ. Words 0-15 of the convert are the low vector's, so consecutive words pair up.
static inline void fjb_pack_f32_pairs(const float* __restrict x, int rows, fjb_u32* __restrict dst) {
  FJK_ROLLED_LOOP
  for (int m = 0; m < rows; ++m) {
    FJK_ROLLED_LOOP
    for (int i = 0; i < kNP / 16; i += 2) {
      const fj_v16f lo = fjk_load(x + m * kNP + 16 * i);
      const fj_v16f hi = i + 1 < kNP / 16 ? fjk_load(x + m * kNP + 16 * (i + 1)) : fjk_splat(0.0f);
      const fj_v16u w = __builtin_bit_cast(fj_v16u, fjk_cvt2_bf16(hi, lo));
      fjb_u32* d = dst + m * kNPairs + 8 * i;
      if (i + 1 < kNP / 16) *(fjb_v16u_u*)d = w;
      else for (int j = 0; j < 8; ++j) d[j] = w[j];
    }
  }
}
#endif  // FLEXJIT_BWD_DPBF16

// ---- packing ----

// dst[r][c] = fp32(src[r * s_row + c * s_col]) * mul for r < rows, c < width; columns
// [width, dst_stride) and rows [rows, pad_rows) are zeroed. Contiguous rows convert 16 at a time.
__attribute__((noinline)) static void fjb_pack_rows(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col,
                                                    int rows, int width, float mul, int dst_stride,
                                                    int pad_rows, float* __restrict dst) {
  const int vec = s_col == 1 ? width / 16 * 16 : 0;
  FJK_ROLLED_LOOP
  for (int r = 0; r < rows; ++r) {
    const fjk_elem* s = src + r * s_row;
    float* d = dst + r * dst_stride;
    FJK_ROLLED_LOOP
    for (int c = 0; c < vec; c += 16) fjk_store(d + c, fjk_load16(s + c) * mul);
    FJK_SCALAR_LOOP
    for (int c = vec; c < width; ++c) d[c] = fjk_to_f32(s[c * s_col]) * mul;
    FJK_SCALAR_LOOP
    for (int c = width; c < dst_stride; ++c) d[c] = 0.0f;
  }
  if (rows < pad_rows) __builtin_memset(dst + rows * dst_stride, 0, sizeof(float) * (pad_rows - rows) * dst_stride);
}

// Transposed: dst[c][n] = fp32(src[n * s_row + c * s_col]) for n < rows (lanes [rows, kNP) 0).
// Once per KV block of a unit, so a plain scalar transpose.
__attribute__((noinline)) static void fjb_pack_t(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col, int rows,
                                                 int width, float* __restrict dst) {
  if (rows < kNP) __builtin_memset(dst, 0, sizeof(float) * width * kNP);
  FJK_SCALAR_LOOP
  for (int n = 0; n < rows; ++n) {
    const fjk_elem* s = src + n * s_row;
    FJK_SCALAR_LOOP
    for (int c = 0; c < width; ++c) dst[c * kNP + n] = fjk_to_f32(s[c * s_col]);
  }
}

static inline const fjk_elem* fjb_row(const void* base, const fj_i64* st, fj_i64 b, fj_i64 h, fj_i64 i) {
  return (const fjk_elem*)base + b * st[0] + h * st[1] + i * st[2];
}

// ---- pass 0: delta = rowsum(dout * out) (- dlse) ----
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
    // A gradient of the lse adds P dlse to dS' (d lse / d score = P): folded into delta.
    if (a->dlse != nullptr) s -= a->dlse[b * a->dlse_strides[0] + h * a->dlse_strides[1] + i * a->dlse_strides[2]];
    a->delta[(b * a->Hq + h) * a->Lq + i] = s;
  }
}

// ---- the block lists of one mask row ----
// Calls visit(pos, partial) for every sub-block (of size `step`) of the mask blocks (of size
// `mask_block`) listed in row `row` of m (partial list, then full), positions below `limit`;
// without a block mask every sub-block of [0, limit), partial iff has_mask_mod.
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

// ---- pass 1 scratch: one KV block, one visiting q-block ----
struct FjbTile {
  alignas(64) float dk[BLOCK_N * kDP];      // dK rows (fp32 products: unit scale Q)
  alignas(64) float dv[BLOCK_N * kDVP];     // dV rows
#if !FLEXJIT_BWD_DPBF16                     // the fp32 products' operands
  alignas(64) float kp[BLOCK_N * kDP];      // K rows
  alignas(64) float kt[HEAD_DIM * kNP];     // K^T
  alignas(64) float vt[HEAD_DIM_V * kNP];   // V^T
  alignas(64) float qr[BLOCK_M * kDP];      // Q rows * scale
  alignas(64) float dor[BLOCK_M * kDVP];    // dO rows
#endif
  alignas(64) float s[BLOCK_M * kNP];       // S, then P
  alignas(64) float ds[BLOCK_M * kNP];      // dP, then dS
  alignas(64) float sraw[BLOCK_M * kNP];    // S as score_mod saw it (natural scale)
  fj_v16i key_valid[kNP / 16];              // lane n < nvalid
#if FLEXJIT_BWD_DPBF16
  alignas(64) fjb_u32 ktb[kDPairs * kNP];   // K^T in pairs [d/2][n]
  alignas(64) fjb_u32 vtb[kDVPairs * kNP];  // V^T in pairs [dv/2][n]
  alignas(64) fjb_u32 kib[kNPairs * kDP];   // K rows interleaved in pairs [n/2][d]
  alignas(64) fjb_u32 qb[BLOCK_M * kDPairs];   // Q rows in pairs [m][d/2] (unscaled)
  alignas(64) fjb_u32 dob[BLOCK_M * kDVPairs]; // dO rows in pairs [m][dv/2]
  alignas(64) fjb_u32 qib[kMPairs * kDP];   // Q rows interleaved in pairs [m/2][d]
  alignas(64) fjb_u32 doib[kMPairs * kDVP]; // dO rows interleaved in pairs [m/2][dv]
  alignas(64) fjb_u32 pb[kMPairs * kNP];    // P in pairs of rows [m/2][n]
  alignas(64) fjb_u32 dsbt[kMPairs * kNP];  // dS in pairs of rows [m/2][n]
  alignas(64) fjb_u32 dsb[BLOCK_M * kNPairs];  // dS rows in pairs of keys [m][n/2]
#endif
};
static_assert(sizeof(struct FjbTile) <= (3 << 19), "backward scratch exceeds 1.5 MiB of stack");
// With vdpbf16ps Q is packed unscaled (bf16 pairs), so dK takes the scale on the way out.
static constexpr bool kFjbDkScaled = !FLEXJIT_BWD_DPBF16;

// dQ partial tile of a q-block: rows [m][kDP].
static inline float* fjb_dq_part(const struct FlexBackwardArgs* a, fj_i64 chunk, fj_i64 b, fj_i64 hq, fj_i64 mb) {
  const fj_i64 nmb = (a->Lq + BLOCK_M - 1) / BLOCK_M;
  return a->dq_part + (((chunk * a->B + b) * a->Hq + hq) * nmb + mb) * (BLOCK_M * kDP);
}

// One (q-block at q0 of head hq, KV block at kv0) pair: S, P, dP, dS in the tile, then the three
// accumulations. partial: evaluate mask_mod.
static void fjb_pair(const struct FlexBackwardArgs* a, struct FjbTile* t, fj_i64 b, fj_i64 hq, fj_i64 q0,
                     fj_i64 kv0, int nvalid, bool partial, fj_i64 chunk) {
  const int mvalid = a->Lq - q0 < BLOCK_M ? (int)(a->Lq - q0) : BLOCK_M;
  alignas(64) float lse2[BLOCK_M], delta[BLOCK_M];
  bool any_row = false;
  FJK_SCALAR_LOOP
  for (int m = 0; m < mvalid; ++m) {
    const float l = a->lse[b * a->lse_strides[0] + hq * a->lse_strides[1] + (q0 + m) * a->lse_strides[2]];
    // A row with lse = -inf (fully masked: out 0) or NaN gets P = 2^(s - inf) = 0: no gradient.
    lse2[m] = l > FJK_NEG_INF ? l * FJK_LOG2E : __builtin_inff();
    any_row |= l > FJK_NEG_INF;
    delta[m] = a->delta[(b * a->Hq + hq) * a->Lq + q0 + m];
  }
  if (!any_row) return;
#if FLEXJIT_BWD_DPBF16
  // S = scale (Q K^T), the products on bf16 pairs
  fjb_pack_pairs((const unsigned short*)fjb_row(a->q, a->q_strides, b, hq, q0), a->q_strides[2], a->q_strides[3],
                 mvalid, HEAD_DIM, kDPairs, t->qb);
  fjb_gemm<kNP, FjbBf16Pairs>(mvalid, kDPairs, t->qb, kDPairs, 1, t->ktb, kNP, t->s, kNP, false);
  FJK_ROLLED_LOOP
  for (int m = 0; m < mvalid; ++m)
    for (int i = 0; i < kNP / 16; ++i) fjk_store(t->s + m * kNP + 16 * i, fjk_load(t->s + m * kNP + 16 * i) * a->scale);
#else
  fjb_pack_rows(fjb_row(a->q, a->q_strides, b, hq, q0), a->q_strides[2], a->q_strides[3], mvalid, HEAD_DIM,
                a->scale, kDP, 0, t->qr);
  // S = (scale Q) K^T
  fjb_gemm<kNP>(mvalid, HEAD_DIM, t->qr, kDP, 1, t->kt, kNP, t->s, kNP, false);
#endif
  const bool score_mod = a->apply_mods != nullptr && a->has_score_mod;
  const bool mask = partial && a->apply_mods != nullptr && a->has_mask_mod;
  if (score_mod && a->apply_grad != nullptr) __builtin_memcpy(t->sraw, t->s, sizeof(float) * mvalid * kNP);
  if (!score_mod) {  // apply_mods takes base-2 scores without a score_mod
    FJK_ROLLED_LOOP
    for (int m = 0; m < mvalid; ++m)
      for (int i = 0; i < kNP / 16; ++i) fjk_store(t->s + m * kNP + 16 * i, fjk_load(t->s + m * kNP + 16 * i) * FJK_LOG2E);
  }
  if (score_mod || mask) {
    struct FlexModTile tile;  // keys along the unit stride (the decode layout)
    tile.s = t->s;
    tile.ld = 1;
    tile.ld_m = kNP;
    tile.b = b;
    tile.h = hq;
    tile.q0 = q0;
    tile.kv0 = kv0;
    tile.mvalid = mvalid;
    tile.nvalid = nvalid;
    tile.mask = mask ? 1 : 0;
    a->apply_mods(&tile, &a->mod);
  }
  // P = 2^(s - lse2), 0 on masked scores, rows that take no gradient and keys past the block.
  fj_v16i any = {};
  FJK_ROLLED_LOOP
  for (int m = 0; m < mvalid; ++m)
    for (int i = 0; i < kNP / 16; ++i) {
      fj_v16f p = fjk_exp2(fjk_load(t->s + m * kNP + 16 * i) - lse2[m]);
      p = t->key_valid[i] ? p : fjk_splat(0.0f);
      fjk_store(t->s + m * kNP + 16 * i, p);
      any |= p > 0.0f;
    }
  if (!fjk_any(any)) return;
  // dP = dO V^T, then dS' = P (dP - delta).
#if FLEXJIT_BWD_DPBF16
  fjb_pack_pairs((const unsigned short*)fjb_row(a->dout, a->dout_strides, b, hq, q0), a->dout_strides[2],
                 a->dout_strides[3], mvalid, HEAD_DIM_V, kDVPairs, t->dob);
  fjb_gemm<kNP, FjbBf16Pairs>(mvalid, kDVPairs, t->dob, kDVPairs, 1, t->vtb, kNP, t->ds, kNP, false);
#else
  fjb_pack_rows(fjb_row(a->dout, a->dout_strides, b, hq, q0), a->dout_strides[2], a->dout_strides[3], mvalid,
                HEAD_DIM_V, 1.0f, kDVP, 0, t->dor);
  fjb_gemm<kNP>(mvalid, HEAD_DIM_V, t->dor, kDVP, 1, t->vt, kNP, t->ds, kNP, false);
#endif
  FJK_ROLLED_LOOP
  for (int m = 0; m < mvalid; ++m)
    for (int i = 0; i < kNP / 16; ++i) {
      float* d = t->ds + m * kNP + 16 * i;
      const fj_v16f p = fjk_load(t->s + m * kNP + 16 * i);
      // p = 0 must give 0 even where dP is not finite (masked keys of a non-finite V row).
      fjk_store(d, p == 0.0f ? fjk_splat(0.0f) : p * (fjk_load(d) - delta[m]));
    }
  if (score_mod && a->apply_grad != nullptr) {
    struct FlexModGradTile gt;
    gt.s = t->sraw;
    gt.ds = t->ds;
    gt.ld = 1;
    gt.ld_m = kNP;
    gt.b = b;
    gt.h = hq;
    gt.q0 = q0;
    gt.kv0 = kv0;
    gt.mvalid = mvalid;
    gt.nvalid = nvalid;
    a->apply_grad(&gt, &a->mod, a->grad);
  }
#if FLEXJIT_BWD_DPBF16
  const int mpairs = (mvalid + 1) / 2, npairs = (nvalid + 1) / 2;
  fjb_pack_f32_row_pairs(t->s, mvalid, t->pb);
  fjb_pack_f32_row_pairs(t->ds, mvalid, t->dsbt);
  fjb_pack_f32_pairs(t->ds, mvalid, t->dsb);
  fjb_pack_row_pairs((const unsigned short*)fjb_row(a->q, a->q_strides, b, hq, q0), a->q_strides[2],
                     a->q_strides[3], mvalid, HEAD_DIM, kDP, t->qib);
  fjb_pack_row_pairs((const unsigned short*)fjb_row(a->dout, a->dout_strides, b, hq, q0), a->dout_strides[2],
                     a->dout_strides[3], mvalid, HEAD_DIM_V, kDVP, t->doib);
  fjb_gemm<kDVP, FjbBf16Pairs>(nvalid, mpairs, t->pb, 1, kNP, t->doib, kDVP, t->dv, kDVP, true);   // dV += P^T dO
  fjb_gemm<kDP, FjbBf16Pairs>(nvalid, mpairs, t->dsbt, 1, kNP, t->qib, kDP, t->dk, kDP, true);    // dK += dS^T Q
  fjb_gemm<kDP, FjbBf16Pairs>(mvalid, npairs, t->dsb, kNPairs, 1, t->kib, kDP, fjb_dq_part(a, chunk, b, hq, q0 / BLOCK_M),
                  kDP, true);                                                          // dQ += dS K
#else
  fjb_gemm<kDVP>(nvalid, mvalid, t->s, 1, kNP, t->dor, kDVP, t->dv, kDVP, true);  // dV += P^T dO
  fjb_gemm<kDP>(nvalid, mvalid, t->ds, 1, kNP, t->qr, kDP, t->dk, kDP, true);     // dK += dS^T (scale Q)
  fjb_gemm<kDP>(mvalid, nvalid, t->ds, kNP, 1, t->kp, kDP, fjb_dq_part(a, chunk, b, hq, q0 / BLOCK_M), kDP,
                true);                                                               // dQ += dS K
#endif
}

// ---- pass 1: one KV block of a unit: dK, dV of its rows ----
static void fjb_kv_block(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 hkv, fj_i64 nb, fj_i64 chunk,
                         struct FjbTile* t) {
  const fj_i64 kv0 = nb * BLOCK_N;
  const int nvalid = a->Lkv - kv0 < BLOCK_N ? (int)(a->Lkv - kv0) : BLOCK_N;
  const fjk_elem* k = fjb_row(a->k, a->k_strides, b, hkv, kv0);
  const fjk_elem* v = fjb_row(a->v, a->v_strides, b, hkv, kv0);
#if FLEXJIT_BWD_DPBF16
  const unsigned short* kh = (const unsigned short*)k;
  fjb_pack_t_pairs(kh, a->k_strides[2], a->k_strides[3], nvalid, HEAD_DIM, t->ktb);
  fjb_pack_t_pairs((const unsigned short*)v, a->v_strides[2], a->v_strides[3], nvalid, HEAD_DIM_V, t->vtb);
  fjb_pack_row_pairs(kh, a->k_strides[2], a->k_strides[3], nvalid, HEAD_DIM, kDP, t->kib);
  if (nvalid < kNP)  // key pairs past the block read zeros
    __builtin_memset(t->kib + (nvalid + 1) / 2 * kDP, 0, sizeof(fjb_u32) * (kNPairs - (nvalid + 1) / 2) * kDP);
#else
  fjb_pack_rows(k, a->k_strides[2], a->k_strides[3], nvalid, HEAD_DIM, 1.0f, kDP, BLOCK_N, t->kp);
  fjb_pack_t(k, a->k_strides[2], a->k_strides[3], nvalid, HEAD_DIM, t->kt);
  fjb_pack_t(v, a->v_strides[2], a->v_strides[3], nvalid, HEAD_DIM_V, t->vt);
#endif
  for (int i = 0; i < kNP / 16; ++i) t->key_valid[i] = fjk_iota() + (float)(16 * i) < (float)nvalid;
  __builtin_memset(t->dk, 0, sizeof(t->dk));
  __builtin_memset(t->dv, 0, sizeof(t->dv));
  const struct FlexBlockMaskArgs* m = &a->mask_t;
  for (fj_i64 g = 0; g < GQA_GROUP; ++g) {
    const fj_i64 hq = hkv * GQA_GROUP + g;
    fj_i64 row = 0;
    if (m->kv_num_blocks != nullptr) {
      const fj_i64 mb = m->B == 1 ? 0 : b, mh = m->H == 1 ? 0 : hq;
      row = (mb * m->H + mh) * m->q_blocks + kv0 / m->kv_block_size;
    }
    fjb_walk(a, m, row, m->q_block_size, BLOCK_M, a->Lq,
             [&](fj_i64 q0, bool partial) { fjb_pair(a, t, b, hq, q0, kv0, nvalid, partial, chunk); });
  }
  float* dk = a->dk + ((b * a->Hkv + hkv) * a->Lkv + kv0) * HEAD_DIM;
  float* dv = a->dv + ((b * a->Hkv + hkv) * a->Lkv + kv0) * HEAD_DIM_V;
  FJK_SCALAR_LOOP
  for (int n = 0; n < nvalid; ++n) {
    for (int d = 0; d < HEAD_DIM; ++d) dk[n * HEAD_DIM + d] = kFjbDkScaled ? t->dk[n * kDP + d] : t->dk[n * kDP + d] * a->scale;
    for (int d = 0; d < HEAD_DIM_V; ++d) dv[n * HEAD_DIM_V + d] = t->dv[n * kDVP + d];
  }
}

__attribute__((noinline)) static void fjb_kv_unit(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 hkv,
                                                  fj_i64 chunk) {
  struct FjbTile t;
  const fj_i64 nnb = (a->Lkv + BLOCK_N - 1) / BLOCK_N;
  for (fj_i64 nb = chunk * nnb / a->kv_chunks; nb < (chunk + 1) * nnb / a->kv_chunks; ++nb)
    fjb_kv_block(a, b, hkv, nb, chunk, &t);
}

// ---- pass 2: dQ of one q-block (b, hq, m_block): the chunks' partials, summed in order ----
static void fjb_dq_item(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 hq, fj_i64 mb) {
  const fj_i64 q0 = mb * BLOCK_M;
  const int mvalid = a->Lq - q0 < BLOCK_M ? (int)(a->Lq - q0) : BLOCK_M;
  float* dq = a->dq + ((b * a->Hq + hq) * a->Lq + q0) * HEAD_DIM;
  alignas(64) float sum[kDP];
  FJK_ROLLED_LOOP
  for (int m = 0; m < mvalid; ++m) {
    for (int i = 0; i < kDP / 16; ++i) fjk_store(sum + 16 * i, fjk_splat(0.0f));
    for (fj_i64 c = 0; c < a->kv_chunks; ++c) {
      const float* p = fjb_dq_part(a, c, b, hq, mb) + m * kDP;
      for (int i = 0; i < kDP / 16; ++i) fjk_store(sum + 16 * i, fjk_load(sum + 16 * i) + fjk_load(p + 16 * i));
    }
    FJK_SCALAR_LOOP
    for (int d = 0; d < HEAD_DIM; ++d) dq[m * HEAD_DIM + d] = sum[d] * a->scale;
  }
}

// ---- pass 0: delta, and zeroed dQ partials ----
static void fjb_prepare_item(const struct FlexBackwardArgs* a, fj_i64 b, fj_i64 hq, fj_i64 mb) {
  fjb_delta_item(a, b, hq, mb);
  for (fj_i64 c = 0; c < a->kv_chunks; ++c)
    __builtin_memset(fjb_dq_part(a, c, b, hq, mb), 0, sizeof(float) * BLOCK_M * kDP);
}

extern "C" void FLEXJIT_ENTRY(const struct FlexBackwardArgs* a, fj_i64 begin, fj_i64 end) {
  if (a->pass == 1) {
    for (fj_i64 unit = begin; unit < end; ++unit) {
      const fj_i64 bh = unit / a->kv_chunks;
      fjb_kv_unit(a, bh / a->Hkv, bh % a->Hkv, unit % a->kv_chunks);
    }
    return;
  }
  const fj_i64 nmb = (a->Lq + BLOCK_M - 1) / BLOCK_M;
  for (fj_i64 item = begin; item < end; ++item) {
    const fj_i64 bh = item / nmb;
    if (a->pass == 0) fjb_prepare_item(a, bh / a->Hq, bh % a->Hq, item % nmb);
    else fjb_dq_item(a, bh / a->Hq, bh % a->Hq, item % nmb);
  }
}

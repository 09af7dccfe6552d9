// The bf16 dot-product engine of the CPU prefill kernel: Q K^T and P V on AVX512-BF16's
// vdpbf16ps (pairs of bf16 products summed into fp32 lanes), for hosts with AVX512-BF16 and no
// usable AMX (AMD Zen 4 / Zen 5, Intel Cooper Lake). Preceded by cpu/prefill_item.h, followed by
// the driver cpu/flash_prefill.h, which calls the engine interface at the end.
//
// It keeps the FMA engine's transposed layout (query rows along the 16 fp32 lanes; S^T, P^T and
// O^T are rows of BLOCK_M floats) and its register-blocked outer products, with one change:
// every vector lane holds a PAIR of bf16 along the reduced dimension, and one vdpbf16ps does
// two multiply-adds per lane. So the reduced dimension advances two at a time:
//   qv  Q in pairs [d/2][m]: the dword (Q[m][2p], Q[m][2p+1]); unscaled (bf16 products are
//       exact in fp32; the driver applies the scale to the fp32 scores)
//   kb  K [n][d/2] dwords: bf16 rows as they are (a dword is already the pair (K[n][2p],
//       K[n][2p+1])), zero padded to an even D; broadcast one dword at a time
//   pb  P in pairs [n/2][m]: the dword (P[m][2p], P[m][2p+1]), P^T rounded to bf16
//   vb  V in pairs [n/2][dv]: the dword (V[2p][dv], V[2p+1][dv]); broadcast one at a time
// so that
//   S^T[n][m]  += sum_p  qv[p][m] . kb[n][p]      (kMVC vector loads, kNG broadcasts per p)
//   O^T[dv][m] += sum_p  pb[p][m] . vb[p][dv]     (kMVC vector loads, kDG broadcasts per p)
// where "." is one lane of vdpbf16ps. As in the AMX engine P is rounded to bf16 for P V only;
// the row sums l use the fp32 P. vdpbf16ps flushes denormal inputs and results to zero (the
// instruction's definition); bf16 products are exact in fp32, so sums differ from the FMA
// engine's by accumulation order and P's rounding only.

#if FLEXJIT_DTYPE != 1
#error "the vdpbf16ps engine is bf16 only"
#endif
// x86: AVX512-BF16's vdpbf16ps. Arm (FEAT_BF16: Neoverse V1 / N2 / V2, Graviton 3 and 4):
// BFDOT, whose lanes pair their operands the same way (lane i += a[2i] b[2i] + a[2i+1] b[2i+1]),
// four 128-bit BFDOTs per 16-lane step; the layout, packing and driver are shared.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FJK_DP_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define FJK_DP_X86 0
#else
#error "the bf16 dot-product engine needs AVX512-BF16 + AVX512-BW (x86) or FEAT_BF16 (Arm)"
#endif

typedef unsigned fjk_u32;
typedef unsigned short fj_v32h_u __attribute__((vector_size(64), aligned(2)));
typedef __bf16 fj_v32bf __attribute__((vector_size(64)));                     // vdpbf16ps operand

// ---- tile geometry (all compile time; kMP, kMV and the register blocking: cpu/prefill_lanes.h) ----
static constexpr int kDPairs = (HEAD_DIM + 1) / 2;    // Q K^T's reduction steps
static constexpr int kNPairs = (BLOCK_N + 1) / 2;     // P V's reduction steps (whole block)
static constexpr int kNG = fjk_pick_group(BLOCK_N);
static constexpr int kNP = fjk_round_up(BLOCK_N, kNG);      // KV rows computed per block
static constexpr int kDG = fjk_pick_group(HEAD_DIM_V);
static constexpr int kDVP = fjk_round_up(HEAD_DIM_V, kDG);  // output features computed

static constexpr int kKS = fjk_row_stride(kDPairs);
static constexpr int kVS = fjk_row_stride(kDVP);

// Per-thread scratch, on the stack of the entry (no heap, no statics).
struct FjkTile {
  alignas(64) fjk_u32 qv[kDPairs * kMP];  // Q pairs [p][m]; rows m >= Lq are 0
  alignas(64) float st[kNP * kMP];        // S^T then P^T [n][m]
  alignas(64) fjk_u32 pb[kNPairs * kMP];  // P pairs [p][m], bf16
  alignas(64) float ot[kDVP * kMP];       // O^T [dv][m], unnormalised
  alignas(64) fjk_u32 kb[kNP * kKS];      // K block [n][p]; rows >= nvalid are 0
  alignas(64) fjk_u32 vb[kNPairs * kVS];  // V block pairs [p][dv]; features >= Dv are 0
  fj_v16f m[kMV];      // running row max of the base-2 scores (-inf: nothing seen yet)
  fj_v16f l[kMV];      // running row sum of 2^(s - m)
  fj_v16i valid[kMV];  // lane is a real query row (q_idx < Lq)
};
static_assert(sizeof(struct FjkTile) <= (1 << 20), "tile scratch exceeds 1 MiB of stack");

// acc += a . b with b one dword broadcast to every lane: vdpbf16ps zmm, zmm, m32{1to16}; on Arm
// four BFDOTs (by quarters: bfdot v.4s, v.8h, v.8h).
#if FJK_DP_X86
static inline fj_v16f fjk_dp(fj_v16f acc, fj_v16u a, fjk_u32 b) {
  return __builtin_ia32_dpbf16ps_512(acc, __builtin_bit_cast(fj_v32bf, a),
                                     __builtin_bit_cast(fj_v32bf, (fj_v16u){} + b));
}
#else
static inline fj_v16f fjk_dp(fj_v16f acc, fj_v16u a, fjk_u32 b) { return fjk_bfdot16(acc, a, (fj_v16u){} + b); }
#endif
static inline fj_v16u fjk_load_u(const fjk_u32* p) { return *(const fj_v16u*)p; }  // aligned

// ---- packing ----

// qv[p][m] = (Q[m][2p], Q[m][2p + 1]) for the valid rows; padding rows (and the odd D's last
// high half) are 0. Once per work item, so a plain scalar transpose.
static inline void fjk_pack_q_pairs(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                    fjk_u32* __restrict qv) {
  const int mvalid = it->mvalid;
  const fj_i64 s_col = a->q_strides[3];
  if (mvalid < kMP) __builtin_memset(qv, 0, sizeof(fjk_u32) * kDPairs * kMP);
  FJK_SCALAR_LOOP
  for (int m = 0; m < mvalid; ++m) {
    const fjk_elem* row = fjk_q_row(a, it, m);
    FJK_SCALAR_LOOP
    for (int p = 0; p < kDPairs; ++p) {
      const fjk_u32 hi = 2 * p + 1 < HEAD_DIM ? row[(2 * p + 1) * s_col] : 0;
      qv[p * kMP + m] = row[2 * p * s_col] | hi << 16;
    }
  }
}

// kb[n][p] = (K[n][2p], K[n][2p + 1]) for n < nvalid (a row copy when K's rows are contiguous);
// rows [nvalid, BLOCK_N) are zeroed, so a register group may read past the end of Lkv.
__attribute__((noinline)) static void fjk_pack_k(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col,
                                                 int nvalid, fjk_u32* __restrict kb) {
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n) {
    unsigned short* d = (unsigned short*)(kb + n * kKS);
    const fjk_elem* s = src + n * s_row;
    if (s_col == 1) {
      FJK_ROLLED_LOOP
      for (int c = 0; c + 32 <= HEAD_DIM; c += 32) *(fj_v32h_u*)(d + c) = *(const fj_v32h_u*)(s + c);
      FJK_SCALAR_LOOP
      for (int c = HEAD_DIM / 32 * 32; c < HEAD_DIM; ++c) d[c] = s[c];
    } else {
      FJK_SCALAR_LOOP
      for (int c = 0; c < HEAD_DIM; ++c) d[c] = s[c * s_col];
    }
    if (HEAD_DIM % 2) d[HEAD_DIM] = 0;
  }
  if (nvalid < BLOCK_N)
    __builtin_memset(kb + nvalid * kKS, 0, sizeof(fjk_u32) * (BLOCK_N - nvalid) * kKS);
}

// vb[p][dv] = (V[2p][dv], V[2p + 1][dv]) for the pairs p < ceil(nvalid / 2); the missing partner
// of an odd nvalid is 0 (its P is 0 too, but 0 * garbage could be NaN).
__attribute__((noinline)) static void fjk_pack_v(const fjk_elem* src, fj_i64 s_row, fj_i64 s_col,
                                                 int nvalid, fjk_u32* __restrict vb) {
  const int pairs = (nvalid + 1) / 2;
  if (s_col == 1) {
    // Two rows of 32 features interleave into 32 dwords (two vectors): one shuffle each.
    constexpr int kVec = HEAD_DIM_V / 32 * 32;
    const fj_v32h zero = {};
    FJK_ROLLED_LOOP
    for (int p = 0; p < pairs; ++p) {
      const fjk_elem* r0 = src + (2 * p) * s_row;
      const fjk_elem* r1 = r0 + s_row;
      const bool has1 = 2 * p + 1 < nvalid;
      fjk_u32* d = vb + p * kVS;
      FJK_ROLLED_LOOP
      for (int c = 0; c < kVec; c += 32) {
        const fj_v32h x = *(const fj_v32h_u*)(r0 + c);
        const fj_v32h y = has1 ? *(const fj_v32h_u*)(r1 + c) : zero;
        *(fj_v32h*)(d + c) = __builtin_shufflevector(
            x, y, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11,
            43, 12, 44, 13, 45, 14, 46, 15, 47);
        *(fj_v32h*)(d + c + 16) = __builtin_shufflevector(
            x, y, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56, 25, 57,
            26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63);
      }
      FJK_SCALAR_LOOP
      for (int c = kVec; c < HEAD_DIM_V; ++c)
        d[c] = (fjk_u32)r0[c] | (has1 ? (fjk_u32)r1[c] << 16 : 0u);
    }
    return;
  }
  FJK_SCALAR_LOOP
  for (int p = 0; p < pairs; ++p) {
    const fjk_elem* r0 = src + (2 * p) * s_row;
    const bool has1 = 2 * p + 1 < nvalid;
    FJK_SCALAR_LOOP
    for (int c = 0; c < HEAD_DIM_V; ++c)
      vb[p * kVS + c] = (fjk_u32)r0[c * s_col] | (has1 ? (fjk_u32)r0[s_row + c * s_col] << 16 : 0u);
  }
}

// pb[p][m] = (bf16 P^T[2p][m], bf16 P^T[2p + 1][m]) for p < ceil(nvalid / 2); the partner row
// of an odd nvalid is 0. Per 16 rows of m: two loads, one two-vector convert (round to nearest
// even) and one interleaving word permute.
static inline void fjk_pack_p(const float* __restrict st, int nvalid, fjk_u32* __restrict pb) {
  const int pairs = (nvalid + 1) / 2;
  FJK_ROLLED_LOOP
  for (int p = 0; p < pairs; ++p) {
    const float* r0 = st + 2 * p * kMP;
    const bool has1 = 2 * p + 1 < nvalid;
    FJK_ROLLED_LOOP
    for (int i = 0; i < kMV; ++i) {
      const fj_v16f lo = fjk_load(r0 + 16 * i);
      const fj_v16f hi = has1 ? fjk_load(r0 + kMP + 16 * i) : fjk_splat(0.0f);
      // The second operand converts into the low half: words 0-15 = lo, 16-31 = hi.
      const fj_v32h both = fjk_cvt2_bf16(hi, lo);
      *(fj_v32h*)(pb + p * kMP + 16 * i) = __builtin_shufflevector(
          both, both, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
          11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    }
  }
}

// ---- S^T = K Q^T, register-blocked ----
// kNG KV rows x kMVC query vectors: per pair p, kMVC vector loads of qv[p], kNG dword
// broadcasts of kb[n][p], kNG * kMVC vdpbf16ps; the accumulators stay in registers over all p.
static inline void fjk_qk_group(const fjk_u32* __restrict qv, const fjk_u32* __restrict kb,
                                float* __restrict st, const FjkPrefetchShare<HEAD_DIM>& pf) {
  FJK_ROLLED_LOOP
  for (int c = 0; c < kMV; c += kMVC) {  // one pass for BLOCK_M <= 64
    fj_v16f acc[kNG][kMVC];
#pragma clang loop unroll(full)
    for (int j = 0; j < kNG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) acc[j][i] = fjk_splat(0.0f);
    const fjk_u32* qp = qv + 16 * c;  // qv[p][c..], kb[0][p]: advanced one pair per step
    const fjk_u32* kp = kb;
    FJK_ROLLED_LOOP
    for (int p = 0; p < kDPairs; ++p, qp += kMP, ++kp) {
      pf.step(c / kMVC * kDPairs + p);
      fj_v16u q[kMVC];
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) q[i] = fjk_load_u(qp + 16 * i);
#pragma clang loop unroll(full)
      for (int j = 0; j < kNG; ++j) {
        const fjk_u32 k = kp[j * kKS];
#pragma clang loop unroll(full)
        for (int i = 0; i < kMVC; ++i) acc[j][i] = fjk_dp(acc[j][i], q[i], k);
      }
    }
#pragma clang loop unroll(full)
    for (int j = 0; j < kNG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) fjk_store(st + j * kMP + 16 * (c + i), acc[j][i]);
  }
}

// ---- O^T = O^T * alpha + V^T P^T, register-blocked ----
// kDG output features x kMVC query vectors: per pair p of KV rows, kMVC vector loads of pb[p],
// kDG dword broadcasts of vb[p][dv], kDG * kMVC vdpbf16ps.
static inline void fjk_pv_group(const fjk_u32* __restrict pb, const fjk_u32* __restrict vb,
                                float* __restrict ot, const fj_v16f* alpha, int pairs,
                                const FjkPrefetchShare<HEAD_DIM_V>& pf) {
  FJK_ROLLED_LOOP
  for (int c = 0; c < kMV; c += kMVC) {
    fj_v16f acc[kDG][kMVC];
#pragma clang loop unroll(full)
    for (int j = 0; j < kDG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i)
        acc[j][i] = fjk_load(ot + j * kMP + 16 * (c + i)) * alpha[c + i];
    const fjk_u32* pp = pb + 16 * c;  // pb[p][c..], vb[p][0]: advanced one pair per step
    const fjk_u32* vp = vb;
    FJK_ROLLED_LOOP
    for (int p = 0; p < pairs; ++p, pp += kMP, vp += kVS) {
      pf.step(c / kMVC * pairs + p);
      fj_v16u pv[kMVC];
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) pv[i] = fjk_load_u(pp + 16 * i);
#pragma clang loop unroll(full)
      for (int j = 0; j < kDG; ++j) {
        const fjk_u32 v = vp[j];
#pragma clang loop unroll(full)
        for (int i = 0; i < kMVC; ++i) acc[j][i] = fjk_dp(acc[j][i], pv[i], v);
      }
    }
#pragma clang loop unroll(full)
    for (int j = 0; j < kDG; ++j)
#pragma clang loop unroll(full)
      for (int i = 0; i < kMVC; ++i) fjk_store(ot + j * kMP + 16 * (c + i), acc[j][i]);
  }
}

// ---- the engine interface (what cpu/flash_prefill.h calls) ----

// Scores come out of fjk_block_scores as raw q.k; the driver applies qscale.
static constexpr bool kFjkScoresScaled = false;

// Once per entry call: the padding the kernels compute with but packing never writes. K rows
// [BLOCK_N, kNP) and V features [Dv, kDVP) must hold finite values (zeros).
static inline void fjk_engine_begin(struct FjkTile* t) {
  __builtin_memset(t->kb + BLOCK_N * kKS, 0, sizeof(fjk_u32) * (kNP - BLOCK_N) * kKS);
  if (kVS > HEAD_DIM_V) {
    FJK_SCALAR_LOOP
    for (int p = 0; p < kNPairs; ++p)
      __builtin_memset(t->vb + p * kVS + HEAD_DIM_V, 0, sizeof(fjk_u32) * (kVS - HEAD_DIM_V));
  }
}
static inline void fjk_engine_end(struct FjkTile* t) { (void)t; }

// Once per work item: Q pairs (unscaled) and O = 0.
static inline void fjk_item_begin(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                  struct FjkTile* t) {
  fjk_pack_q_pairs(a, it, t->qv);
  __builtin_memset(t->ot, 0, sizeof(t->ot));
}

// S^T rows [0, nvalid) (raw q.k) for the KV block at kv0, in whole groups (rows past nvalid are
// computed from zeroed K rows and never read); prefetches the K block at next_kv0 (-1: none).
static inline void fjk_block_scores(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                    struct FjkTile* t, fj_i64 kv0, int nvalid, fj_i64 next_kv0) {
  fjk_pack_k(it->k + kv0 * a->k_strides[2], a->k_strides[2], a->k_strides[3], nvalid, t->kb);
  const struct FjkPrefetch pf =
      fjk_prefetch_plan(it->k, a->k_strides[2], a->k_strides[3], next_kv0, it->lkv);
  FJK_ROLLED_LOOP
  for (int g = 0; g * kNG < nvalid; ++g) {
    const FjkPrefetchShare<HEAD_DIM> share(&pf, g * kNG, kNG);
    fjk_qk_group(t->qv, t->kb + g * kNG * kKS, t->st + g * kNG * kMP, share);
  }
}

// O = O * alpha + P V with P^T in st rows [0, nvalid); prefetches the V block at next_kv0.
static inline void fjk_block_pv(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                struct FjkTile* t, const fj_v16f* alpha, fj_i64 kv0, int nvalid,
                                fj_i64 next_kv0) {
  fjk_pack_p(t->st, nvalid, t->pb);
  fjk_pack_v(it->v + kv0 * a->v_strides[2], a->v_strides[2], a->v_strides[3], nvalid, t->vb);
  const struct FjkPrefetch pf =
      fjk_prefetch_plan(it->v, a->v_strides[2], a->v_strides[3], next_kv0, it->lkv);
  const int pairs = (nvalid + 1) / 2;
  constexpr int kGroups = kDVP / kDG, kRowsPerGroup = (BLOCK_N + kGroups - 1) / kGroups;
  FJK_ROLLED_LOOP
  for (int g = 0; g < kGroups; ++g) {
    const FjkPrefetchShare<HEAD_DIM_V> share(&pf, g * kRowsPerGroup, kRowsPerGroup);
    fjk_pv_group(t->pb, t->vb + g * kDG, t->ot + g * kDG * kMP, alpha, pairs, share);
  }
}

// out[row m] = O[m] * inv_l[m] for the item's rows.
static inline void fjk_item_write_out(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                      const struct FjkTile* t, const float* inv_l) {
  fjk_write_out_t(a, it, t->ot, inv_l);
}

// CUDA forward (prefill) flash attention with FlexAttention score_mod / mask_mod, FA2-style, on
// tensor cores (mma.sync m16n8k16, bf16 or fp16 operands, fp32 accumulation), for sm_80+.
//
// Preceded in the translation unit by the spec macros (FLEXJIT_DTYPE 1 = bf16 / 2 = fp16,
// HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, GQA_GROUP, FLEXJIT_KV_STAGES, FLEXJIT_ENTRY),
// templates/mod_abi.h, templates/cuda/abi.cuh, templates/cuda/common.cuh (PTX wrappers, tile
// loader), the generated mod body (jit/codegen, Backend::Cuda: flexjit_score_mod /
// flexjit_mask_mod are inlined here, unlike on CPU), templates/cuda/flash_block.cuh (the
// per-block steps below, shared with the decode kernel) and templates/cuda/prefill_walk.cuh (the
// KV blocks a CTA visits and the epilogue, shared with the wgmma engine, flash_prefill_wgmma.cuh).
// Header-free: NVRTC compiles it without include paths.
//
// One CTA = BLOCK_M query rows of one (b, h); FLEXJIT_WARPS warps, each owning BLOCK_M / warps
// rows (one or two m16 tiles). The
// steps per visited KV block of BLOCK_N keys are the CPU driver's (templates/cpu/flash_prefill.h)
// with the same names:
//   S   = Q K^T                     (mma; Q and K from shared memory through ldmatrix)
//   S   = score_mod(scale S), mask  (-inf where masked, where kv_idx >= Lkv or q_idx >= Lq)
//   m'  = max(m, rowmax S)          (base 2: scores carry log2 e)
//   P   = 2^(S - m'),  alpha = 2^(m - m')
//   l   = l * alpha + rowsum P,  O = O * alpha + P V   (P re-packed from the S accumulators
//                                                      into A fragments; V through ldmatrix.trans)
// and at the end out = O / l, lse = ln 2 * (m + log2 l); a row with no kept key writes 0 and
// -inf. K and V tiles stream global -> shared with cp.async (zero-filled past Lkv and past D),
// FLEXJIT_KV_STAGES deep (2: the next block loads while this one computes).

#if !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || !defined(BLOCK_M) || !defined(BLOCK_N) || \
    !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY) || !defined(FLEXJIT_DTYPE) ||             \
    !defined(FLEXJIT_KV_STAGES) || !defined(FLEXJIT_WARPS)
#error "flash_prefill.cuh needs the spec macros defined before it"
#endif

// FLEXJIT_WARPS warps, each owning kMT m16 tiles (16 kMT consecutive query rows): two tiles per
// warp read each K / V fragment from shared memory once for both (FA2's 128-row, 4-warp tile).
static constexpr int kWarps = FLEXJIT_WARPS;
static constexpr int kMT = BLOCK_M / (16 * kWarps);
static constexpr int kThreads = kWarps * 32;
static_assert(kMT >= 1 && kMT * 16 * kWarps == BLOCK_M, "BLOCK_M = 16 x warps x tiles per warp");
static constexpr int kDP = (HEAD_DIM + 15) / 16 * 16;    // Q K^T reduction, whole k-steps
static constexpr int kDVP = (HEAD_DIM_V + 15) / 16 * 16;  // P V output width, whole pairs of tiles
// Shared-memory row strides in elements: one 16-byte chunk of padding puts the 8 rows an
// ldmatrix reads on distinct banks.
static constexpr int kQS = kDP + 8;
static constexpr int kKS = kDP + 8;
static constexpr int kVS = kDVP + 8;
static constexpr int kNT = BLOCK_N / 8;  // 8-column tiles of S
static constexpr int kOT = kDVP / 8;     // 8-column tiles of O
static_assert(BLOCK_M % 16 == 0 && BLOCK_M >= 16 && BLOCK_M <= 128, "BLOCK_M: 16..128, whole warps");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N >= 16, "BLOCK_N: a multiple of 16");
static_assert(HEAD_DIM % 8 == 0 && HEAD_DIM_V % 8 == 0, "D and Dv: multiples of 8 (16-byte rows)");
static_assert(FLEXJIT_KV_STAGES == 1 || FLEXJIT_KV_STAGES == 2, "1 or 2 K/V stages");

// Dynamic shared memory the launch must provide (the runtime reads it off the spec).
static constexpr int kSmemBytes =
    2 * (BLOCK_M * kQS + FLEXJIT_KV_STAGES * BLOCK_N * (kKS + kVS));

// ---- tiles global -> shared ----
// Rows [0, kRows) of a row-major [*, kWidthReal] matrix (row stride s_row elements, rows
// 16-byte aligned): fjc_load_rows by the whole CTA.
template <int kRows, int kWidthPad, int kWidthReal, int kStride>
FJC_DEV void fjc_load_tile(fjc_u16* dst, const fjc_u16* src, fj_i64 s_row, fj_i64 valid_rows) {
  fjc_load_rows<kRows, kWidthPad, kWidthReal, kStride, kThreads>(
      dst, [&](int r) { return src + r * s_row; }, valid_rows, (int)threadIdx.x, src);
}

// ---- the kernel ----
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    FLEXJIT_ENTRY(const __grid_constant__ struct FlexCudaPrefillArgs a) {
  FJC_DYNAMIC_SMEM(fjc_smem_raw);
  fjc_u16* const sQ = (fjc_u16*)fjc_smem_raw;
  fjc_u16* const sK = sQ + BLOCK_M * kQS;
  fjc_u16* const sV = sK + FLEXJIT_KV_STAGES * BLOCK_N * kKS;
  __shared__ int mod_error;    // the mods' out-of-range flag, raised once per CTA
  __shared__ int range_error;  // a block mask's count or index out of range

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const struct FjcPrefillCta cta = fjc_prefill_cta(a);
  const fj_i64 b = cta.b, h = cta.h, q0 = cta.q0;
  const fjc_u16 *const q = cta.q, *const k = cta.k, *const v = cta.v;

  if (threadIdx.x == 0) mod_error = range_error = 0;
  __syncthreads();  // the flags are zero before anyone may raise them
  const struct FlexModArgs mod = fjc_prefill_mod_args(a, &mod_error);

  const struct FjcWalk walk = fjc_walk(a, b, h, q0, &range_error);
  fjc_load_tile<BLOCK_M, kDP, HEAD_DIM, kQS>(sQ, q, a.q_strides[2], a.Lq - q0);
  auto load_kv = [&](int i, int stage) {
    bool partial;
    const fj_i64 kv0 = fjc_block_at(walk, i, &partial);
    const fj_i64 rows = a.Lkv - kv0;
    fjc_load_tile<BLOCK_N, kDP, HEAD_DIM, kKS>(sK + stage * BLOCK_N * kKS, k + kv0 * a.k_strides[2],
                                               a.k_strides[2], rows);
    fjc_load_tile<BLOCK_N, kDVP, HEAD_DIM_V, kVS>(sV + stage * BLOCK_N * kVS, v + kv0 * a.v_strides[2],
                                                  a.v_strides[2], rows);
  };
  if (walk.total > 0) load_kv(0, 0);
  fjc_cp_async_commit();

  // This thread's rows of each of the warp's m16 tiles: lo = lane / 4 and lo + 8.
  const int r_lo = lane / 4;
  const fj_i64 warp_q0 = q0 + warp * 16 * kMT;
  float o[kMT][kOT][4];
  float m_run[kMT][2];  // running row max, base 2
  float l_run[kMT][2];  // this thread's share of the running row sum
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int t = 0; t < kOT; ++t) o[mt][t][0] = o[mt][t][1] = o[mt][t][2] = o[mt][t][3] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = FJC_NEG_INF;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }

  for (int i = 0; i < walk.total; ++i) {
    const int cur = FLEXJIT_KV_STAGES == 2 ? (i & 1) : 0;
    if (FLEXJIT_KV_STAGES == 2 && i + 1 < walk.total) {
      load_kv(i + 1, cur ^ 1);  // overlaps this block's math
      fjc_cp_async_commit();
      fjc_cp_async_wait<1>();
    } else {
      fjc_cp_async_wait<0>();
    }
    __syncthreads();

    bool partial;
    const fj_i64 kv0 = fjc_block_at(walk, i, &partial);
    const fj_i64 nvalid = a.Lkv - kv0;  // keys of this block (BLOCK_N or fewer); <= 0: none
    if (nvalid > 0) {
      const fjc_u16* sKc = sK + cur * BLOCK_N * kKS;
      const fjc_u16* sVc = sV + cur * BLOCK_N * kVS;

      float s[kMT][kNT][4];
      fjc_block_scores<kMT, kNT, kDP, kQS, kKS>(s, sQ + warp * 16 * kMT * kQS, sKc, lane);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const fj_i64 q_idx = warp_q0 + mt * 16 + r_lo + 8 * r;
          fjc_block_softmax_row<kNT, kOT>(s[mt], o[mt], m_run[mt][r], l_run[mt][r], r, q_idx < a.Lq, b, h, q_idx, kv0,
                                          nvalid, partial, a.scale, &mod, lane);
        }
      fjc_block_pv<kMT, kNT, kOT, kVS>(o, s, sVc, lane);
    }
    __syncthreads();  // this stage is overwritten by the load of block i + 2 (or i + 1)
    if (FLEXJIT_KV_STAGES == 1 && i + 1 < walk.total) {
      load_kv(i + 1, 0);
      fjc_cp_async_commit();
    }
  }

  // Epilogue: out = O / l, lse = ln 2 (m + log2 l); l = 0 (no key kept) gives 0 and -inf.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
    fjc_prefill_store_rows<kOT>(o[mt], m_run[mt], l_run[mt], warp_q0 + mt * 16 + r_lo, lane, a, b, h);
  __syncthreads();
  fjc_prefill_report(a, mod_error, range_error);
}

// CUDA forward (prefill) flash attention with FlexAttention score_mod / mask_mod, FA2-style, on
// tensor cores (mma.sync m16n8k16, bf16 or fp16 operands, fp32 accumulation), for sm_80+.
//
// Preceded in the translation unit by the spec macros (FLEXJIT_DTYPE 1 = bf16 / 2 = fp16,
// HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, GQA_GROUP, FLEXJIT_KV_STAGES, FLEXJIT_ENTRY),
// templates/mod_abi.h, templates/cuda/abi.cuh, templates/cuda/common.cuh (PTX wrappers, tile
// loader), the generated mod body (jit/codegen, Backend::Cuda: flexjit_score_mod /
// flexjit_mask_mod are inlined here, unlike on CPU) and templates/cuda/flash_block.cuh (the
// per-block steps below, shared with the decode kernel).
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

// ---- the KV blocks a CTA visits, in order ----
// Without a block mask: every BLOCK_N block, partial when there is a mask_mod. With one: the
// listed partial blocks of this CTA's mask row, then its full blocks, each split into
// kv_block_size / BLOCK_N sub-blocks (BLOCK_N divides kv_block_size, BLOCK_M q_block_size).
struct FjcWalk {
  const int* idx;       // partial blocks' indices (null: no block mask)
  const int* full_idx;  // full blocks' indices
  int count, full_count, sub;
  fj_i64 kv_block_size, kv_blocks, past_end;  // past_end: a key start no block reaches
  int total;
  int* range_error;  // set for counts or indices outside the mask's shape
};
FJC_DEV struct FjcWalk fjc_walk(const struct FlexCudaPrefillArgs& a, fj_i64 b, fj_i64 h, fj_i64 q0, int* range_error) {
  struct FjcWalk w;
  w.range_error = range_error;
  w.past_end = a.Lkv;
  w.kv_blocks = 0;
  if (a.mask.kv_num_blocks == nullptr) {
    w.idx = w.full_idx = nullptr;
    w.count = w.full_count = 0;
    w.sub = 1;
    w.kv_block_size = BLOCK_N;
    w.total = (int)((a.Lkv + BLOCK_N - 1) / BLOCK_N);
    return w;
  }
  const fj_i64 mb = a.mask.B == 1 ? 0 : b, mh = a.mask.H == 1 ? 0 : h;
  const fj_i64 row = (mb * a.mask.H + mh) * a.mask.q_blocks + q0 / a.mask.q_block_size;
  w.idx = a.mask.kv_indices + row * a.mask.kv_indices_stride;
  w.count = fjc_clamp_count(a.mask.kv_num_blocks[row], a.mask.kv_indices_stride, range_error);
  w.full_idx = a.mask.full_kv_num_blocks ? a.mask.full_kv_indices + row * a.mask.full_kv_indices_stride : nullptr;
  w.full_count = a.mask.full_kv_num_blocks
                     ? fjc_clamp_count(a.mask.full_kv_num_blocks[row], a.mask.full_kv_indices_stride, range_error)
                     : 0;
  w.kv_block_size = a.mask.kv_block_size;
  w.kv_blocks = a.mask.kv_blocks;
  w.sub = (int)(a.mask.kv_block_size / BLOCK_N);
  w.total = (w.count + w.full_count) * w.sub;
  return w;
}
// Block i of the walk: its first key and whether mask_mod is evaluated on it.
FJC_DEV fj_i64 fjc_block_at(const struct FjcWalk& w, int i, bool* partial) {
  if (w.idx == nullptr) {
    *partial = FLEXJIT_HAS_MASK_MOD != 0;
    return (fj_i64)i * BLOCK_N;
  }
  const int j = i / w.sub, s = i % w.sub;
  *partial = j < w.count;
  const int blk = j < w.count ? w.idx[j] : w.full_idx[j - w.count];
  if (blk < 0 || blk >= w.kv_blocks) {  // skipped: no key of the call starts there
    *w.range_error = 1;
    return w.past_end;
  }
  return (fj_i64)blk * w.kv_block_size + (fj_i64)s * BLOCK_N;
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
  const fj_i64 b = blockIdx.z, h = blockIdx.y, q0 = (fj_i64)blockIdx.x * BLOCK_M;
  const fj_i64 hkv = h / GQA_GROUP, bk = a.Bkv == 1 ? 0 : b;
  const fjc_u16* q = (const fjc_u16*)a.q + b * a.q_strides[0] + h * a.q_strides[1] + q0 * a.q_strides[2];
  const fjc_u16* k = (const fjc_u16*)a.k + bk * a.k_strides[0] + hkv * a.k_strides[1];
  const fjc_u16* v = (const fjc_u16*)a.v + bk * a.v_strides[0] + hkv * a.v_strides[1];

  if (threadIdx.x == 0) mod_error = range_error = 0;
  __syncthreads();  // the flags are zero before anyone may raise them
  struct FlexModArgs mod;
  mod.buffers = a.buffers;
  mod.params = a.params;
  mod.error_flag = &mod_error;

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
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const fj_i64 q_idx = warp_q0 + mt * 16 + r_lo + 8 * r;
      if (q_idx >= a.Lq) continue;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      fjc_u16* orow = (fjc_u16*)a.out + b * a.out_strides[0] + h * a.out_strides[1] + q_idx * a.out_strides[2];
#pragma unroll
      for (int t = 0; t < kOT; ++t) {
        const int col = t * 8 + (lane % 4) * 2;
        if (col < HEAD_DIM_V) {  // Dv is a multiple of 8: col + 1 is in range too
          orow[col] = fjc_to_elem(o[mt][t][2 * r] * inv);
          orow[col + 1] = fjc_to_elem(o[mt][t][2 * r + 1] * inv);
        }
      }
      if (a.lse != nullptr && lane % 4 == 0)
        a.lse[b * a.lse_strides[0] + h * a.lse_strides[1] + q_idx * a.lse_strides[2]] =
            l > 0.0f ? fjc_kLn2 * (m_run[mt][r] + log2f(l)) : FJC_NEG_INF;
    }
  __syncthreads();
  if (threadIdx.x == 0 && (mod_error || range_error) && a.error_flag != nullptr)
    atomicOr(a.error_flag, (mod_error ? 1 : 0) | (range_error ? 2 : 0));
}

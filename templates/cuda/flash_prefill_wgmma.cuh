// CUDA forward (prefill) flash attention with FlexAttention score_mod / mask_mod on Hopper's
// warpgroup MMA (wgmma.mma_async, sm_90a): the wgmma engine of the prefill kernel, beside the
// mma.sync one (templates/cuda/flash_prefill.cuh) whose steps, walk and epilogue it shares.
//
// Preceded by the spec macros (FLEXJIT_DTYPE 1 = bf16 / 2 = fp16, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
// BLOCK_N, GQA_GROUP, FLEXJIT_KV_STAGES, FLEXJIT_WARPS, FLEXJIT_WGMMA, FLEXJIT_ENTRY),
// templates/mod_abi.h, cuda/abi.cuh, cuda/common.cuh, cuda/wgmma.cuh (descriptors, the wgmma
// wrappers, the swizzled tile loader), the generated mod body, cuda/flash_block.cuh (the per-row
// mods + online-softmax step) and cuda/prefill_walk.cuh. Header-free for NVRTC.
//
// One CTA = BLOCK_M query rows of one (b, h) = BLOCK_M / 64 warpgroups, each owning 64 rows; the
// warpgroups share the K / V tiles. Per visited KV block of BLOCK_N keys:
//   S  = Q K^T         wgmma m64n{BLOCK_N}k16, Q and K from shared memory (K-major descriptors),
//                      HEAD_DIM / 16 k-steps accumulated in registers
//   S  = score_mod(scale S), mask; m', P, alpha, l, O *= alpha   (fjc_block_softmax_row: the
//                      accumulator layout is the mma.sync engine's, warp w holding rows 16 w..)
//   O += P V           wgmma m64n{HEAD_DIM_V}k16 with P from registers (the S accumulators
//                      re-packed as A fragments, as FA2 does for mma.sync) and V from shared
//                      memory (MN-major descriptor: no transpose pass)
// K and V stream global -> shared with cp.async, FLEXJIT_KV_STAGES deep, into the 128-byte
// swizzled layout wgmma.cuh describes; each thread fences its copies into the async proxy before
// the barrier that publishes a stage. Every wgmma batch is waited for before its registers are
// read (S) or rescaled (O), and before the barrier that releases its stage.
// Not (yet) done: overlapping one block's softmax with the next block's Q K^T inside a warpgroup
// (FA3's intra-warpgroup pipelining), TMA loads and warp specialisation; two warpgroups per CTA let
// the SM's schedulers overlap one's softmax with the other's MMAs.

#if !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || !defined(BLOCK_M) || !defined(BLOCK_N) || \
    !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY) || !defined(FLEXJIT_DTYPE) ||             \
    !defined(FLEXJIT_KV_STAGES) || !defined(FLEXJIT_WARPS) || !defined(FLEXJIT_WGMMA)
#error "flash_prefill_wgmma.cuh needs the spec macros defined before it"
#endif
#if FLEXJIT_DTYPE != 1 && FLEXJIT_DTYPE != 2
#error "the wgmma prefill engine takes bf16 or fp16"
#endif

static constexpr int kGroups = BLOCK_M / 64;  // warpgroups, 64 query rows each
static constexpr int kThreads = kGroups * 128;
static constexpr int kNT = BLOCK_N / 8;       // 8-column tiles of S
static constexpr int kOT = HEAD_DIM_V / 8;    // 8-column tiles of O
static_assert(BLOCK_M == 64 || BLOCK_M == 128, "wgmma engine: BLOCK_M 64 or 128 (one or two warpgroups)");
static_assert(FLEXJIT_WARPS == 4 * kGroups, "wgmma engine: four warps per warpgroup");
static_assert(BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 256, "wgmma engine: BLOCK_N 64, 128 or 256");
static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM <= 256, "wgmma engine: D a multiple of 64 up to 256");
static_assert(HEAD_DIM_V == 64 || HEAD_DIM_V == 128 || HEAD_DIM_V == 256, "wgmma engine: Dv 64, 128 or 256");
static_assert(FLEXJIT_KV_STAGES == 1 || FLEXJIT_KV_STAGES == 2, "1 or 2 K/V stages");

// Shared memory (elements), after up to 1024 bytes of alignment: Q [BLOCK_M x D], then per stage
// K [BLOCK_N x D] and V [BLOCK_N x Dv], each as 64-column swizzled atoms.
static constexpr int kQElems = BLOCK_M * HEAD_DIM;
static constexpr int kKElems = BLOCK_N * HEAD_DIM;
static constexpr int kVElems = BLOCK_N * HEAD_DIM_V;
static constexpr int kSmemBytes = 1024 + 2 * (kQElems + FLEXJIT_KV_STAGES * (kKElems + kVElems));

template <int kRows, int kWidth>
FJC_DEV void fjc_load_tile_sw(fjc_u16* dst, const fjc_u16* src, fj_i64 s_row, fj_i64 valid_rows) {
  fjc_load_rows_sw128<kRows, kWidth, kThreads>(
      dst, [&](int r) { return src + r * s_row; }, valid_rows, (int)threadIdx.x, src);
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    FLEXJIT_ENTRY(const __grid_constant__ struct FlexCudaPrefillArgs a) {
  FJC_DYNAMIC_SMEM(fjc_smem_raw);
  // The swizzle is a function of the shared address: tiles start 1024-byte aligned.
  fjc_u16* const sQ = (fjc_u16*)(fjc_smem_raw + ((1024u - (fjc_smem(fjc_smem_raw) & 1023u)) & 1023u));
  fjc_u16* const sK = sQ + kQElems;
  fjc_u16* const sV = sK + FLEXJIT_KV_STAGES * kKElems;
  __shared__ int mod_error;    // the mods' out-of-range flag, raised once per CTA
  __shared__ int range_error;  // a block mask's count or index out of range

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = warp / 4;
  const struct FjcPrefillCta cta = fjc_prefill_cta(a);
  const fj_i64 b = cta.b, h = cta.h, q0 = cta.q0;
  const fjc_u16 *const q = cta.q, *const k = cta.k, *const v = cta.v;

  if (threadIdx.x == 0) mod_error = range_error = 0;
  __syncthreads();  // the flags are zero before anyone may raise them
  const struct FlexModArgs mod = fjc_prefill_mod_args(a, &mod_error);

  const struct FjcWalk walk = fjc_walk(a, b, h, q0, &range_error);
  fjc_load_tile_sw<BLOCK_M, HEAD_DIM>(sQ, q, a.q_strides[2], a.Lq - q0);
  auto load_kv = [&](int i, int stage) {
    bool partial;
    const fj_i64 kv0 = fjc_block_at(walk, i, &partial);
    const fj_i64 rows = a.Lkv - kv0;
    fjc_load_tile_sw<BLOCK_N, HEAD_DIM>(sK + stage * kKElems, k + kv0 * a.k_strides[2], a.k_strides[2], rows);
    fjc_load_tile_sw<BLOCK_N, HEAD_DIM_V>(sV + stage * kVElems, v + kv0 * a.v_strides[2], a.v_strides[2], rows);
  };
  if (walk.total > 0) load_kv(0, 0);
  fjc_cp_async_commit();

  // Descriptors' fixed parts: this warpgroup's 64 Q rows (K-major), K (K-major), V (MN-major:
  // the next 64 output columns are BLOCK_N rows of 128 bytes further).
  const unsigned q_addr = fjc_smem(sQ) + group * 64 * 128;
  const unsigned k_addr = fjc_smem(sK), v_addr = fjc_smem(sV);

  const fj_i64 warp_q0 = q0 + warp * 16;  // this warp's 16 rows; the thread's are lane / 4 and + 8
  float o[kOT][4];
  float m_run[2] = {FJC_NEG_INF, FJC_NEG_INF};  // running row max, base 2
  float l_run[2] = {0.0f, 0.0f};                // this thread's share of the running row sum
#pragma unroll
  for (int t = 0; t < kOT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;

  for (int i = 0; i < walk.total; ++i) {
    const int cur = FLEXJIT_KV_STAGES == 2 ? (i & 1) : 0;
    if (FLEXJIT_KV_STAGES == 2 && i + 1 < walk.total) {
      load_kv(i + 1, cur ^ 1);  // overlaps this block's math
      fjc_cp_async_commit();
      fjc_cp_async_wait<1>();
    } else {
      fjc_cp_async_wait<0>();
    }
    fjc_fence_proxy_async();  // this thread's copies, visible to the tensor cores' reads
    __syncthreads();

    bool partial;
    const fj_i64 kv0 = fjc_block_at(walk, i, &partial);
    const fj_i64 nvalid = a.Lkv - kv0;  // keys of this block (BLOCK_N or fewer); <= 0: none
    if (nvalid > 0) {                   // the same for the whole CTA
      const unsigned kc = k_addr + cur * kKElems * 2, vc = v_addr + cur * kVElems * 2;

      // S = Q K^T: k-step kk reads atom kk / 4 of Q and K at byte 32 (kk % 4).
      float s[kNT][4];
#ifdef FLEXJIT_CUDA_EMULATION
#pragma unroll
      for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;  // scale-d 0 ignores them
#endif
      fjc_wgmma_hold(s);
      fjc_wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        const unsigned qa = q_addr + (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32;
        const unsigned ka = kc + (kk / 4) * BLOCK_N * 128 + (kk % 4) * 32;
        FjcWgmma<BLOCK_N>::template ss<0>(s, fjc_wgmma_desc(qa, 16, 1024), fjc_wgmma_desc(ka, 16, 1024), kk > 0 ? 1 : 0);
      }
      fjc_wgmma_commit();
      fjc_wgmma_wait<0>();
      fjc_wgmma_hold(s);

#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const fj_i64 q_idx = warp_q0 + lane / 4 + 8 * r;
        fjc_block_softmax_row<kNT, kOT>(s, o, m_run[r], l_run[r], r, q_idx < a.Lq, b, h, q_idx, kv0, nvalid, partial,
                                        a.scale, &mod, lane);
      }

      // O += P V: P's 16-key k-step kk is S tiles 2 kk and 2 kk + 1 as an A fragment; V's starts at
      // key row 16 kk of each atom.
      unsigned pa[BLOCK_N / 16][4];
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        pa[kk][0] = fjc_pack2(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = fjc_pack2(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = fjc_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = fjc_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      fjc_wgmma_hold(o);
      fjc_wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; ++kk)
        FjcWgmma<HEAD_DIM_V>::template rs<1>(o, pa[kk], fjc_wgmma_desc(vc + kk * 16 * 128, BLOCK_N * 128, 1024), 1);
      fjc_wgmma_commit();
      fjc_wgmma_wait<0>();
      fjc_wgmma_hold(o);
    }
    __syncthreads();  // this stage is overwritten by the load of block i + 2 (or i + 1)
    if (FLEXJIT_KV_STAGES == 1 && i + 1 < walk.total) {
      load_kv(i + 1, 0);
      fjc_cp_async_commit();
    }
  }

  fjc_prefill_store_rows<kOT>(o, m_run, l_run, warp_q0 + lane / 4, lane, a, b, h);
  __syncthreads();
  fjc_prefill_report(a, mod_error, range_error);
}

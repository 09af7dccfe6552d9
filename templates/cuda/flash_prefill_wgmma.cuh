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
//   S  = score_mod(scale S), mask; m', P, alpha, l, O *= alpha   (fjc_block_softmax_p: the
//                      accumulator layout is the mma.sync engine's, warp w holding rows 16 w..)
//   O += P V           wgmma m64n{HEAD_DIM_V}k16 with P from registers (the S accumulators
//                      re-packed as A fragments, as FA2 does for mma.sync) and V from shared
//                      memory (MN-major descriptor: no transpose pass)
// K and V stream global -> shared with cp.async, FLEXJIT_KV_STAGES deep, into the 128-byte
// swizzled layout wgmma.cuh describes; each thread fences its copies into the async proxy before
// the barrier that publishes a stage. Every wgmma batch is waited for before its registers are
// read (S) or rescaled (O), and before the barrier that releases its stage.
// FLEXJIT_KV_STAGES 3 is the pipelined schedule (USE_WGMMA=2; see its loop below). Not (yet) done:
// TMA loads, warp specialisation, ping-pong between the warpgroups; two warpgroups per CTA let the
// SM's schedulers overlap one's softmax with the other's MMAs.

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
static_assert(FLEXJIT_KV_STAGES >= 1 && FLEXJIT_KV_STAGES <= 3, "1 or 2 K/V stages, or 3: the pipelined schedule");

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

// The issue helpers below leave the fence to their caller: every register a batch of wgmma reads
// or accumulates into (S, O, P) is defined before one wgmma.fence that starts the batch, and nothing
// else defines them until the batch is waited for; otherwise ptxas serialises the MMAs (its C7513
// notice, which cuda_prefill_compile_test rejects).
FJC_DEV void fjc_start_batch(float (&s)[kNT][4]) {
#ifdef FLEXJIT_CUDA_EMULATION
#pragma unroll
  for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;  // scale-d 0 ignores them
#endif
  fjc_wgmma_hold(s);
}

// Issues S = Q K^T (one commit group) for the warpgroup's Q rows at shared address q_addr and the K
// tile at k_addr: k-step kk reads atom kk / 4 of each at byte 32 (kk % 4). s is the asynchronous
// MMA's until a wgmma wait covers the group.
FJC_DEV void fjc_issue_scores(float (&s)[kNT][4], unsigned q_addr, unsigned k_addr) {
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    const unsigned qa = q_addr + (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32;
    const unsigned ka = k_addr + (kk / 4) * BLOCK_N * 128 + (kk % 4) * 32;
    FjcWgmma<BLOCK_N>::template ss<0>(s, fjc_wgmma_desc(qa, 16, 1024), fjc_wgmma_desc(ka, 16, 1024), kk > 0 ? 1 : 0);
  }
  fjc_wgmma_commit();
}

// P (the softmax'ed S accumulators) as A fragments: 16-key k-step kk is S tiles 2 kk and 2 kk + 1.
FJC_DEV void fjc_pack_p(unsigned (&pa)[BLOCK_N / 16][4], const float (&s)[kNT][4]) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
    pa[kk][0] = fjc_pack2(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = fjc_pack2(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = fjc_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = fjc_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// Issues O += P V (one commit group) for the V tile at v_addr: k-step kk starts at key row 16 kk of
// each atom (MN-major, the next 64 output columns BLOCK_N rows of 128 bytes further).
FJC_DEV void fjc_issue_pv(float (&o)[kOT][4], const unsigned (&pa)[BLOCK_N / 16][4], unsigned v_addr) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk)
    FjcWgmma<HEAD_DIM_V>::template rs<1>(o, pa[kk], fjc_wgmma_desc(v_addr + kk * 16 * 128, BLOCK_N * 128, 1024), 1);
  fjc_wgmma_commit();
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

  // The mods + online softmax of KV block i on S (both of the thread's rows, S becomes P); alpha
  // gets the factors O's rows must be scaled by (now, or once O is no longer in flight).
  auto softmax = [&](float (&s)[kNT][4], int i, float (&alpha)[2]) {
    bool partial;
    const fj_i64 kv0 = fjc_block_at(walk, i, &partial);
    const fj_i64 nvalid = a.Lkv - kv0;  // keys of this block (BLOCK_N or fewer); <= 0: none (all -inf)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const fj_i64 q_idx = warp_q0 + lane / 4 + 8 * r;
      alpha[r] = fjc_block_softmax_p<kNT>(s, m_run[r], l_run[r], r, q_idx < a.Lq, b, h, q_idx, kv0, nvalid, partial,
                                          a.scale, &mod, lane);
    }
  };

#if FLEXJIT_KV_STAGES == 3
  // Pipelined (FA3's intra-warpgroup overlap): while O += P_i V_i runs on the tensor cores, the
  // warpgroup waits for S_{i+1} = Q K_{i+1}^T (issued just before) and runs block i + 1's mods and
  // softmax; O is scaled by block i + 1's alpha once P_i V_i is done. Three K/V stages: block i + 2
  // loads while blocks i (V) and i + 1 (K) are read.
  if (walk.total > 1) load_kv(1, 1);
  fjc_cp_async_commit();
  unsigned pa[BLOCK_N / 16][4];  // P of the block whose P V is issued next
  if (walk.total > 0) {
    fjc_cp_async_wait<1>();  // Q and block 0
    fjc_fence_proxy_async();
    __syncthreads();
    float s[kNT][4];
    fjc_start_batch(s);
    fjc_wgmma_fence();
    fjc_issue_scores(s, q_addr, k_addr);
    fjc_wgmma_wait<0>();
    fjc_wgmma_hold(s);
    float alpha[2];
    softmax(s, 0, alpha);  // O is 0: nothing to scale
    fjc_pack_p(pa, s);
  }
  // Blocks 0 .. total - 2: S of the next block and P V of this one in one batch (no branch inside
  // it), then the last block's P V alone.
  for (int i = 0; i + 1 < walk.total; ++i) {
    const int cur = i % 3, next = (i + 1) % 3;
    if (i + 2 < walk.total) load_kv(i + 2, (i + 2) % 3);  // the stage block i - 1 used, released below
    fjc_cp_async_commit();
    fjc_cp_async_wait<1>();  // block i + 1 is here
    fjc_fence_proxy_async();
    __syncthreads();
    float s[kNT][4];
    fjc_start_batch(s);
    fjc_wgmma_hold(o);
    fjc_wgmma_fence();  // one batch: S_{i+1} (its own group, waited for first), then P_i V_i
    fjc_issue_scores(s, q_addr, k_addr + next * kKElems * 2);
    fjc_issue_pv(o, pa, v_addr + cur * kVElems * 2);
    fjc_wgmma_wait<1>();  // S_{i+1} (P_i V_i may still run)
    fjc_wgmma_hold(s);
    float alpha[2];
    softmax(s, i + 1, alpha);
    fjc_wgmma_wait<0>();  // P_i V_i
    fjc_wgmma_hold(o);
    fjc_scale_row<kOT>(o, 0, alpha[0]);
    fjc_scale_row<kOT>(o, 1, alpha[1]);
    // P_{i+1} packed only now: written earlier, its registers (the compiler's pick, often P_i's
    // own) would change under the running P_i V_i, and ptxas would serialise the MMAs to keep it.
    fjc_pack_p(pa, s);
    __syncthreads();  // stage cur is free for block i + 3
  }
  if (walk.total > 0) {  // the last block's V is in place since the last barrier
    fjc_wgmma_hold(o);
    fjc_wgmma_fence();
    fjc_issue_pv(o, pa, v_addr + ((walk.total - 1) % 3) * kVElems * 2);
    fjc_wgmma_wait<0>();
    fjc_wgmma_hold(o);
  }
#else
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
    if (a.Lkv - kv0 > 0) {  // a block with keys (the same for the whole CTA)
      float s[kNT][4];
      fjc_start_batch(s);
      fjc_wgmma_fence();
      fjc_issue_scores(s, q_addr, k_addr + cur * kKElems * 2);
      fjc_wgmma_wait<0>();
      fjc_wgmma_hold(s);
      float alpha[2];
      softmax(s, i, alpha);
      fjc_scale_row<kOT>(o, 0, alpha[0]);
      fjc_scale_row<kOT>(o, 1, alpha[1]);
      unsigned pa[BLOCK_N / 16][4];
      fjc_pack_p(pa, s);
      fjc_wgmma_hold(o);
      fjc_wgmma_fence();
      fjc_issue_pv(o, pa, v_addr + cur * kVElems * 2);
      fjc_wgmma_wait<0>();
      fjc_wgmma_hold(o);
    }
    __syncthreads();  // this stage is overwritten by the load of block i + 2 (or i + 1)
    if (FLEXJIT_KV_STAGES == 1 && i + 1 < walk.total) {
      load_kv(i + 1, 0);
      fjc_cp_async_commit();
    }
  }
#endif

  fjc_prefill_store_rows<kOT>(o, m_run, l_run, warp_q0 + lane / 4, lane, a, b, h);
  __syncthreads();
  fjc_prefill_report(a, mod_error, range_error);
}

// What the CUDA prefill kernels (templates/cuda/flash_prefill.cuh, the mma.sync engine, and
// flash_prefill_wgmma.cuh, the sm_90a wgmma engine) share around their per-block steps: the KV
// blocks a CTA visits and the epilogue that writes a warp's rows. After the spec macros,
// templates/cuda/abi.cuh, common.cuh and flash_block.cuh; header-free for NVRTC.
#ifndef FLEXJIT_CUDA_PREFILL_WALK_H
#define FLEXJIT_CUDA_PREFILL_WALK_H

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

// ---- a CTA's place in the call ----
// (b, h, first query row) of this CTA (grid x = query blocks of BLOCK_M, y = Hq, z = B) and the
// bases of its q rows and of its KV head's k and v (head h / GQA_GROUP; a KV batch of 1 broadcast).
// Query blocks go last to first: CTAs start in blockIdx order, and under causal-like masks the
// last rows have the most keys, so the longest CTAs start first and the grid's tail is short ones.
struct FjcPrefillCta {
  fj_i64 b, h, q0;
  const fjc_u16* q;
  const fjc_u16* k;
  const fjc_u16* v;
};
FJC_DEV struct FjcPrefillCta fjc_prefill_cta(const struct FlexCudaPrefillArgs& a) {
  struct FjcPrefillCta c;
  c.b = blockIdx.z, c.h = blockIdx.y, c.q0 = (fj_i64)(gridDim.x - 1 - blockIdx.x) * BLOCK_M;
  const fj_i64 hkv = c.h / GQA_GROUP, bk = a.Bkv == 1 ? 0 : c.b;
  c.q = (const fjc_u16*)a.q + c.b * a.q_strides[0] + c.h * a.q_strides[1] + c.q0 * a.q_strides[2];
  c.k = (const fjc_u16*)a.k + bk * a.k_strides[0] + hkv * a.k_strides[1];
  c.v = (const fjc_u16*)a.v + bk * a.v_strides[0] + hkv * a.v_strides[1];
  return c;
}
// The mods' view of the launch: its buffers and params, and the CTA's shared error flag.
FJC_DEV struct FlexModArgs fjc_prefill_mod_args(const struct FlexCudaPrefillArgs& a, int* mod_error) {
  struct FlexModArgs mod;
  mod.buffers = a.buffers;
  mod.params = a.params;
  mod.error_flag = mod_error;
  return mod;
}
// After the CTA's last barrier: one thread ORs what the CTA saw into the launch's error flag.
FJC_DEV void fjc_prefill_report(const struct FlexCudaPrefillArgs& a, int mod_error, int range_error) {
  if (threadIdx.x == 0 && (mod_error || range_error) && a.error_flag != nullptr)
    atomicOr(a.error_flag, (mod_error ? 1 : 0) | (range_error ? 2 : 0));
}

// ---- the epilogue ----
// A thread's two rows (row0 = the q index of its lower row, lane / 4 of a 16-row tile; the other is
// row0 + 8) of a tile whose O accumulators are o: out = O / l, lse = ln 2 (m + log2 l) (natural
// log); l = 0 (no key kept) gives 0 and -inf. Rows past Lq are not written.
template <int kOT>
FJC_DEV void fjc_prefill_store_rows(const float (&o)[kOT][4], const float (&m_run)[2], const float (&l_run)[2],
                                    fj_i64 row0, int lane, const struct FlexCudaPrefillArgs& a, fj_i64 b, fj_i64 h) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const fj_i64 q_idx = row0 + 8 * r;
    if (q_idx >= a.Lq) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    fjc_u16* orow = (fjc_u16*)a.out + b * a.out_strides[0] + h * a.out_strides[1] + q_idx * a.out_strides[2];
#pragma unroll
    for (int t = 0; t < kOT; ++t) {
      const int col = t * 8 + (lane % 4) * 2;
      if (col < HEAD_DIM_V)  // Dv is a multiple of 8: col + 1 is in range too; rows are 16-byte aligned
        *(unsigned*)(orow + col) = fjc_pack2(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
    }
    if (a.lse != nullptr && lane % 4 == 0)
      a.lse[b * a.lse_strides[0] + h * a.lse_strides[1] + q_idx * a.lse_strides[2]] =
          l > 0.0f ? fjc_kLn2 * (m_run[r] + log2f(l)) : FJC_NEG_INF;
  }
}

#endif  // FLEXJIT_CUDA_PREFILL_WALK_H

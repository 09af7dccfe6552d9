// The ABI between the CUDA runtime (host C++) and the NVRTC-compiled CUDA kernels. Included by
// both, after templates/mod_abi.h, so it uses no system headers and only C-layout structs. Any
// change here changes every CUDA kernel's cache key (the template text is hashed).
#ifndef FLEXJIT_CUDA_ABI_H
#define FLEXJIT_CUDA_ABI_H

// Captured tensors and runtime scalars travel inside the launch's parameter block (passed by
// value as a __grid_constant__ kernel parameter): no device allocation and no host-to-device
// copy per call, which keeps a call capturable in a CUDA graph. These bound a mod set on CUDA.
#define FLEXJIT_CUDA_MAX_BUFFERS 8
#define FLEXJIT_CUDA_MAX_PARAMS 16

// One forward prefill launch on CUDA. Layouts as FlexPrefillArgs (mod_abi.h), strides in
// elements; the last dim of q, k and v is contiguous and every row starts 16-byte aligned (the
// runtime checks, or copies): q [B, Hq, Lq, D], k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv],
// out [B, Hq, Lq, Dv] (last dim contiguous), lse [B, Hq, Lq] fp32 natural log (null: not
// wanted). Query head h reads KV head h / GQA_GROUP. Grid: x = ceil(Lq / BLOCK_M) query blocks,
// y = Hq, z = B; one CTA of BLOCK_M / 16 warps per (b, h, query block).
struct FlexCudaPrefillArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  fj_i64 B, Hq, Hkv, Lq, Lkv, Bkv;
  fj_i64 q_strides[4];
  fj_i64 k_strides[4];
  fj_i64 v_strides[4];
  fj_i64 out_strides[4];
  fj_i64 lse_strides[3];
  float scale;  // multiplies q.k before score_mod
  struct FlexBlockMaskArgs mask;  // mask.kv_num_blocks == null: no block mask
  int* error_flag;                // device int, set to 1 by a mod's out-of-range buffer index
  struct FlexBuffer buffers[FLEXJIT_CUDA_MAX_BUFFERS];  // in ModSet order
  float params[FLEXJIT_CUDA_MAX_PARAMS];                // in ModSet order
};

#endif  // FLEXJIT_CUDA_ABI_H

// Host C++ spellings of what the CUDA templates take from CUDA, for running a kernel's own
// source on a CPU: tests/support/cuda_emulator (one fiber per CUDA thread) supplies the fjemu_*
// functions. Prepended to the text NVRTC would compile, which is then compiled for the host by
// the CPU JIT; NVRTC never sees this file. FLEXJIT_CUDA_EMULATION makes the templates leave out
// their inline-PTX wrappers, whose emulated versions are here.
#ifndef FLEXJIT_CUDA_EMULATE_H
#define FLEXJIT_CUDA_EMULATE_H
#define FLEXJIT_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one CTA runs at a time: a static is its shared variable
#define __align__(n) __attribute__((aligned(n)))

extern "C" {
struct fjemu_dim3 {
  unsigned x, y, z;
};
struct fjemu_dim3 fjemu_thread_idx(void);
struct fjemu_dim3 fjemu_block_idx(void);
struct fjemu_dim3 fjemu_block_dim(void);
struct fjemu_dim3 fjemu_grid_dim(void);
void* fjemu_dynamic_smem(void);
void fjemu_syncthreads(void);
void fjemu_syncwarp(unsigned member_mask);
unsigned fjemu_shfl_xor(unsigned member_mask, unsigned value, int lane_mask);
void fjemu_ldmatrix(unsigned* r, const void* row_address, int num, int trans);
void fjemu_mma_m16n8k16(float* c, const unsigned* a, unsigned b0, unsigned b1, int dtype);
void fjemu_cp_async(void* dst, const void* src, int src_bytes, int size);
void fjemu_cp_async_commit(void);
void fjemu_cp_async_wait(int pending);
unsigned fjemu_smem_address(const void* p);
void fjemu_wgmma(float* d, int n, const unsigned* a, unsigned long long desc_a, unsigned long long desc_b,
                 int scale_d, int trans_b, int dtype);
void fjemu_wgmma_fence(void);
void fjemu_wgmma_commit(void);
void fjemu_wgmma_wait(int pending);
void fjemu_fence_proxy_async(void);

float expf(float);
float exp2f(float);
float logf(float);
float log2f(float);
float tanhf(float);
float sinf(float);
float cosf(float);
float tanf(float);
float sqrtf(float);
float fabsf(float);
float floorf(float);
float ceilf(float);
float fmaxf(float, float);
float fminf(float, float);
float powf(float, float);
float fmaf(float, float, float);
}

#define threadIdx (fjemu_thread_idx())
#define blockIdx (fjemu_block_idx())
#define blockDim (fjemu_block_dim())
#define gridDim (fjemu_grid_dim())
#define FJC_DYNAMIC_SMEM(name) unsigned char* const name = (unsigned char*)fjemu_dynamic_smem()

static inline float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
static inline float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
static inline int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
static inline unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
template <class T>
static inline T __ldg(const T* p) { return *p; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline void __syncthreads() { fjemu_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { fjemu_syncwarp(mask); }
static inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return __uint_as_float(fjemu_shfl_xor(mask, __float_as_uint(v), lane_mask));
}
static inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask) {
  return (int)fjemu_shfl_xor(mask, (unsigned)v, lane_mask);
}
static inline int atomicOr(int* p, int v) {  // one CTA at a time: no other thread is running
  const int old = *p;
  *p = old | v;
  return old;
}
static inline float fjemu_f16_to_f32(unsigned short x) { return (float)__builtin_bit_cast(_Float16, x); }

// ---- the templates' PTX wrappers ----
static inline void fjc_cp_async16(void* dst, const void* src, bool valid) {
  fjemu_cp_async(dst, src, valid ? 16 : 0, 16);
}
static inline void fjc_cp_async_commit() { fjemu_cp_async_commit(); }
template <int kPending>
static inline void fjc_cp_async_wait() { fjemu_cp_async_wait(kPending); }
static inline void fjc_ldmatrix_x4(unsigned (&r)[4], const unsigned short* p) { fjemu_ldmatrix(r, p, 4, 0); }
static inline void fjc_ldmatrix_x4_trans(unsigned (&r)[4], const unsigned short* p) { fjemu_ldmatrix(r, p, 4, 1); }
static inline void fjc_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  fjemu_mma_m16n8k16(c, a, b0, b1, FLEXJIT_DTYPE);
}
// cvt.rn.{bf16,f16}: round to nearest even (NaN stays NaN).
static inline unsigned short fjemu_round(float x) {
#if FLEXJIT_DTYPE == 1
  unsigned u = __builtin_bit_cast(unsigned, x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
#else
  return __builtin_bit_cast(unsigned short, (_Float16)x);
#endif
}
static inline unsigned fjc_pack2(float lo, float hi) {
  return (unsigned)fjemu_round(lo) | ((unsigned)fjemu_round(hi) << 16);
}
static inline unsigned short fjc_to_elem(float x) { return fjemu_round(x); }

// ---- sm_90a (templates/cuda/wgmma.cuh) ----
static inline unsigned fjc_smem(const void* p) { return fjemu_smem_address(p); }
template <int N>
struct FjcWgmma {
  template <int kTransB>
  static void ss(float (&d)[N / 8][4], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    fjemu_wgmma(&d[0][0], N, nullptr, desc_a, desc_b, scale_d, kTransB, FLEXJIT_DTYPE);
  }
  template <int kTransB>
  static void rs(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long desc_b, int scale_d) {
    fjemu_wgmma(&d[0][0], N, a, 0, desc_b, scale_d, kTransB, FLEXJIT_DTYPE);
  }
};
static inline void fjc_wgmma_fence() { fjemu_wgmma_fence(); }
static inline void fjc_wgmma_commit() { fjemu_wgmma_commit(); }
template <int kPending>
static inline void fjc_wgmma_wait() { fjemu_wgmma_wait(kPending); }
template <int kN, int kM>
static inline void fjc_wgmma_hold(float (&)[kN][kM]) {}
static inline void fjc_fence_proxy_async() { fjemu_fence_proxy_async(); }

#endif  // FLEXJIT_CUDA_EMULATE_H

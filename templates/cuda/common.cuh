// What the CUDA kernels share (templates/cuda/flash_prefill.cuh, flash_decode.cuh): the 16-bit
// element type, the inline-PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16, cvt) and the
// global -> shared tile loader. Follows the spec macros (FLEXJIT_DTYPE 1 = bf16 / 2 = fp16),
// templates/mod_abi.h and templates/cuda/abi.cuh; header-free for NVRTC.
//
// Fragment layouts (PTX ISA, mma.m16n8k16): lane l holds, of a 16 x 8 accumulator tile, rows
// l / 4 and l / 4 + 8 at columns 2 (l % 4) + {0, 1}: c[0..1] and c[2..3].
#ifndef FLEXJIT_CUDA_COMMON_H
#define FLEXJIT_CUDA_COMMON_H
#if FLEXJIT_DTYPE != 0 && FLEXJIT_DTYPE != 1 && FLEXJIT_DTYPE != 2
#error "the CUDA kernels take fp32 (FLEXJIT_DTYPE 0: the decode kernel only), bf16 (1) or fp16 (2)"
#endif

typedef unsigned short fjc_u16;

#define FJC_DEV static __device__ __forceinline__
#define FJC_NEG_INF __int_as_float(0xff800000)

// ---- PTX wrappers (templates/cuda/emulate.cuh has their CPU versions) ----
#ifndef FLEXJIT_CUDA_EMULATION
#define FJC_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
FJC_DEV unsigned fjc_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is not read then).
FJC_DEV void fjc_cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fjc_smem(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
FJC_DEV void fjc_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
FJC_DEV void fjc_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

FJC_DEV void fjc_ldmatrix_x4(unsigned (&r)[4], const fjc_u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(fjc_smem(p)));
}
FJC_DEV void fjc_ldmatrix_x4_trans(unsigned (&r)[4], const fjc_u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(fjc_smem(p)));
}

// c += A (16 x 16, row) * B (16 x 8, col), fp32 accumulators.
FJC_DEV void fjc_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if FLEXJIT_DTYPE == 1
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit elements, lo in the low half (round to nearest even).
FJC_DEV unsigned fjc_pack2(float lo, float hi) {
  unsigned r;
#if FLEXJIT_DTYPE == 1
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}
FJC_DEV fjc_u16 fjc_to_elem(float x) {
  fjc_u16 r;
#if FLEXJIT_DTYPE == 1
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
#else
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
#endif
  return r;
}
#endif  // !FLEXJIT_CUDA_EMULATION

// ---- tiles global -> shared ----
// Rows [0, kRows) of a matrix of T (2- or 4-byte elements) whose row r starts at row_ptr(r)
// (16-byte aligned, kWidthReal elements) into shared rows of kStride elements, kWidthPad columns
// (whole 16-byte chunks), by the kLoaders threads numbered `t`. Rows >= valid_rows and columns >=
// kWidthReal are zero-filled (finite zeros for the MMAs) and their row_ptr is never called.
template <int kRows, int kWidthPad, int kWidthReal, int kStride, int kLoaders, class T, class RowPtr>
FJC_DEV void fjc_load_rows(T* dst, const RowPtr& row_ptr, fj_i64 valid_rows, int t, const void* any_src) {
  constexpr int kPer = 16 / (int)sizeof(T);  // elements per 16-byte chunk
  static_assert(kWidthPad % kPer == 0, "whole 16-byte chunks");
  constexpr int kChunks = kWidthPad / kPer;
#pragma unroll 4
  for (int c = t; c < kRows * kChunks; c += kLoaders) {
    const int r = c / kChunks, col = (c % kChunks) * kPer;
    const bool ok = r < valid_rows && col < kWidthReal;
    fjc_cp_async16(dst + r * kStride + col, ok ? (const void*)(row_ptr(r) + col) : any_src, ok);
  }
}

// A device BlockMask is not checked on the host (that would synchronise): counts past a row's
// length and indices past the mask's KV blocks are clamped / skipped here and raise bit 2 of the
// error flag instead of reading out of bounds.
FJC_DEV int fjc_clamp_count(int n, fj_i64 limit, int* range_error) {
  if (n < 0 || n > limit) {
    *range_error = 1;
    return n < 0 ? 0 : (int)limit;
  }
  return n;
}
#endif  // FLEXJIT_CUDA_COMMON_H

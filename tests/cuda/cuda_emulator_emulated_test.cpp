// LABELS: unit emulated
// The CUDA emulator itself (tests/support/cuda_emulator.h), on small kernels written like the
// templates (emulate.cuh's spellings, JIT-compiled): mma.sync + ldmatrix (plain and .trans)
// compute A B as the PTX ISA's fragment layouts say; a missing __syncthreads, divergence at a
// warp collective, a thread that exits before a barrier, and out-of-range addresses are reported,
// not passed over.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "jit/compile.h"
#include "jit/instantiate.h"
#include "tests/support/cuda_emulator.h"

namespace flexjit {
namespace {

namespace emu = testing::cuda_emulator;

struct Args {
  const unsigned short* a;  // bf16
  const unsigned short* b;  // bf16
  float* d;
  unsigned short* out;
  int mode;
};
using Kernel = void (*)(Args);

constexpr const char* kKernels = R"(
struct Args { const unsigned short* a; const unsigned short* b; float* d; unsigned short* out; int mode; };

// D (16 x 8, fp32) = A (16 x 16, row-major) B, with B given as [n][k] (mode 0, the way the prefill
// kernel holds K) or as [k][n] (mode 1: through ldmatrix .trans, the way it holds V).
extern "C" void emu_mma(struct Args a) {
  FJC_DYNAMIC_SMEM(smem);
  unsigned short* sA = (unsigned short*)smem;
  unsigned short* sB = sA + 256;
  const int t = threadIdx.x;
  fjc_cp_async16(sA + t * 8, a.a + t * 8, true);
  if (t < 16) fjc_cp_async16(sB + t * 8, a.b + t * 8, true);
  fjc_cp_async_commit();
  fjc_cp_async_wait<0>();
  __syncthreads();
  unsigned ra[4], rb[4];
  fjc_ldmatrix_x4(ra, sA + (t % 16) * 16 + (t / 16) * 8);
  if (a.mode == 0) fjc_ldmatrix_x4(rb, sB + (t % 8) * 16 + ((t / 8) % 2) * 8);
  else fjc_ldmatrix_x4_trans(rb, sB + (t % 16) * 8);
  float c[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  fjc_mma(c, ra, rb[0], rb[1]);
  const int g = t / 4, q = 2 * (t % 4);
  a.d[g * 8 + q] = c[0];
  a.d[g * 8 + q + 1] = c[1];
  a.d[(g + 8) * 8 + q] = c[2];
  a.d[(g + 8) * 8 + q + 1] = c[3];
}

// 64 threads load 64 chunks of 8 elements; each then reads another warp's chunk. mode 0: with
// the barrier; mode 1: without it (a race the emulator's schedule must expose).
extern "C" void emu_exchange(struct Args a) {
  FJC_DYNAMIC_SMEM(smem);
  unsigned short* s = (unsigned short*)smem;
  const int t = threadIdx.x;
  fjc_cp_async16(s + t * 8, a.a + t * 8, true);
  fjc_cp_async_commit();
  fjc_cp_async_wait<0>();
  if (a.mode == 0) __syncthreads();
  a.out[t] = s[(63 - t) * 8];
}

// Misuse, one per mode: 0 half a warp at a shuffle, the other half at a barrier; 1 a thread that
// exits before a barrier; 2 ldmatrix outside shared memory; 3 cp.async from outside every tensor.
extern "C" void emu_misuse(struct Args a) {
  FJC_DYNAMIC_SMEM(smem);
  unsigned short* s = (unsigned short*)smem;
  const int t = threadIdx.x;
  float x = (float)t;
  if (a.mode == 0) {
    if (t % 32 < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
    __syncthreads();
  } else if (a.mode == 1) {
    if (t == 5) return;
    __syncthreads();
  } else if (a.mode == 2) {
    unsigned r[4];
    fjc_ldmatrix_x4(r, s + 4096 + (t % 8) * 8);
  } else {
    fjc_cp_async16(s + t * 8, a.a + 100000 + t * 8, true);
  }
  a.d[t] = x;
}

// wgmma (sm_90a) through templates/cuda/wgmma.cuh, one warpgroup. A is 64 x 64 in a.a (row-major),
// loaded into one swizzled atom. mode 0: D (64 x 64) = A B^T with B given as [n][k] (64 x 64,
// K-major: the prefill kernel's S = Q K^T), four k-steps; mode 1: D (64 x 128) = 0.5 + P V with P
// = A's first 16 columns from registers and V given as [k][n] (16 x 128, MN-major: O += P V).
// Misuse: 2 no wgmma.fence; 3 no wgmma.wait_group; 4 the B tile overwritten before the wait;
// 5 the accumulators read before the wait.
extern "C" void emu_wgmma(struct Args a) {
  FJC_DYNAMIC_SMEM(raw);
  fjc_u16* sA = (fjc_u16*)(raw + ((1024u - (fjc_smem(raw) & 1023u)) & 1023u));
  fjc_u16* sB = sA + 64 * 64;
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, c = 2 * (t % 4);
  fjc_load_rows_sw128<64, 64, 128>(sA, [&](int r) { return a.a + r * 64; }, 64, t, a.a);
  if (a.mode == 1) fjc_load_rows_sw128<16, 128, 128>(sB, [&](int r) { return a.b + r * 128; }, 16, t, a.b);
  else fjc_load_rows_sw128<64, 64, 128>(sB, [&](int r) { return a.b + r * 64; }, 64, t, a.b);
  fjc_cp_async_commit();
  fjc_cp_async_wait<0>();
  fjc_fence_proxy_async();
  __syncthreads();
  if (a.mode == 1) {
    float o[16][4];
    for (int j = 0; j < 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.5f;
    unsigned pa[4];
    for (int q = 0; q < 4; ++q) {
      const int row = 16 * w + g + (q % 2) * 8, col = c + (q / 2) * 8;
      pa[q] = (unsigned)a.a[row * 64 + col] | ((unsigned)a.a[row * 64 + col + 1] << 16);
    }
    fjc_wgmma_fence();
    FjcWgmma<128>::rs<1>(o, pa, fjc_wgmma_desc(fjc_smem(sB), 16 * 128, 1024), 1);
    fjc_wgmma_commit();
    fjc_wgmma_wait<0>();
    for (int j = 0; j < 16; ++j)
      for (int q = 0; q < 4; ++q) a.d[(16 * w + g + (q / 2) * 8) * 128 + 8 * j + c + q % 2] = o[j][q];
    return;
  }
  float s[8][4];
  for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  if (a.mode != 2) fjc_wgmma_fence();
  for (int kk = 0; kk < 4; ++kk)
    FjcWgmma<64>::ss<0>(s, fjc_wgmma_desc(fjc_smem(sA) + kk * 32, 16, 1024), fjc_wgmma_desc(fjc_smem(sB) + kk * 32, 16, 1024),
                        kk > 0);
  fjc_wgmma_commit();
  if (a.mode == 4 && t == 0) sB[5] = 0;
  if (a.mode == 3) return;
  if (a.mode != 5) fjc_wgmma_wait<0>();
  for (int j = 0; j < 8; ++j)
    for (int q = 0; q < 4; ++q) a.d[(16 * w + g + (q / 2) * 8) * 64 + 8 * j + c + q % 2] = s[j][q];
  if (a.mode == 5) fjc_wgmma_wait<0>();
}
)";

Kernel kernel(const char* name) {
  static std::string object;
  if (object.empty()) {
    const std::string src = "#define FLEXJIT_DTYPE 1\n" + jit::template_text("templates/cuda/emulate.cuh") +
                            jit::template_text("templates/mod_abi.h") + jit::template_text("templates/cuda/common.cuh") +
                            jit::template_text("templates/cuda/wgmma.cuh") + kKernels;
    object = jit::compile_cpp_to_object(src, "emulator_test.cpp").object;
  }
  return reinterpret_cast<Kernel>(jit::load_object(object, name));
}

unsigned short bf16(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return static_cast<unsigned short>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
float from_bf16(unsigned short h) {
  const unsigned u = unsigned(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::string run(Kernel k, Args a, unsigned threads, int smem, std::vector<emu::Range> readable = {}) {
  emu::Launch l;
  l.block_threads = threads;
  l.smem_bytes = smem;
  l.readable = std::move(readable);
  return emu::run(l, [&] { k(a); });
}

TEST(CudaEmulator, MmaAndLdmatrixComputeABInBothOperandLayouts) {
  std::vector<unsigned short> A(256), Bnk(128), Bkn(128);
  for (int i = 0; i < 256; ++i) A[i] = bf16(std::sin(0.37f * i));
  for (int n = 0; n < 8; ++n)
    for (int k = 0; k < 16; ++k) {
      const unsigned short x = bf16(std::cos(0.11f * (n * 16 + k)) - 0.25f * n);
      Bnk[n * 16 + k] = x;
      Bkn[k * 8 + n] = x;
    }
  for (int mode : {0, 1}) {
    SCOPED_TRACE(mode == 0 ? "B as [n][k]" : "B as [k][n], ldmatrix .trans");
    std::vector<float> D(128, -1.0f);
    Args a{A.data(), mode == 0 ? Bnk.data() : Bkn.data(), D.data(), nullptr, mode};
    ASSERT_EQ(run(kernel("emu_mma"), a, 32, 1024), "");
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        double want = 0.5;
        for (int k = 0; k < 16; ++k) want += double(from_bf16(A[m * 16 + k])) * from_bf16(Bnk[n * 16 + k]);
        EXPECT_NEAR(D[m * 8 + n], want, 1e-5) << "D[" << m << "][" << n << "]";
      }
  }
}

TEST(CudaEmulator, AMissingBarrierShowsAsNaN) {
  std::vector<unsigned short> A(512);
  for (int i = 0; i < 512; ++i) A[i] = bf16(float(i));
  for (int mode : {0, 1}) {
    std::vector<unsigned short> out(64, 0);
    Args a{A.data(), nullptr, nullptr, out.data(), mode};
    ASSERT_EQ(run(kernel("emu_exchange"), a, 64, 1024, {{A.data(), A.size() * 2}}), "");
    int nan = 0;
    for (int t = 0; t < 64; ++t) {
      if (std::isnan(from_bf16(out[t]))) ++nan;
      else EXPECT_EQ(from_bf16(out[t]), float((63 - t) * 8));
    }
    if (mode == 0) EXPECT_EQ(nan, 0) << "with the barrier every read sees the data";
    else EXPECT_EQ(nan, 32) << "without it the first warp to run reads chunks the other has not loaded";
  }
}

TEST(CudaEmulator, MisuseIsAnErrorNotAHang) {
  std::vector<unsigned short> A(512, 0);
  std::vector<float> d(64);
  auto misuse = [&](int mode) {
    Args a{A.data(), nullptr, d.data(), nullptr, mode};
    return run(kernel("emu_misuse"), a, 64, 1024, {{A.data(), A.size() * 2}});
  };
  const std::string divergent = misuse(0);
  EXPECT_NE(divergent.find("deadlock"), std::string::npos) << divergent;
  EXPECT_NE(divergent.find("16 of 32 lanes at shfl.sync"), std::string::npos) << divergent;
  const std::string exited = misuse(1);
  EXPECT_NE(exited.find("1 threads exited, 63 wait at __syncthreads"), std::string::npos) << exited;
  const std::string outside = misuse(2);
  EXPECT_NE(outside.find("ldmatrix: address"), std::string::npos) << outside;
  EXPECT_NE(outside.find("outside the block's 1024 bytes"), std::string::npos) << outside;
  const std::string stray = misuse(3);
  EXPECT_NE(stray.find("outside every tensor of the launch"), std::string::npos) << stray;
  // The emulator is usable again after a failed launch.
  std::vector<float> D(128);
  std::vector<unsigned short> B(128, 0);
  Args ok{A.data(), B.data(), D.data(), nullptr, 0};
  EXPECT_EQ(run(kernel("emu_mma"), ok, 32, 1024), "");
}

// wgmma as the PTX ISA describes it: D from 128 threads' accumulators, A from a swizzled K-major
// tile or from registers, B K-major or MN-major (2 atoms of 64 columns), against a plain matmul.
TEST(CudaEmulator, WgmmaComputesABFromSwizzledTilesAndRegisters) {
  std::vector<unsigned short> A(64 * 64), Bnk(64 * 64), Vkn(16 * 128);
  for (int i = 0; i < 64 * 64; ++i) A[i] = bf16(std::sin(0.37f * i));
  for (int i = 0; i < 64 * 64; ++i) Bnk[i] = bf16(std::cos(0.11f * i) - 0.001f * (i / 64));
  for (int i = 0; i < 16 * 128; ++i) Vkn[i] = bf16(std::cos(0.23f * i) + 0.01f * (i % 128));
  const int smem = 1024 + 2 * 64 * 64 * 2;
  {
    std::vector<float> D(64 * 64, -1.0f);
    Args a{A.data(), Bnk.data(), D.data(), nullptr, 0};
    ASSERT_EQ(run(kernel("emu_wgmma"), a, 128, smem, {{A.data(), A.size() * 2}, {Bnk.data(), Bnk.size() * 2}}), "");
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n) {
        double want = 0;
        for (int k = 0; k < 64; ++k) want += double(from_bf16(A[m * 64 + k])) * from_bf16(Bnk[n * 64 + k]);
        ASSERT_NEAR(D[m * 64 + n], want, 1e-4) << "S[" << m << "][" << n << "]";
      }
  }
  {
    std::vector<float> D(64 * 128, -1.0f);
    Args a{A.data(), Vkn.data(), D.data(), nullptr, 1};
    ASSERT_EQ(run(kernel("emu_wgmma"), a, 128, smem, {{A.data(), A.size() * 2}, {Vkn.data(), Vkn.size() * 2}}), "");
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 128; ++n) {
        double want = 0.5;
        for (int k = 0; k < 16; ++k) want += double(from_bf16(A[m * 64 + k])) * from_bf16(Vkn[k * 128 + n]);
        ASSERT_NEAR(D[m * 128 + n], want, 1e-4) << "O[" << m << "][" << n << "]";
      }
  }
}

TEST(CudaEmulator, WgmmaMisuseIsReported) {
  std::vector<unsigned short> A(64 * 64, 0), B(64 * 64, 0x3f80);  // B = 1.0: an overwrite with 0 shows
  std::vector<float> D(64 * 64);
  auto misuse = [&](int mode) {
    Args a{A.data(), B.data(), D.data(), nullptr, mode};
    return run(kernel("emu_wgmma"), a, 128, 1024 + 2 * 64 * 64 * 2, {});
  };
  EXPECT_NE(misuse(2).find("without a wgmma.fence"), std::string::npos) << misuse(2);
  EXPECT_NE(misuse(3).find("still in flight"), std::string::npos) << misuse(3);
  EXPECT_NE(misuse(4).find("overwritten before its wgmma.wait_group"), std::string::npos) << misuse(4);
  ASSERT_EQ(misuse(5), "");
  for (float x : D) ASSERT_TRUE(std::isnan(x)) << "accumulators read before the wait are NaN";
  // Fewer than 128 threads cannot issue a warpgroup instruction.
  Args a{A.data(), B.data(), D.data(), nullptr, 0};
  EXPECT_NE(run(kernel("emu_wgmma"), a, 64, 1024 + 2 * 64 * 64 * 2, {}).find("not whole warpgroups"), std::string::npos);
}

}  // namespace
}  // namespace flexjit

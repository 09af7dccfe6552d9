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
#include "tests/support/wgmma_probe.h"

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

)";

std::string& kernel_object() {
  static std::string object;
  return object;
}

Kernel kernel(const char* name) {
  std::string& object = kernel_object();
  if (object.empty()) {
    const std::string src = testing::wgmma_probe_source(jit::template_text("templates/cuda/emulate.cuh"), kKernels);
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

std::string run(Kernel k, Args a, unsigned threads, int smem, std::vector<emu::Range> readable = {},
                emu::Stats* stats = nullptr) {
  emu::Launch l;
  l.block_threads = threads;
  l.smem_bytes = smem;
  l.readable = std::move(readable);
  return emu::run(l, [&] { k(a); }, stats);
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
    emu::Stats stats;
    ASSERT_EQ(run(kernel("emu_mma"), a, 32, 1024, {}, &stats), "");
    // Bank conflicts: A's 32-byte rows put rows r and r + 4 of each matrix on one group of banks
    // (2-way, all 4 phases); B as [n][k] likewise; B as [k][n] has 16-byte rows: none.
    EXPECT_EQ(stats.ldmatrix_phases, 8u);
    EXPECT_EQ(stats.ldmatrix_conflicted_phases, mode == 0 ? 8u : 4u);
    EXPECT_EQ(stats.ldmatrix_worst_ways, 2u);
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

// wgmma as the PTX ISA describes it (tests/support/wgmma_probe.h, the kernel the GPU self-test runs
// too): D from 128 threads' accumulators, A from swizzled K-major tiles (one atom and across two)
// or from registers, B K-major or MN-major across two atoms, against a plain matmul.
std::string run_probe(int mode, const testing::WgmmaProbeCase& c, std::vector<float>* d, unsigned threads = 128,
                      bool check_sources = true) {
  kernel("emu_mma");  // compiles the test's object, which holds the probe too
  static const auto probe =
      reinterpret_cast<void (*)(testing::WgmmaProbeArgs)>(jit::load_object(kernel_object(), testing::kWgmmaProbeSymbol));
  testing::WgmmaProbeArgs a{c.a.data(), c.b.data(), d->data(), mode};
  emu::Launch l;
  l.block_threads = threads;
  l.smem_bytes = testing::kWgmmaProbeSmem;
  if (check_sources) l.readable = {{c.a.data(), c.a.size() * 2}, {c.b.data(), c.b.size() * 2}};
  return emu::run(l, [&] { probe(a); });
}

TEST(CudaEmulator, WgmmaComputesABFromSwizzledTilesAndRegisters) {
  for (int mode : {0, 6, 1}) {
    SCOPED_TRACE(testing::wgmma_probe_what(mode));
    const testing::WgmmaProbeCase c = testing::wgmma_probe_case(mode);
    std::vector<float> d(c.d_elems, -1.0f);
    ASSERT_EQ(run_probe(mode, c, &d), "");
    std::string where;
    EXPECT_LE(testing::wgmma_probe_error(mode, c, d, &where), 1e-4) << where;
  }
  // The diagnostic mode (LBO and SBO swapped) reads another layout: it must disagree, or it could
  // not tell on a GPU which reading holds.
  const testing::WgmmaProbeCase c = testing::wgmma_probe_case(8);
  std::vector<float> d(c.d_elems, -1.0f);
  ASSERT_EQ(run_probe(8, c, &d), "");
  EXPECT_GT(testing::wgmma_probe_error(8, c, d, nullptr), 0.1);
}

TEST(CudaEmulator, WgmmaMisuseIsReported) {
  testing::WgmmaProbeCase c = testing::wgmma_probe_case(0);
  for (auto& x : c.b) x = 0x3f80;  // B = 1.0: an overwrite with 0 shows
  std::vector<float> d(c.d_elems);
  EXPECT_NE(run_probe(2, c, &d).find("without a wgmma.fence"), std::string::npos) << run_probe(2, c, &d);
  EXPECT_NE(run_probe(3, c, &d).find("still in flight"), std::string::npos) << run_probe(3, c, &d);
  EXPECT_NE(run_probe(4, c, &d).find("overwritten before its wgmma.wait_group"), std::string::npos)
      << run_probe(4, c, &d);
  EXPECT_NE(run_probe(7, c, &d).find("not fenced into the async proxy"), std::string::npos) << run_probe(7, c, &d);
  ASSERT_EQ(run_probe(5, c, &d), "");
  for (float x : d) ASSERT_TRUE(std::isnan(x)) << "accumulators read before the wait are NaN";
  // Fewer than 128 threads cannot issue a warpgroup instruction.
  EXPECT_NE(run_probe(0, c, &d, 64).find("not whole warpgroups"), std::string::npos);
}

}  // namespace
}  // namespace flexjit

// The wgmma layout probe: one warpgroup multiplies small bf16 matrices through
// templates/cuda/wgmma.cuh (the swizzled cp.async loader, the matrix descriptors, the wgmma
// wrappers) exactly as the prefill engine lays them out, and the host checks D against a plain
// matmul. The same kernel text runs under the CPU emulator (cuda_emulator_emulated_test, where the
// misuse modes also run) and, on an sm_90 GPU, in tools/cuda_selftest (modes 0, 1 and 6), so a
// disagreement between the emulator's reading of the PTX ISA and the hardware shows as a named
// layout rather than as a wrong attention output:
//   mode 0: D (64 x 64) = A B^T, A and B K-major in one 64-column atom, four k-steps (32-byte
//           descriptor advances inside the swizzle atom) - the engine's S = Q K^T at D 64;
//   mode 6: the same at 128 columns: k-steps 4..7 start in the second atom - S = Q K^T at D 128;
//   mode 1: D (64 x 128) = 0.5 + P V, P (A's first 16 columns) from registers, V [16][128]
//           MN-major across two atoms (LBO) - the engine's O += P V;
//   mode 8 (a diagnostic): mode 1 with LBO and SBO swapped, the other reading of an MN-major
//           descriptor; it must disagree where mode 1 agrees (it does under the emulator), so on
//           a GPU where mode 1 fails, mode 8 agreeing says which field wgmma.cuh has backwards;
//   misuse (emulator only): 2 no wgmma.fence; 3 no wgmma.wait_group; 4 the B tile overwritten
//           before the wait; 5 the accumulators read before the wait; 7 the copies not fenced
//           into the async proxy.
#pragma once

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "jit/instantiate.h"

namespace flexjit::testing {

struct WgmmaProbeArgs {  // the kernel's by-value parameter
  const unsigned short* a;  // bf16
  const unsigned short* b;  // bf16
  float* d;
  int mode;
};

inline constexpr int kWgmmaProbeThreads = 128;
inline constexpr int kWgmmaProbeSmem = 1024 + 2 * 2 * 64 * 128 * 2;  // alignment + two 64 x 128 tiles
inline constexpr const char* kWgmmaProbeSymbol = "flexjit_wgmma_probe";

// After the spec macro FLEXJIT_DTYPE 1, templates/mod_abi.h, cuda/common.cuh and cuda/wgmma.cuh.
inline constexpr const char* kWgmmaProbeKernel = R"(
struct WgmmaProbeArgs { const unsigned short* a; const unsigned short* b; float* d; int mode; };

extern "C" __global__ void flexjit_wgmma_probe(const struct WgmmaProbeArgs a) {
  FJC_DYNAMIC_SMEM(raw);
  fjc_u16* sA = (fjc_u16*)(raw + ((1024u - (fjc_smem(raw) & 1023u)) & 1023u));
  fjc_u16* sB = sA + 64 * 128;
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, c = 2 * (t % 4);
  const int kd = a.mode == 6 ? 128 : 64;  // A's (and K-major B's) columns
  if (kd == 128) fjc_load_rows_sw128<64, 128, 128>(sA, [&](int r) { return a.a + r * 128; }, 64, t, a.a);
  else fjc_load_rows_sw128<64, 64, 128>(sA, [&](int r) { return a.a + r * 64; }, 64, t, a.a);
  if (a.mode == 1 || a.mode == 8) fjc_load_rows_sw128<16, 128, 128>(sB, [&](int r) { return a.b + r * 128; }, 16, t, a.b);
  else if (kd == 128) fjc_load_rows_sw128<64, 128, 128>(sB, [&](int r) { return a.b + r * 128; }, 64, t, a.b);
  else fjc_load_rows_sw128<64, 64, 128>(sB, [&](int r) { return a.b + r * 64; }, 64, t, a.b);
  fjc_cp_async_commit();
  fjc_cp_async_wait<0>();
  if (a.mode != 7) fjc_fence_proxy_async();
  __syncthreads();
  if (a.mode == 1 || a.mode == 8) {
    float o[16][4];
#pragma unroll
    for (int j = 0; j < 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.5f;
    unsigned pa[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int row = 16 * w + g + (q % 2) * 8, col = c + (q / 2) * 8;
      pa[q] = (unsigned)a.a[row * 64 + col] | ((unsigned)a.a[row * 64 + col + 1] << 16);
    }
    fjc_wgmma_hold(o);
    fjc_wgmma_fence();
    const unsigned atom = 16 * 128, group = 1024;  // V's next 64 columns; its next 8 keys
    FjcWgmma<128>::rs<1>(o, pa, a.mode == 8 ? fjc_wgmma_desc(fjc_smem(sB), group, atom) : fjc_wgmma_desc(fjc_smem(sB), atom, group), 1);
    fjc_wgmma_commit();
    fjc_wgmma_wait<0>();
    fjc_wgmma_hold(o);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) a.d[(16 * w + g + (q / 2) * 8) * 128 + 8 * j + c + q % 2] = o[j][q];
    return;
  }
  float s[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  fjc_wgmma_hold(s);
  if (a.mode != 2) fjc_wgmma_fence();
  for (int kk = 0; kk < kd / 16; ++kk) {
    const unsigned off = (kk / 4) * 64 * 128 + (kk % 4) * 32;  // atom kk / 4 (64 rows of 128 bytes)
    FjcWgmma<64>::ss<0>(s, fjc_wgmma_desc(fjc_smem(sA) + off, 16, 1024), fjc_wgmma_desc(fjc_smem(sB) + off, 16, 1024),
                        kk > 0);
  }
  fjc_wgmma_commit();
  if (a.mode == 4 && t == 0) sB[5] = 0;
  if (a.mode == 3) return;
  if (a.mode != 5) fjc_wgmma_wait<0>();
  fjc_wgmma_hold(s);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) a.d[(16 * w + g + (q / 2) * 8) * 64 + 8 * j + c + q % 2] = s[j][q];
  if (a.mode == 5) fjc_wgmma_wait<0>();
}
)";

// The probe's translation unit: the dtype macro, the templates it uses and the kernel. `prelude`
// goes after the macro (templates/cuda/emulate.cuh for the CPU emulator, "" for NVRTC) and
// `extra` before the probe (other test kernels compiled into the same object).
inline std::string wgmma_probe_source(const std::string& prelude = "", const std::string& extra = "") {
  return "#define FLEXJIT_DTYPE 1\n" + prelude + jit::template_text("templates/mod_abi.h") +
         jit::template_text("templates/cuda/common.cuh") + jit::template_text("templates/cuda/wgmma.cuh") + extra +
         kWgmmaProbeKernel;
}

inline unsigned short probe_bf16(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return static_cast<unsigned short>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
inline float probe_float(unsigned short h) {
  const unsigned u = unsigned(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A probe run's inputs (bf16) and output size for `mode`.
struct WgmmaProbeCase {
  std::vector<unsigned short> a, b;
  size_t d_elems = 0;
};
inline WgmmaProbeCase wgmma_probe_case(int mode) {
  WgmmaProbeCase c;
  const int kd = mode == 6 ? 128 : 64;
  c.a.resize(size_t(64 * kd));
  for (size_t i = 0; i < c.a.size(); ++i) c.a[i] = probe_bf16(std::sin(0.37f * float(i)));
  if (mode == 1 || mode == 8) {
    c.b.resize(16 * 128);
    for (size_t i = 0; i < c.b.size(); ++i) c.b[i] = probe_bf16(std::cos(0.23f * float(i)) + 0.01f * float(i % 128));
    c.d_elems = 64 * 128;
  } else {
    c.b.resize(size_t(64 * kd));
    for (size_t i = 0; i < c.b.size(); ++i) c.b[i] = probe_bf16(std::cos(0.11f * float(i)) - 0.001f * float(i / kd));
    c.d_elems = 64 * 64;
  }
  return c;
}

// The largest |D - reference| of a run of `mode` (modes 0, 1, 6, 8), and where ("" when it is 0).
inline double wgmma_probe_error(int mode, const WgmmaProbeCase& c, const std::vector<float>& d, std::string* where) {
  double worst = 0;
  auto check = [&](int m, int n, double want, float got) {
    const double e = std::isnan(got) ? INFINITY : std::fabs(double(got) - want);
    if (e > worst) {
      worst = e;
      if (where) *where = "D[" + std::to_string(m) + "][" + std::to_string(n) + "] = " + std::to_string(got) +
                          ", want " + std::to_string(want);
    }
  };
  if (mode == 1 || mode == 8) {
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 128; ++n) {
        double want = 0.5;
        for (int k = 0; k < 16; ++k) want += double(probe_float(c.a[m * 64 + k])) * probe_float(c.b[k * 128 + n]);
        check(m, n, want, d[size_t(m * 128 + n)]);
      }
    return worst;
  }
  const int kd = mode == 6 ? 128 : 64;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 64; ++n) {
      double want = 0;
      for (int k = 0; k < kd; ++k) want += double(probe_float(c.a[m * kd + k])) * probe_float(c.b[n * kd + k]);
      check(m, n, want, d[size_t(m * 64 + n)]);
    }
  return worst;
}

inline const char* wgmma_probe_what(int mode) {
  switch (mode) {
    case 0: return "K-major A and B, one 128-byte-swizzled atom, 32-byte descriptor steps (S = Q K^T, D 64)";
    case 6: return "K-major A and B across two atoms (S = Q K^T, D 128)";
    case 1: return "A from registers, MN-major B across two atoms by LBO (O += P V)";
    case 8: return "diagnostic: mode 1 with LBO and SBO swapped (must disagree where mode 1 agrees)";
  }
  return "misuse";
}

}  // namespace flexjit::testing

// Runs one cross-compiled prefill kernel with its mods kernel on an aarch64 machine (here: QEMU's
// user-mode emulator) and checks it against a float64 reference computed alongside: the
// correctness half of an Arm port that this x86 host can check. Built by
// tests/jit/arm_run_test.cpp with the aarch64 cross g++, linked statically with the kernel and
// mods objects the JIT emitted for Arm, never by CMake.
//
// The kernel: ENTRY (prefill, dtype DTYPE 0 fp32 / 1 bf16, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
// GQA_GROUP); the mods: MODS_ENTRY, score_mod ALiBi (buffer "slopes" [Hq]) and mask_mod causal.
// Prints the line of harness_common.h's Errors and exits 0; a harness failure exits 2.
#include "tests/arm/harness_common.h"

extern "C" void ENTRY(const struct FlexPrefillArgs*, fj_i64, fj_i64);
extern "C" void MODS_ENTRY(struct FlexModKernels*);

using namespace arm_harness;

namespace {
constexpr int kB = 1, kHkv = 2, kHq = kHkv * GQA_GROUP, kLq = 97, kLkv = 129, kD = HEAD_DIM, kDv = HEAD_DIM_V;
}  // namespace

int main() {
  std::vector<elem> q, k, v, out(size_t(kB) * kHq * kLq * kDv);
  std::vector<float> qx, kx, vx, lse(size_t(kB) * kHq * kLq);
  fill(&q, &qx, size_t(kB) * kHq * kLq * kD);
  fill(&k, &kx, size_t(kB) * kHkv * kLkv * kD);
  fill(&v, &vx, size_t(kB) * kHkv * kLkv * kDv);
  Mods mods(kHq, MODS_ENTRY);
  if (!mods.ok) return 2;
  const std::vector<float>& slopes = mods.slopes;
  const float scale = 1.0f / std::sqrt(float(kD));

  struct FlexPrefillArgs a;
  std::memset(&a, 0, sizeof a);
  set_tensors(&a, q.data(), {kB, kHq, kLq, kD}, k.data(), {kB, kHkv, kLkv, kD}, v.data(), {kB, kHkv, kLkv, kDv},
              out.data(), {kB, kHq, kLq, kDv}, lse.data(), {kB, kHq, kLq});
  a.B = kB, a.Hq = kHq, a.Hkv = kHkv, a.Lq = kLq, a.Lkv = kLkv, a.Bkv = kB;
  a.scale = scale;
  mods.bind(&a);  // no block mask: every block is partial
  a.window_left = a.window_right = -1;
  ENTRY(&a, 0, fj_i64(kB) * kHq * ((kLq + BLOCK_M - 1) / BLOCK_M));
  if (mods.error_flag) {
    std::printf("harness: the mods raised their error flag\n");
    return 2;
  }

  Errors err;
  std::vector<double> s(kLkv);
  for (int b = 0; b < kB; ++b)
    for (int h = 0; h < kHq; ++h) {
      const int hk = h / GQA_GROUP;
      for (int i = 0; i < kLq; ++i) {
        double m = -INFINITY;
        for (int j = 0; j < kLkv; ++j) {
          double dot = 0;
          for (int d = 0; d < kD; ++d)
            dot += double(qx[((size_t(b) * kHq + h) * kLq + i) * kD + d]) *
                   kx[((size_t(b) * kHkv + hk) * kLkv + j) * kD + d];
          s[j] = i >= j ? dot * scale + double(slopes[h]) * double(j - i) : -INFINITY;
          m = std::fmax(m, s[j]);
        }
        double l = 0;
        for (int j = 0; j < kLkv; ++j) l += s[j] == -INFINITY ? 0 : std::exp(s[j] - m);
        for (int e = 0; e < kDv; ++e) {
          double o = 0;
          for (int j = 0; j < kLkv; ++j)
            if (s[j] != -INFINITY) o += std::exp(s[j] - m) * vx[((size_t(b) * kHkv + hk) * kLkv + j) * kDv + e];
          err.add_out(load(out[((size_t(b) * kHq + h) * kLq + i) * kDv + e]), o / l);
        }
        err.add_lse(lse[(size_t(b) * kHq + h) * kLq + i], m + std::log(l));
      }
    }
  return err.report();
}

// Runs one cross-compiled prefill kernel with its mods kernel on an aarch64 machine (here: QEMU's
// user-mode emulator) and checks it against a float64 reference computed alongside: the
// correctness half of an Arm port that this x86 host can check. Built by
// tests/jit/arm_run_test.cpp with the aarch64 cross g++, linked statically with the kernel and
// mods objects the JIT emitted for Arm, never by CMake.
//
// The kernel: ENTRY (prefill, dtype DTYPE 0 fp32 / 1 bf16, HEAD_DIM, HEAD_DIM_V, GQA_GROUP); the
// mods: MODS_ENTRY, score_mod ALiBi (buffer "slopes" [Hq]) and mask_mod causal. Prints
// "max_abs_err <x> max_abs_ref <y> max_lse_err <z> max_abs_lse <w>" and exits 0; a harness failure exits 2.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "templates/mod_abi.h"

extern "C" void ENTRY(const struct FlexPrefillArgs*, fj_i64, fj_i64);
extern "C" void MODS_ENTRY(struct FlexModKernels*);

namespace {

constexpr int kB = 1, kHkv = 2, kHq = kHkv * GQA_GROUP, kLq = 97, kLkv = 129, kD = HEAD_DIM, kDv = HEAD_DIM_V;

uint64_t rng = 0x9e3779b97f4a7c15ull;
float uniform() {  // [-1, 1)
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  return float(int64_t(rng >> 40) - (int64_t(1) << 23)) / float(1 << 23);
}

uint16_t to_bf16(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

#if DTYPE == 0
typedef float elem;
elem store(float x, float* exact) { *exact = x; return x; }
float load(elem e) { return e; }
#else
typedef uint16_t elem;
elem store(float x, float* exact) { const uint16_t h = to_bf16(x); *exact = from_bf16(h); return h; }
float load(elem e) { return from_bf16(e); }
#endif

}  // namespace

int main() {
  const size_t nq = size_t(kB) * kHq * kLq * kD, nk = size_t(kB) * kHkv * kLkv * kD,
               nv = size_t(kB) * kHkv * kLkv * kDv, no = size_t(kB) * kHq * kLq * kDv;
  std::vector<elem> q(nq), k(nk), v(nv), out(no);
  std::vector<float> qx(nq), kx(nk), vx(nv), slopes(kHq), lse(size_t(kB) * kHq * kLq);
  for (size_t i = 0; i < nq; ++i) q[i] = store(uniform(), &qx[i]);
  for (size_t i = 0; i < nk; ++i) k[i] = store(uniform(), &kx[i]);
  for (size_t i = 0; i < nv; ++i) v[i] = store(uniform(), &vx[i]);
  for (int h = 0; h < kHq; ++h) slopes[h] = std::exp2(-8.0f * float(h + 1) / float(kHq));
  const float scale = 1.0f / std::sqrt(float(kD));

  struct FlexModKernels mk;
  std::memset(&mk, 0, sizeof mk);
  MODS_ENTRY(&mk);
  if (!mk.apply || !mk.has_score_mod || !mk.has_mask_mod) {
    std::printf("harness: the mods kernel did not report ALiBi + causal\n");
    return 2;
  }
  struct FlexBuffer slopes_buf;
  std::memset(&slopes_buf, 0, sizeof slopes_buf);
  slopes_buf.data = slopes.data();
  slopes_buf.sizes[0] = kHq;
  slopes_buf.strides[0] = 1;
  for (int i = 1; i < 4; ++i) slopes_buf.sizes[i] = 1;
  int error_flag = 0;

  struct FlexPrefillArgs a;
  std::memset(&a, 0, sizeof a);
  a.q = q.data(), a.k = k.data(), a.v = v.data(), a.out = out.data(), a.lse = lse.data();
  a.B = kB, a.Hq = kHq, a.Hkv = kHkv, a.Lq = kLq, a.Lkv = kLkv, a.Bkv = kB;
  const fj_i64 qs[4] = {fj_i64(kHq) * kLq * kD, fj_i64(kLq) * kD, kD, 1};
  const fj_i64 ks[4] = {fj_i64(kHkv) * kLkv * kD, fj_i64(kLkv) * kD, kD, 1};
  const fj_i64 vs[4] = {fj_i64(kHkv) * kLkv * kDv, fj_i64(kLkv) * kDv, kDv, 1};
  const fj_i64 os[4] = {fj_i64(kHq) * kLq * kDv, fj_i64(kLq) * kDv, kDv, 1};
  for (int i = 0; i < 4; ++i)
    a.q_strides[i] = qs[i], a.k_strides[i] = ks[i], a.v_strides[i] = vs[i], a.out_strides[i] = os[i];
  a.lse_strides[0] = fj_i64(kHq) * kLq, a.lse_strides[1] = kLq, a.lse_strides[2] = 1;
  a.scale = scale;
  a.apply_mods = mk.apply;
  a.has_score_mod = 1;
  a.has_mask_mod = 1;  // no block mask: every block is partial
  a.mod.buffers = &slopes_buf;
  a.mod.params = nullptr;
  a.mod.error_flag = &error_flag;
  a.window_left = a.window_right = -1;
  const fj_i64 items = fj_i64(kB) * kHq * ((kLq + BLOCK_M - 1) / BLOCK_M);
  ENTRY(&a, 0, items);
  if (error_flag) {
    std::printf("harness: the mods raised their error flag\n");
    return 2;
  }

  double max_err = 0, max_ref = 0, max_lse_err = 0, max_lse = 0;
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
          o /= l;
          const double got = load(out[((size_t(b) * kHq + h) * kLq + i) * kDv + e]);
          max_err = std::fmax(max_err, std::fabs(got - o));
          max_ref = std::fmax(max_ref, std::fabs(o));
        }
        max_lse_err = std::fmax(max_lse_err, std::fabs(double(lse[(size_t(b) * kHq + h) * kLq + i]) - (m + std::log(l))));
        max_lse = std::fmax(max_lse, std::fabs(m + std::log(l)));
      }
    }
  std::printf("max_abs_err %.3e max_abs_ref %.3e max_lse_err %.3e max_abs_lse %.3e\n", max_err, max_ref, max_lse_err,
              max_lse);
  return 0;
}

// Runs one cross-compiled backward kernel (templates/cpu/flash_backward.h, no mods) on an aarch64
// machine (QEMU's user-mode emulator) against a float64 reference of dQ, dK and dV: see
// prefill_harness.cpp, whose conventions it shares. GQA (GQA_GROUP query heads per KV head),
// Lq 97, Lkv 129, the three passes run as the runtime runs them (runtime/backward.cpp) with one KV
// chunk. The kernel reads the forward's out and LSE: out is the reference's, rounded to the dtype
// (delta = rowsum(dO * out) then sees what a real forward would give it).
// Prints harness_common.h's line (gradient errors in the out fields, LSE fields 0) and exits 0.
#include "tests/arm/harness_common.h"

extern "C" void ENTRY(const struct FlexBackwardArgs*, fj_i64, fj_i64);

using namespace arm_harness;

namespace {
constexpr int kB = 1, kHkv = 2, kHq = kHkv * GQA_GROUP, kLq = 97, kLkv = 129, kD = HEAD_DIM, kDv = HEAD_DIM_V;
}  // namespace

int main() {
  std::vector<elem> q, k, v, dout, out(size_t(kB) * kHq * kLq * kDv);
  std::vector<float> qx, kx, vx, dox, outx(out.size()), lse(size_t(kB) * kHq * kLq);
  fill(&q, &qx, size_t(kB) * kHq * kLq * kD);
  fill(&k, &kx, size_t(kB) * kHkv * kLkv * kD);
  fill(&v, &vx, size_t(kB) * kHkv * kLkv * kDv);
  fill(&dout, &dox, size_t(kB) * kHq * kLq * kDv);
  const double scale = 1.0 / std::sqrt(double(kD));

  // float64 forward (P, out, LSE) and backward (dQ, dK, dV) of the same rounded inputs.
  std::vector<double> dq_ref(size_t(kB) * kHq * kLq * kD, 0.0), dk_ref(size_t(kB) * kHkv * kLkv * kD, 0.0),
      dv_ref(size_t(kB) * kHkv * kLkv * kDv, 0.0), p(kLkv), dp(kLkv);
  auto Q = [&](int b, int h, int i, int d) { return double(qx[((size_t(b) * kHq + h) * kLq + i) * kD + d]); };
  auto K = [&](int b, int h, int j, int d) { return double(kx[((size_t(b) * kHkv + h) * kLkv + j) * kD + d]); };
  auto V = [&](int b, int h, int j, int d) { return double(vx[((size_t(b) * kHkv + h) * kLkv + j) * kDv + d]); };
  for (int b = 0; b < kB; ++b)
    for (int h = 0; h < kHq; ++h) {
      const int hk = h / GQA_GROUP;
      for (int i = 0; i < kLq; ++i) {
        double m = -INFINITY, l = 0;
        for (int j = 0; j < kLkv; ++j) {
          double dot = 0;
          for (int d = 0; d < kD; ++d) dot += Q(b, h, i, d) * K(b, hk, j, d);
          p[j] = dot * scale;
          m = std::fmax(m, p[j]);
        }
        for (int j = 0; j < kLkv; ++j) l += (p[j] = std::exp(p[j] - m));
        const size_t row = (size_t(b) * kHq + h) * kLq + i;
        lse[row] = float(m + std::log(l));
        double delta = 0;
        for (int d = 0; d < kDv; ++d) {
          double o = 0;
          for (int j = 0; j < kLkv; ++j) o += p[j] / l * V(b, hk, j, d);
          out[row * kDv + d] = store(float(o), &outx[row * kDv + d]);
          delta += double(dox[row * kDv + d]) * outx[row * kDv + d];
        }
        for (int j = 0; j < kLkv; ++j) {
          p[j] /= l;
          double s = 0;
          for (int d = 0; d < kDv; ++d) s += double(dox[row * kDv + d]) * V(b, hk, j, d);
          const double ds = p[j] * (s - delta);
          for (int d = 0; d < kD; ++d) {
            dq_ref[row * kD + d] += scale * ds * K(b, hk, j, d);
            dk_ref[((size_t(b) * kHkv + hk) * kLkv + j) * kD + d] += scale * ds * Q(b, h, i, d);
          }
          for (int d = 0; d < kDv; ++d)
            dv_ref[((size_t(b) * kHkv + hk) * kLkv + j) * kDv + d] += p[j] * double(dox[row * kDv + d]);
        }
      }
    }

  // The kernel, as runtime/backward.cpp drives it: pass 0 (delta, zeroed dQ partials), pass 1
  // (dK, dV, dQ partials per KV chunk), pass 2 (dQ).
  std::vector<float> dq(dq_ref.size()), dk(dk_ref.size()), dv(dv_ref.size()), delta(lse.size());
  const fj_i64 nmb = (kLq + BLOCK_M - 1) / BLOCK_M, dpad = (kD + 15) / 16 * 16;
  std::vector<float> part(size_t(kB) * kHq * nmb * BLOCK_M * dpad + 16);
  struct FlexBackwardArgs a;
  std::memset(&a, 0, sizeof a);
  a.q = q.data(), a.k = k.data(), a.v = v.data(), a.out = out.data(), a.dout = dout.data(), a.lse = lse.data();
  dense_strides({kB, kHq, kLq, kD}, a.q_strides);
  dense_strides({kB, kHkv, kLkv, kD}, a.k_strides);
  dense_strides({kB, kHkv, kLkv, kDv}, a.v_strides);
  dense_strides({kB, kHq, kLq, kDv}, a.out_strides);
  dense_strides({kB, kHq, kLq, kDv}, a.dout_strides);
  dense_strides({kB, kHq, kLq}, a.lse_strides);
  a.delta = delta.data(), a.dq = dq.data(), a.dk = dk.data(), a.dv = dv.data();
  a.dq_part = part.data() + (16 - (reinterpret_cast<uintptr_t>(part.data()) / sizeof(float)) % 16) % 16;
  a.kv_chunks = 1;
  a.B = kB, a.Hq = kHq, a.Hkv = kHkv, a.Lq = kLq, a.Lkv = kLkv;
  a.scale = float(scale);
  for (int pass = 0; pass < 3; ++pass) {
    a.pass = pass;
    ENTRY(&a, 0, pass == 1 ? fj_i64(kB) * kHkv * a.kv_chunks : fj_i64(kB) * kHq * nmb);
  }

  Errors err;
  for (size_t i = 0; i < dq.size(); ++i) err.add_out(dq[i], dq_ref[i]);
  for (size_t i = 0; i < dk.size(); ++i) err.add_out(dk[i], dk_ref[i]);
  for (size_t i = 0; i < dv.size(); ++i) err.add_out(dv[i], dv_ref[i]);
  return err.report();
}

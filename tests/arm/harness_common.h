// What the Arm harnesses (prefill_harness.cpp, decode_harness.cpp) share: deterministic inputs,
// the dtype's storage (DTYPE 0 fp32, 1 bf16 rounded to nearest even), the ALiBi slopes buffer and
// the report line tests/jit/arm_run_test.cpp parses. Compiled for aarch64 by the cross g++.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "templates/mod_abi.h"

namespace arm_harness {

inline float uniform() {  // [-1, 1), one fixed sequence
  static uint64_t rng = 0x9e3779b97f4a7c15ull;
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  return float(int64_t(rng >> 40) - (int64_t(1) << 23)) / float(1 << 23);
}

inline uint16_t to_bf16(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The kernel's element type; store() also gives the exact value the kernel sees (for the reference).
#if DTYPE == 0
typedef float elem;
inline elem store(float x, float* exact) { *exact = x; return x; }
inline float load(elem e) { return e; }
#else
typedef uint16_t elem;
inline elem store(float x, float* exact) { const uint16_t h = to_bf16(x); *exact = from_bf16(h); return h; }
inline float load(elem e) { return from_bf16(e); }
#endif

// n random inputs in the kernel's dtype and their exact values.
inline void fill(std::vector<elem>* v, std::vector<float>* exact, size_t n) {
  v->resize(n);
  exact->resize(n);
  for (size_t i = 0; i < n; ++i) (*v)[i] = store(uniform(), &(*exact)[i]);
}

// ALiBi slopes for hq heads and the buffer the mods read them through (slot 0: "slopes").
inline std::vector<float> alibi_slopes(int hq) {
  std::vector<float> s(static_cast<size_t>(hq));
  for (int h = 0; h < hq; ++h) s[size_t(h)] = std::exp2(-8.0f * float(h + 1) / float(hq));
  return s;
}
inline struct FlexBuffer vector_buffer(const std::vector<float>& v) {
  struct FlexBuffer b;
  std::memset(&b, 0, sizeof b);
  b.data = v.data();
  b.sizes[0] = fj_i64(v.size());
  b.strides[0] = 1;
  for (int i = 1; i < 4; ++i) b.sizes[i] = 1;
  return b;
}

// The mods kernel's table; false (after saying why) unless it is ALiBi + causal.
inline bool load_mods(void (*entry)(struct FlexModKernels*), struct FlexModKernels* mk) {
  std::memset(mk, 0, sizeof *mk);
  entry(mk);
  if (mk->apply && mk->has_score_mod && mk->has_mask_mod) return true;
  std::printf("harness: the mods kernel did not report ALiBi + causal\n");
  return false;
}

// The ALiBi + causal mods of a launch: the slopes, their buffer, the mods kernel's table and the
// error flag; bind() sets a launch struct's mod fields.
struct Mods {
  std::vector<float> slopes;
  struct FlexBuffer buf;
  struct FlexModKernels mk;
  int error_flag = 0;
  bool ok = false;
  Mods(int hq, void (*entry)(struct FlexModKernels*)) : slopes(alibi_slopes(hq)) {
    buf = vector_buffer(slopes);
    ok = load_mods(entry, &mk);
  }
  template <typename Args>
  void bind(Args* a) {
    a->apply_mods = mk.apply;
    a->has_score_mod = 1;
    a->has_mask_mod = 1;
    a->mod.buffers = &buf;
    a->mod.error_flag = &error_flag;
  }
};

// Dense row-major strides of a tensor of the given sizes.
inline void dense_strides(std::initializer_list<fj_i64> sizes, fj_i64* strides) {
  const int n = int(sizes.size());
  fj_i64 s = 1;
  for (int i = n - 1; i >= 0; --i) {
    strides[i] = s;
    s *= sizes.begin()[i];
  }
}

// The five tensors of a launch struct (FlexPrefillArgs, FlexDecodeArgs), dense, of these sizes.
template <typename Args>
void set_tensors(Args* a, const elem* q, std::initializer_list<fj_i64> qs, const elem* k, std::initializer_list<fj_i64> ks,
                 const elem* v, std::initializer_list<fj_i64> vs, elem* out, std::initializer_list<fj_i64> os, float* lse,
                 std::initializer_list<fj_i64> ls) {
  a->q = q, a->k = k, a->v = v, a->out = out, a->lse = lse;
  dense_strides(qs, a->q_strides);
  dense_strides(ks, a->k_strides);
  dense_strides(vs, a->v_strides);
  dense_strides(os, a->out_strides);
  dense_strides(ls, a->lse_strides);
}

// Accumulates |kernel - reference| over outputs and LSEs, and prints the line the test parses.
struct Errors {
  double out = 0, out_ref = 0, lse = 0, lse_ref = 0;
  void add_out(double got, double want) {
    out = std::fmax(out, std::fabs(got - want));
    out_ref = std::fmax(out_ref, std::fabs(want));
  }
  void add_lse(double got, double want) {  // want -inf: a fully masked row, which must give -inf
    if (want == -INFINITY) {
      if (got != -INFINITY) lse = INFINITY;
      return;
    }
    lse = std::fmax(lse, std::fabs(got - want));
    lse_ref = std::fmax(lse_ref, std::fabs(want));
  }
  int report() const {
    std::printf("max_abs_err %.3e max_abs_ref %.3e max_lse_err %.3e max_abs_lse %.3e\n", out, out_ref, lse, lse_ref);
    return 0;
  }
};

}  // namespace arm_harness

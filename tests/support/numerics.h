// Shared by the numerics tests: inputs, mods by name or text, and the one comparison of a kernel's
// output and LSE against the float64 golden (tolerances from tests/tolerances.h).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/tolerances.h"

namespace flexjit::testing {

// A 4-D tensor [d0, d1, d2, d3] of uniform [-1, 1) values; when `strided`, memory is
// [d0, d2, d1, d3] (BLHD) instead.
inline OwnedTensor make_tensor(DType dt, int64_t d0, int64_t d1, int64_t d2, int64_t d3, bool strided,
                               uint64_t seed) {
  OwnedTensor t = OwnedTensor::make("t", dt, strided ? std::vector<int64_t>{d0, d2, d1, d3}
                                                      : std::vector<int64_t>{d0, d1, d2, d3});
  fill_random(t.view, seed);
  if (strided) {
    std::swap(t.view.sizes[1], t.view.sizes[2]);
    std::swap(t.view.strides[1], t.view.strides[2]);
  }
  return t;
}

// x rounded to a kernel dtype (what a low-precision baseline would store).
inline double round_to(DType dt, double x) {
  if (dt == DType::BF16) {
    float f = float(x);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    u &= 0xffff0000u;
    std::memcpy(&f, &u, 4);
    return f;
  }
  if (dt == DType::F16) return double(static_cast<_Float16>(float(x)));
  return double(float(x));
}

// A registered mod with example buffers for `shape`, or expression text.
inline TracedMod resolve_mod(const std::string& s, ModKind kind, const ShapeInfo& shape,
                             std::vector<OwnedTensor>* storage) {
  if (has_mod(s)) return instantiate_example(find_mod(s), shape, storage);
  return parse_mod(s, kind, {}, {});
}

// out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] against the golden (float64 from the same rounded
// inputs): elementwise within atol + rtol |golden|, mean error within kBaselineFactor of the plain
// fp32 baseline's (rounded to the dtype), no NaN, fully masked rows at lse -inf.
inline void expect_matches_reference(const TensorView& out, const TensorView* lse, const RefResult& gold,
                                     const RefResult& base, DType dtype) {
  std::vector<double> got = to_doubles(out);
  ASSERT_EQ(got.size(), gold.out.size());
  const Tolerance tol = output_tolerance(dtype);
  double err_sum = 0, base_sum = 0;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = gold.out[i], e = std::fabs(got[i] - g);
    ASSERT_FALSE(std::isnan(got[i])) << "NaN in output at " << i;
    err_sum += e;
    base_sum += std::fabs(round_to(dtype, base.out[i]) - g);
    if (e > tol.atol + tol.rtol * std::fabs(g) && ++bad <= 5)
      ADD_FAILURE() << "out[" << i << "] = " << got[i] << ", reference " << g;
  }
  EXPECT_EQ(bad, 0) << "elements out of tolerance";
  const double n = double(std::max<size_t>(1, got.size()));
  EXPECT_LE(err_sum / n, kBaselineFactor * base_sum / n + kMeanFloor) << "mean error vs the fp32 baseline's";
  if (!lse) return;
  std::vector<double> got_lse = to_doubles(*lse);
  ASSERT_EQ(got_lse.size(), gold.lse.size());
  for (size_t i = 0; i < got_lse.size(); ++i) {
    const double g = gold.lse[i];
    if (std::isinf(g)) {
      EXPECT_TRUE(std::isinf(got_lse[i]) && got_lse[i] < 0) << "lse[" << i << "] of a fully masked row";
    } else {
      EXPECT_NEAR(got_lse[i], g, kLseTolerance.atol + kLseTolerance.rtol * std::fabs(g) +
                                     (dtype == DType::F32 ? 0 : 1e-4))
          << "lse[" << i << "]";
    }
  }
}

}  // namespace flexjit::testing

// Every numerical tolerance the tests use, in one place. They may only be tightened.
//
// Method (PyTorch's): compute a float64 golden from the same rounded inputs the kernel sees,
// and a plain fp32 baseline (naive softmax in float, same inputs). The kernel passes when
//   max |kernel - golden| <= atol + rtol * |golden|   elementwise, and
//   mean |kernel - golden| <= kBaselineFactor * mean |fp32 baseline - golden| + kMeanFloor.
#pragma once

#include "jit/types.h"

namespace flexjit::testing {

struct Tolerance {
  double atol, rtol;
};

inline Tolerance output_tolerance(DType dtype) {
  switch (dtype) {
    case DType::F32: return {2e-5, 2e-5};
    case DType::BF16: return {1e-2, 1e-2};   // output rounded to bf16 (8 mantissa bits)
    case DType::F16: return {2e-3, 2e-3};    // output rounded to fp16 (11 mantissa bits)
    default: return {0, 0};
  }
}

// LSE is fp32 whatever the input dtype.
constexpr Tolerance kLseTolerance = {2e-5, 2e-5};

// Gradients (dq, dk, dv, buffers; fp32 whatever the input dtype) against the float64 golden of
// the same rounded inputs. Low-precision inputs carry the forward's rounded out into
// delta = rowsum(dout * out), as every flash backward does.
inline Tolerance gradient_tolerance(DType dtype) {
  switch (dtype) {
    case DType::F32: return {1e-4, 1e-3};
    case DType::BF16: return {3e-2, 3e-2};
    case DType::F16: return {5e-3, 5e-3};
    default: return {0, 0};
  }
}

constexpr double kBaselineFactor = 4.0;
constexpr double kMeanFloor = 1e-7;

}  // namespace flexjit::testing

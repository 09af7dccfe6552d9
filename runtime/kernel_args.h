// The tensor fields every kernel launch struct shares (FlexPrefillArgs, FlexDecodeArgs in
// templates/mod_abi.h, FlexCudaPrefillArgs in templates/cuda/abi.cuh): the five data pointers and
// their strides. Sizes differ by path (a paged decode's Lkv is its longest sequence), so callers
// set those themselves.
#pragma once

#include "jit/types.h"
#include "templates/mod_abi.h"

namespace flexjit::runtime {

inline void copy_strides(fj_i64* dst, const TensorView& t, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.strides[i];
}

// q, k, v, out (any rank-4 views) and lse (rank 3, or null: not wanted).
template <typename Args>
void set_tensor_args(Args& a, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView* lse) {
  a.q = q.data;
  a.k = k.data;
  a.v = v.data;
  a.out = out.data;
  a.lse = lse ? static_cast<float*>(lse->data) : nullptr;
  copy_strides(a.q_strides, q, 4);
  copy_strides(a.k_strides, k, 4);
  copy_strides(a.v_strides, v, 4);
  copy_strides(a.out_strides, out, 4);
  if (lse) copy_strides(a.lse_strides, *lse, 3);
}

}  // namespace flexjit::runtime

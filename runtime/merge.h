// Merging attention states: (out, lse) pairs computed over disjoint sets of keys for the same
// queries combine exactly into the state over their union,
//   lse = ln sum_i e^(lse_i),   out = sum_i e^(lse_i - lse) out_i
// (out_i softmax-normalised over its own keys, lse natural log). One function serves split-KV
// decoding (the partitions of a sequence), cascade attention (a shared prefix plus each
// request's suffix) and context parallelism (shards of the KV on other processes). A state
// with lse = -inf kept no key: it contributes nothing (its out is ignored, even if NaN), and
// when every state is -inf the result is out = 0, lse = -inf, as for a fully masked row.
#pragma once

#include <cstdint>

#include "jit/types.h"

namespace flexjit {

// n states of one row: out_i = outs + i * out_stride (dv floats), lse_i = lses[i * lse_stride].
// Writes dv floats to out and the merged lse to *lse.
void merge_states_row(int64_t n, const float* outs, int64_t out_stride, const float* lses, int64_t lse_stride,
                      int64_t dv, float* out, float* lse);

// The public merge of two states: out_a / out_b [..., L, Dv] (rank 2-4, any float dtype, any
// strides, same shape and dtype), lse_a / lse_b [..., L] fp32 (the leading dims of out). Writes
// out (out_a's shape and dtype) and lse (fp32, lse_a's shape). out may alias out_a or out_b and
// lse lse_a or lse_b (rows are merged one at a time). Throws flexjit::Error on bad shapes.
void merge_attention_states(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                            const TensorView& lse_b, const TensorView& out, const TensorView& lse);

// Stores n floats to a row of a kernel dtype (fp32, bf16 round-to-nearest-even, fp16) with an
// element stride: how host code writes a merged row back.
void store_row_f32(DType dtype, void* dst, int64_t stride, const float* src, int64_t n);

}  // namespace flexjit

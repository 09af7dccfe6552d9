// The CPU backward pass of flex_attention (templates/cpu/flash_backward.h): gradients of q, k, v
// and of the captured float buffers a score_mod reads (learnable biases), deterministic: the
// result does not depend on the thread count or on scheduling, bit for bit.
#pragma once

#include <string>
#include <vector>

#include "runtime/attention.h"

namespace flexjit {

// Where one buffer's gradient goes: an fp32 contiguous view with the bound buffer's sizes; it is
// overwritten with dL/d(buffer).
struct BufferGrad {
  std::string name;
  TensorView grad;
};

// The gradients of flex_attention(q, k, v, mods, block_mask, opt) given dout = dL/d(out):
//   q, k, v, out as for flex_attention (out: the forward's result); dout like out;
//   lse fp32 [B, Hq, Lq]: the forward's (return it with lse != null);
//   dq [B, Hq, Lq, D], dk [Bkv, Hkv, Lkv, D], dv [Bkv, Hkv, Lkv, Dv]: fp32 contiguous, written
//   (a broadcast KV batch, Bkv = 1 < B, gets the sum over the batch);
//   buffer_grads: the buffers (by name) whose gradients are wanted: float buffers that the
//   score_mod reads (mask_mods have no gradient);
//   dlse: dL/d(lse), fp32 [B, Hq, Lq] any strides, when the lse output is used downstream (null:
//   none; a fully masked row's entry is ignored).
// Follows the forward's masking: a fully masked row (lse -inf) has zero gradients. The kernel
// recomputes the scores from q, k and lse (memory linear in L). opt.block_m / block_n set the
// backward's tiles (default 64 x 64; they must divide the BlockMask's blocks).
// Throws flexjit::Error on bad input, naming the problem and the fix.
void flex_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& dout, const TensorView& lse, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const ModSet& mods,
                             const ModBindings& bind, const std::vector<BufferGrad>& buffer_grads = {},
                             const runtime::BlockMask* block_mask = nullptr, const AttentionOptions& opt = {},
                             AttentionReport* report = nullptr, const TensorView* dlse = nullptr);

namespace runtime {
// The transpose of a block mask: per KV block of m, the q-blocks that visit it (partial and
// full lists, ascending), laid out as a BlockMask whose "q" axis is m's KV axis (num_q_blocks =
// m.num_kv_blocks, q_block_size = m.kv_block_size, and the other way round).
BlockMask transpose_block_mask(const BlockMask& m);
// How many fixed groups of work items the buffer-gradient pass uses for `items` items when the
// wanted gradients hold `grad_elems` floats in all: each group has its own accumulators (at most
// ~256 MiB together), summed in group order. Depends on nothing else (not the thread count), so
// the result is the same bits on any machine size.
int64_t grad_groups(int64_t items, int64_t grad_elems);
}  // namespace runtime

}  // namespace flexjit

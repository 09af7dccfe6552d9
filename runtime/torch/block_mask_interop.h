// BlockMask interop with PyTorch FlexAttention. PyTorch keeps a BlockMask as int32 tensors
//   kv_num_blocks [B, H, QB], kv_indices [B, H, QB, KVB] (+ optional full_kv_*), BLOCK_SIZE
// where every index row is KVB = ceil(Lkv / kv_block) wide; ours (runtime::BlockMask) keeps the
// same lists in flat vectors whose rows are only kv_stride / full_kv_stride wide. These two
// functions convert between them, so a mask built on either side can be used on the other.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "runtime/block_mask.h"

namespace flexjit {

// PyTorch's BlockMask tensors (the forward half: q_num_blocks / q_indices are not needed).
struct TorchBlockMaskTensors {
  at::Tensor kv_num_blocks;       // int32 [B, H, QB]; B or H of 1 broadcasts
  at::Tensor kv_indices;          // int32 [B, H, QB, KVB]; entries past kv_num_blocks are ignored
  at::Tensor full_kv_num_blocks;  // undefined, or int32 [B, H, QB]
  at::Tensor full_kv_indices;     // undefined, or int32 [B, H, QB, KVB]
  int64_t q_block_size = 128, kv_block_size = 128;  // PyTorch's BLOCK_SIZE
};

// PyTorch -> ours, for a call with query length Lq and key length Lkv (PyTorch's seq_lengths).
// Checks everything the kernel would otherwise trust: CPU int32/int64 tensors of matching
// ranks and [B, H, QB] prefixes, QB = ceil(Lq / q_block_size), KVB = ceil(Lkv / kv_block_size),
// counts in 0..KVB, listed indices in 0..KVB-1, and no block listed twice in a row (partial and
// full lists together). Throws flexjit::Error naming the tensor, the row and the fix.
runtime::BlockMask from_torch_block_mask(const TorchBlockMaskTensors& t, int64_t Lq, int64_t Lkv);

// Ours -> PyTorch: contiguous int32 CPU tensors, rows padded to KVB columns with zeros (PyTorch
// reads only the first kv_num_blocks entries of a row). Full tensors are always defined.
TorchBlockMaskTensors to_torch_block_mask(const runtime::BlockMask& m);

}  // namespace flexjit

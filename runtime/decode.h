// The decode path: flash decoding (templates/cpu/flash_decode.h) for calls with a few query
// rows per sequence, over a contiguous or a paged KV cache. flex_attention dispatches here (see
// its dispatch rule in runtime/attention.h); paged_flex_attention always comes here.
//
//   plan      rows per item, BLOCK_N and PARTITION_SIZE (runtime/tuning.h: user > tuned > cost
//             model), whether a GQA group shares one item
//   kernels   the decode kernel (per dtype, head dims, BLOCK_M, BLOCK_N, GQA group) + the mods
//   mask      the given BlockMask, or one built for this call (paged: at absolute positions)
//   run       items (b, head, row block, partition) on the pool; with several partitions each
//             writes a partial (out, lse) to a workspace, merged after (runtime/merge.h)
#pragma once

#include "runtime/attention.h"

namespace flexjit::runtime {

// The KV side of a decode call: contiguous views, or a paged cache with its tables.
struct DecodeKv {
  const TensorView* k = nullptr;  // contiguous [Bkv, Hkv, Lkv, D] ...
  const TensorView* v = nullptr;  // ... [Bkv, Hkv, Lkv, Dv]
  // Paged (block_table != null): k / v are then [num_pages, page_size, Hkv, D / Dv].
  const TensorView* block_table = nullptr;  // int32 [B, max_pages]
  const TensorView* seq_lens = nullptr;     // int32 [B]
};

// Whether a validated flex_attention call takes the decode path (the rule in attention.h).
bool decode_applies(const TensorView& q, const TensorView& k, const TensorView& v, const BlockMask* block_mask,
                    const AttentionOptions& opt);

// Runs a decode call whose inputs flex_attention / paged_flex_attention have validated.
void run_decode(const TensorView& q, const DecodeKv& kv, const TensorView& out, const TensorView* lse,
                const ModSet& mods, const ModBindings& bind, const BlockMask* block_mask,
                const AttentionOptions& opt, AttentionReport* report);

}  // namespace flexjit::runtime

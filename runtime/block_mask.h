// Block-sparse masks in PyTorch FlexAttention's layout: for each (b, h, q-block) a list of
// partial KV blocks (mask_mod evaluated per element) and full KV blocks (mask_mod skipped).
// B or H of size 1 broadcasts. Index rows are only as wide as the fullest row needs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "jit/mods.h"
#include "templates/mod_abi.h"

namespace flexjit::runtime {

struct BlockMask {
  int64_t B = 1, H = 1;  // 1 = broadcast over the call's batch / query heads
  int64_t Lq = 0, Lkv = 0;
  int64_t q_block_size = 128, kv_block_size = 128;
  int64_t num_q_blocks = 0, num_kv_blocks = 0;
  int64_t kv_stride = 0, full_kv_stride = 0;  // row widths of kv_indices / full_kv_indices
  std::vector<int32_t> kv_num_blocks;         // [B, H, num_q_blocks]
  std::vector<int32_t> kv_indices;            // [B, H, num_q_blocks, kv_stride]
  std::vector<int32_t> full_kv_num_blocks;    // [B, H, num_q_blocks]
  std::vector<int32_t> full_kv_indices;       // [B, H, num_q_blocks, full_kv_stride]

  size_t bytes() const;
  // Visited blocks / all blocks: 1.0 for dense, ~0.5 for causal.
  double density() const;
  int64_t partial_blocks() const;
  int64_t full_blocks() const;
  std::string describe() const;  // "BlockMask B=1 H=1 Lq=4096 ... partial=32 full=496 (48.4%)"
};

struct BlockMaskBuildStats {
  int64_t blocks = 0;              // (b, h, q-block, kv-block) combinations examined
  int64_t decided_by_interval = 0; // classified without touching elements
  int64_t evaluated = 0;           // classified by the JIT-compiled exact evaluator
  double ms = 0;
  std::string classify_cache;      // cache state of the classify kernel ("" if not needed)
};

// Builds a BlockMask from mods.mask_mod (which must exist) without materialising the dense
// [Lq, Lkv] mask: interval analysis of the mask IR decides most blocks; the rest are evaluated
// exactly by a JIT-compiled kernel. If the mask_mod does not read b (or h), B (or H) is 1.
BlockMask create_block_mask(const ModSet& mods, const ModBindings& bind, int64_t B, int64_t H,
                            int64_t Lq, int64_t Lkv, int64_t q_block_size = 128,
                            int64_t kv_block_size = 128, BlockMaskBuildStats* stats = nullptr);

// For paged decoding: one q-block per sequence holding its Lq query rows at their absolute
// positions seq_lens[b] - Lq .. seq_lens[b] - 1, against keys [0, seq_lens[b]) in blocks of
// kv_block_size (blocks past a sequence's end are empty; seq_lens[b] = 0 leaves every block
// empty). B is 1 only when the mask_mod does not read b and every sequence has the same length.
BlockMask create_paged_block_mask(const ModSet& mods, const ModBindings& bind, int64_t B, int64_t H, int64_t Lq,
                                  const std::vector<int64_t>& seq_lens, int64_t kv_block_size,
                                  BlockMaskBuildStats* stats = nullptr);

// A mask of this geometry with no index arrays yet (sizes checked, throws flexjit::Error):
// the common start of every builder, including conversions from PyTorch's layout.
BlockMask make_geometry(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t q_block_size,
                        int64_t kv_block_size);

// Checks that m fits a call of batch B, H query heads and lengths Lq x Lkv whose kernel tiles
// are block_m x block_n (they must divide m's blocks), and that its index arrays are consistent
// and in range (the kernels trust them). Throws flexjit::Error("<who>: ...") otherwise.
void check_block_mask(const BlockMask& m, int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t block_m,
                      int64_t block_n, const std::string& who);

// The kernels' view of m (pointers into m: it must outlive the call).
FlexBlockMaskArgs kernel_args(const BlockMask& m);

// Every block full: what a call with no mask_mod visits (mostly for tests and comparisons).
BlockMask dense_block_mask(int64_t Lq, int64_t Lkv, int64_t q_block_size = 128,
                           int64_t kv_block_size = 128);

}  // namespace flexjit::runtime

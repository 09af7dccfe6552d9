// The ABI between the runtime (ordinary C++) and generated kernels (JIT-compiled C++).
// This header is included by both, so it uses no system headers and only C-layout structs.
// Any change here changes every kernel's cache key (the template text is hashed).
#ifndef FLEXJIT_MOD_ABI_H
#define FLEXJIT_MOD_ABI_H

typedef long long fj_i64;

// A captured tensor read by a mod: `name[i]` or `name(i, j, ...)`. Strides in elements.
// Element dtype and rank are compile-time facts of the generated mod code.
struct FlexBuffer {
  const void* data;
  fj_i64 sizes[4];
  fj_i64 strides[4];
};

// What generated mod code may read besides its own arguments.
struct FlexModArgs {
  const struct FlexBuffer* buffers;  // in ModSet order (sorted by name)
  const float* params;               // runtime scalars, in ModSet order (sorted by name)
  int* error_flag;                   // set to 1 by a mod that indexed a buffer out of range
};

// One tile of scores for the mods: the score of (q_idx, kv_idx) = (q0 + m, kv0 + n) is
// s[n * ld + m * ld_m], for m < mvalid and n < nvalid (nothing else is read or written; q_idx
// and kv_idx are always inside the call's query and KV ranges). The prefill kernels pass S^T
// (ld_m = 1: query rows contiguous), the decode kernels S (ld = 1: keys contiguous); the mods
// kernel vectorises along whichever is contiguous.
struct FlexModTile {
  float* s;
  fj_i64 ld, ld_m;
  fj_i64 b, h, q0, kv0;
  int mvalid, nvalid;
  int mask;  // 1: a partial block, evaluate mask_mod (masked -> -inf); 0: score_mod only
};
// Applies score_mod (then scales by log2 e: the kernels' softmax is base 2) and, when
// tile->mask, mask_mod to a tile in place.
typedef void (*FlexApplyModsFn)(const struct FlexModTile* tile, const struct FlexModArgs* mod);

// Block-sparse mask in PyTorch's BlockMask layout (int32, contiguous):
//   kv_num_blocks      [B, H, q_blocks]
//   kv_indices         [B, H, q_blocks, kv_indices_stride]
//   full_kv_num_blocks, full_kv_indices: the same (may be null: no full blocks)
// A dim of size 1 broadcasts over the call's batch or query heads. Listed blocks are in units of
// q_block_size x kv_block_size; the kernel's blocks divide them (the runtime checks). "Partial"
// blocks evaluate mask_mod per element; "full" blocks skip it. kv_num_blocks == null means no
// block mask: every KV block is visited, as partial if the kernel has a mask_mod.
// kv_indices_stride / full_kv_indices_stride: the index rows' widths. PyTorch's layout uses
// kv_blocks for both; flexjit's own BlockMask stores only as many columns as the fullest row
// needs (a 128k causal mask then takes ~4 MB, not 8), so each has its own.
struct FlexBlockMaskArgs {
  const int* kv_num_blocks;
  const int* kv_indices;
  const int* full_kv_num_blocks;
  const int* full_kv_indices;
  fj_i64 B, H, q_blocks, kv_blocks;
  fj_i64 q_block_size, kv_block_size;
  fj_i64 kv_indices_stride, full_kv_indices_stride;
};

// One forward prefill launch. Layouts (strides in elements, any values allowed):
//   q   [B,   Hq,  Lq,  D ]      k [Bkv, Hkv, Lkv, D]      v [Bkv, Hkv, Lkv, Dv]
//   out [B,   Hq,  Lq,  Dv]    lse [B,   Hq,  Lq]   (fp32, natural log; null = not wanted)
// Bkv is 1 (broadcast) or B. Query head h reads KV head h / (Hq / Hkv).
// q/k/v/out element type is the kernel's dtype; accumulation is fp32.
struct FlexPrefillArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  fj_i64 B, Hq, Hkv, Lq, Lkv, Bkv;
  fj_i64 q_strides[4];
  fj_i64 k_strides[4];
  fj_i64 v_strides[4];
  fj_i64 out_strides[4];
  fj_i64 lse_strides[3];
  float scale;  // multiplies q.k before score_mod

  struct FlexBlockMaskArgs mask;  // mask.kv_num_blocks == null: no block mask

  // The mods, compiled apart from this kernel (see FlexModKernels): null = no score_mod and
  // no mask_mod. With a score_mod the kernel hands apply_mods natural-scale scores
  // (scale * q.k) and gets base-2 ones back; without one it hands base-2 scores.
  FlexApplyModsFn apply_mods;
  int has_score_mod;
  int has_mask_mod;  // with no block mask, every KV block is then partial
  // 1: a tile's rows are (query head, query row) pairs of one KV head's GQA group (decode: K and
  // V stream once per group). Needs no block mask, or mask.H == 1 and Lq <= mask.q_block_size.
  int pack_gqa;
  struct FlexModArgs mod;

  // Varlen (FlashAttention-2's packed layout, runtime/varlen.h); cu_seqlens_q == null: dense.
  // Sequence s has queries [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and keys [cu_seqlens_k[s],
  // cu_seqlens_k[s + 1]) of the packed tensors, which come as q [1, Hq, total_q, D],
  // k [1, Hkv, total_k, D], v [1, Hkv, total_k, Dv], out [1, Hq, total_q, Dv], lse [1, Hq, total_q]
  // (views of FA2's [total, H, D]); B is the number of sequences. The mods see b = s and
  // positions inside the sequence. No block mask and no pack_gqa in this mode.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  // Work items: item = e * Hq + h, with (sequence, q-block) = varlen_items[2e], [2e + 1]
  // (the runtime lists them dearest first; empty sequences have none).
  const int* varlen_items;
  // The band a query row may see, aligned bottom-right: row i of a sequence with lq queries and
  // lk keys sees keys j with i + lk - lq - window_left <= j <= i + lk - lq + window_right
  // (-1 = unlimited on that side). Blocks outside it are never visited; blocks it cuts are
  // partial, and the mods' mask_mod (which the runtime made to hold the band) masks them.
  fj_i64 window_left, window_right;
  int varlen_mask_all;  // 1: every visited block is partial (the user gave a mask_mod)
};

// Kernel entry (one per translation unit, name chosen by jit/instantiate):
//   extern "C" void ENTRY(const FlexPrefillArgs* args, fj_i64 begin, fj_i64 end);
// processes work items [begin, end) of the linearised (b, h, m_block) space,
//   item = (b * H + h) * num_m_blocks + m_block,  num_m_blocks = ceil(rows / BLOCK_M),
// with H = Hq and rows = Lq, or with pack_gqa H = Hkv and rows = GQA_GROUP * Lq; in varlen
// mode the items listed by varlen_items.
// The runtime splits the item space across threads.
typedef void (*FlexPrefillFn)(const struct FlexPrefillArgs*, fj_i64, fj_i64);

// One flash-decoding launch (templates/cpu/flash_decode.h): a few query rows per sequence
// (Lq <= 16) against a long KV, split into partitions of partition_size keys that run in
// parallel. Head units: H = Hkv with pack_gqa (a unit's rows are the GQA_GROUP * Lq (head, query)
// pairs of one KV head, so K and V are read once per group) or Hq without it (rows = the Lq
// queries of one head). Work item = (b, chunk of heads_per_item units, row block, partition),
// linearised as below (heads_per_item); num_row_blocks = ceil(rows / BLOCK_M).
//   q [B, Hq, Lq, D]   out [B, Hq, Lq, Dv]   lse [B, Hq, Lq] (fp32, natural log; null = not wanted)
// KV, contiguous (block_table == null): k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv] with
//   k_strides / v_strides over (b, h, position, d); Bkv is 1 or B; every sequence has Lkv keys
//   and query i sits at q_idx = i.
// KV, paged (block_table != null): k [num_pages, page_size, Hkv, D], v [..., Dv] with strides
//   over (page, slot, h, d); key position n of sequence b lives in page
//   block_table[b * block_table_stride + n / page_size], slot n % page_size. Sequence b has
//   seq_lens[b] keys and query i sits at the absolute position q_idx = seq_lens[b] - Lq + i.
//   The runtime has checked every page index a call can reach.
// The last dim of k and v is contiguous (stride 1). Partition p covers keys
// [p * partition_size, (p + 1) * partition_size) of its sequence (a multiple of BLOCK_N).
// With ws_out == null (one partition) the kernel writes out and lse; otherwise each item writes
// its partial state, which the runtime merges (runtime/merge.h):
//   ws_out [num_items, heads_per_item * BLOCK_M, Dv] fp32: the item's rows' softmax-normalised
//          partial outputs, unit u's row r at u * BLOCK_M + r
//   ws_lse [num_items, heads_per_item * BLOCK_M] fp32: their natural-log LSE (-inf when no key
//          was kept: out 0)
struct FlexDecodeArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  fj_i64 B, Hq, Hkv, Lq, Lkv, Bkv;
  fj_i64 q_strides[4];
  fj_i64 k_strides[4];
  fj_i64 v_strides[4];
  fj_i64 out_strides[4];
  fj_i64 lse_strides[3];
  float scale;
  const int* block_table;  // null: contiguous KV
  fj_i64 block_table_stride, page_size;
  const int* seq_lens;     // paged only
  fj_i64 partition_size, num_partitions;
  // Head units per work item (>= 1; more than one only with one row block and a mask that does
  // not differ by head). Item = ((b * chunks + chunk) * row_blocks + row_block) * num_partitions
  // + partition, chunks = ceil(H / heads_per_item); a chunk's units are heads chunk * hpi ...
  fj_i64 heads_per_item;
  float* ws_out;
  float* ws_lse;
  // Every row of an item uses q-block 0 of its (b, h) row (the runtime builds paged masks with
  // one q-block holding the Lq rows at their positions).
  struct FlexBlockMaskArgs mask;
  FlexApplyModsFn apply_mods;
  int has_score_mod;
  int has_mask_mod;
  int pack_gqa;
  struct FlexModArgs mod;
};
//   extern "C" void ENTRY(const FlexDecodeArgs* args, fj_i64 begin, fj_i64 end);
typedef void (*FlexDecodeFn)(const struct FlexDecodeArgs*, fj_i64, fj_i64);

// Block classification for building a BlockMask from a mask_mod without a dense mask:
// classify(args, begin, end): for each item in [begin, end) (an index into the blocks array) it evaluates mask_mod over
// the block's elements (clipped to Lq x Lkv) and writes out[i] = 0 (empty), 1 (partial) or
// 2 (full). Each block is (b, h, q_block, kv_block).
struct FlexClassifyArgs {
  const int* blocks;  // [n][4] = b, h, q_block, kv_block
  signed char* out;   // [n]
  fj_i64 Lq, Lkv;
  fj_i64 q_block_size, kv_block_size;
  // null, or [n][4] = q_begin, q_end, kv_begin, kv_end per block: the element ranges to classify
  // instead of the ones the block indices give (paged decoding: absolute positions per sequence).
  const fj_i64* ranges;
  struct FlexModArgs mod;
};
typedef void (*FlexClassifyFn)(const struct FlexClassifyArgs*, fj_i64, fj_i64);

// A mod set's kernels: one small translation unit per mod set (compiled in tens of ms), apart
// from the shape-specialised attention kernels (compiled once per shape and reused by every
// mod). Its one entry fills the table:
//   extern "C" void ENTRY(struct FlexModKernels* out);
struct FlexModKernels {
  FlexApplyModsFn apply;     // for FlexPrefillArgs.apply_mods
  FlexClassifyFn classify;   // BlockMask building (every block full when there is no mask_mod)
  int has_score_mod;
  int has_mask_mod;
};
typedef void (*FlexModKernelsFn)(struct FlexModKernels*);

// ---- the backward pass (templates/cpu/flash_backward.h, templates/cpu/mods_grad.h) ----

// Gradients of the captured float buffers a score_mod reads: grads[slot] (ModSet buffer order)
// is a dense fp32 accumulator with the buffer's sizes, row-major, or null when that buffer's
// gradient is not wanted. Each accumulator belongs to one thread at a time (no atomics: the
// runtime gives each fixed group of work items its own and sums them in a fixed order).
struct FlexGradArgs {
  float* const* grads;
};
// One tile for score_mod's backward: element (q0 + m, kv0 + n) at [n * ld + m * ld_m], for
// m < mvalid, n < nvalid (ld == 1: keys along the unit stride; else ld_m == 1). s holds the raw
// natural-scale scores (scale * q.k) that score_mod saw; ds on entry dL/d(score_mod's output), on return dL/d(score). With
// grad != null, dL/d(buffer element) += ds * d score_mod / d element for every read of a buffer
// whose accumulator is not null.
struct FlexModGradTile {
  const float* s;
  float* ds;
  fj_i64 ld, ld_m;
  fj_i64 b, h, q0, kv0;
  int mvalid, nvalid;
};
typedef void (*FlexApplyModsGradFn)(const struct FlexModGradTile* tile, const struct FlexModArgs* mod,
                                    const struct FlexGradArgs* grad);
// A score_mod's backward kernels (one small TU per mod set, compiled only when a backward runs):
//   extern "C" void ENTRY(struct FlexModGradKernels* out);
struct FlexModGradKernels {
  FlexApplyModsGradFn apply_grad;
  int num_grad_loads;  // differentiable buffer reads in the score_mod (0: no buffer gradients)
};
typedef void (*FlexModGradKernelsFn)(struct FlexModGradKernels*);

// One backward launch, FlashAttention-2 style: P is recomputed from q, k and the forward's lse
// (no L x L buffer). Three passes over the same arguments, each its own item space:
//   pass 0: delta = rowsum(dout * out), and zeroes the dq partials    items (b, hq, m_block)
//   pass 1: units (b, hkv, chunk): the chunk's KV blocks of BLOCK_N rows in order, each with
//           the GQA group's heads and the q-blocks that visit it (mask_t); dk, dv of those rows,
//           and the chunk's share of dq added into its own partial (dq_part[chunk])
//   pass 2: dq = scale * sum over chunks of the partials, in chunk order  items (b, hq, m_block)
// Per visited (q-block, KV block): S = scale q k^T, score_mod and mask as in the forward,
// P = exp(S' - lse), dP = dout v^T, dS' = P (dP - delta), dS = dS' * score_mod'(S) (apply_grad),
// dv += P^T dout, dk += scale dS^T q, dq_part += dS k. Every unit owns the rows it writes and
// adds in a fixed order, so the result does not depend on how units are spread over threads.
// Layouts: q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv], out / dout [B, Hq, Lq, Dv]
// (the kernel's dtype, any strides; the runtime expands a broadcast KV batch); lse [B, Hq, Lq]
// fp32 natural log (-inf: a fully masked row, whose gradients are 0); delta fp32 contiguous
// [B, Hq, Lq]; dq [B, Hq, Lq, D], dk [B, Hkv, Lkv, D], dv [B, Hkv, Lkv, Dv] fp32 contiguous;
// dq_part [kv_chunks, B, Hq, m_blocks, BLOCK_M, D rounded up to 16] fp32, 64-byte aligned.
// Chunk c of a (b, hkv) holds KV blocks [c * n_blocks / kv_chunks, (c + 1) * n_blocks / kv_chunks).
// mask: the forward's block mask (kv_num_blocks == null: every block, partial iff has_mask_mod);
// mask_t: its transpose (kv_num_blocks / kv_indices list, per KV block of mask.kv_block_size,
// the q-blocks of mask.q_block_size that visit it, ascending; same B, H, sizes; q_blocks and
// kv_blocks swapped).
struct FlexBackwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  float* delta;
  const float* dlse;  // dL/d lse [B, Hq, Lq] at dlse_strides (null: none): dS' = P (dP - delta + dlse)
  fj_i64 dlse_strides[3];
  float* dq;
  float* dk;
  float* dv;
  float* dq_part;
  fj_i64 kv_chunks;
  fj_i64 B, Hq, Hkv, Lq, Lkv;
  fj_i64 q_strides[4];
  fj_i64 k_strides[4];
  fj_i64 v_strides[4];
  fj_i64 out_strides[4];
  fj_i64 dout_strides[4];
  fj_i64 lse_strides[3];
  float scale;
  struct FlexBlockMaskArgs mask;
  struct FlexBlockMaskArgs mask_t;
  FlexApplyModsFn apply_mods;        // the forward's (null: no mod)
  int has_score_mod;
  int has_mask_mod;
  FlexApplyModsGradFn apply_grad;    // null: score_mod' = 1 (no score_mod)
  struct FlexModArgs mod;
  const struct FlexGradArgs* grad;   // pass 1: buffer gradient accumulators (null: none)
  int pass;
};
//   extern "C" void ENTRY(const FlexBackwardArgs* args, fj_i64 begin, fj_i64 end);
typedef void (*FlexBackwardFn)(const struct FlexBackwardArgs*, fj_i64, fj_i64);

#endif  // FLEXJIT_MOD_ABI_H

// The ABI between the CUDA runtime (host C++) and the NVRTC-compiled CUDA kernels. Included by
// both, after templates/mod_abi.h, so it uses no system headers and only C-layout structs. Any
// change here changes every CUDA kernel's cache key (the template text is hashed).
#ifndef FLEXJIT_CUDA_ABI_H
#define FLEXJIT_CUDA_ABI_H

// Captured tensors and runtime scalars travel inside the launch's parameter block (passed by
// value as a __grid_constant__ kernel parameter): no device allocation and no host-to-device
// copy per call, which keeps a call capturable in a CUDA graph. These bound a mod set on CUDA.
#define FLEXJIT_CUDA_MAX_BUFFERS 8
#define FLEXJIT_CUDA_MAX_PARAMS 16

// One forward prefill launch on CUDA. Layouts as FlexPrefillArgs (mod_abi.h), strides in
// elements; the last dim of q, k and v is contiguous and every row starts 16-byte aligned (the
// runtime checks, or copies): q [B, Hq, Lq, D], k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv],
// out [B, Hq, Lq, Dv] (last dim contiguous), lse [B, Hq, Lq] fp32 natural log (null: not
// wanted). Query head h reads KV head h / GQA_GROUP. Grid: x = ceil(Lq / BLOCK_M) query blocks,
// y = Hq, z = B; one CTA of BLOCK_M / 16 warps per (b, h, query block).
struct FlexCudaPrefillArgs {
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
  int* error_flag;  // device int the kernel ORs bits into: 1 a mod indexed a buffer out of range, 2 a block
                    // mask count or index out of range (skipped instead of read; device masks are not
                    // checked on the host)
  struct FlexBuffer buffers[FLEXJIT_CUDA_MAX_BUFFERS];  // in ModSet order
  float params[FLEXJIT_CUDA_MAX_PARAMS];                // in ModSet order
};

// One flash-decoding launch on CUDA (templates/cuda/flash_decode.cuh): a few query rows per
// sequence (Lq <= 16) against a long KV split into partitions of partition_size keys.
//   q [B, Hq, Lq, D], out [B, Hq, Lq, Dv], lse [B, Hq, Lq] fp32 (null: not wanted); the last dim
//   contiguous and rows 16-byte aligned, as for prefill.
// KV, contiguous (block_table == null): k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv], strides over
//   (b, h, position, d); query i sits at q_idx = i.
// KV, paged (block_table != null): k [num_pages, page_size, Hkv, D], v [..., Dv], strides over
//   (page, slot, h, d); sequence b's key n is in page block_table[b * block_table_stride +
//   n / page_size], slot n % page_size; it has seq_lens[b] keys and query i sits at the absolute
//   position seq_lens[b] - Lq + i. Device-side tables are not checked on the host: a page index
//   outside [0, num_pages), a sequence longer than max_pages * page_size or than the grid's
//   partitions cover, or 0 < seq_lens[b] < Lq, is not read (zero-filled) and raises bit 2 of
//   *error_flag (bit 1: a mod indexed a buffer out of range).
// Head units: Hkv with pack_gqa (a unit's rows are its GQA group's GQA_GROUP * Lq (head, query)
// pairs, head-major, so K and V are read once per group), else Hq (rows = one head's Lq queries).
// Grid: x = num_partitions, y = units * row_tiles (row tile = BLOCK_M = 16 rows), z = B; one CTA
// of FLEXJIT_DECODE_WARPS warps, which take the partition's KV blocks in turn.
// With ws_out == null (one partition) the kernel writes out and lse; otherwise CTA (p, y, b)
// writes its rows' softmax-normalised partial output and natural-log LSE (-inf: no key kept) at
//   ws_out [B, units * row_tiles, num_partitions, BLOCK_M, Dv], ws_lse [..., BLOCK_M] (fp32),
// and the merge entry (FLEXJIT_ENTRY_MERGE, grid (units * row_tiles, B), BLOCK_M * 8 threads)
// combines them into out and lse.
struct FlexCudaDecodeArgs {
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
  int pack_gqa;
  const int* block_table;  // null: contiguous KV
  fj_i64 block_table_stride, page_size;
  fj_i64 max_pages, num_pages;  // block_table's columns; pages in k / v (indices checked against it)
  const int* seq_lens;     // paged only
  fj_i64 partition_size, num_partitions;
  float* ws_out;
  float* ws_lse;
  // q-block 0 of each (b, h) mask row holds the call's Lq rows (decode masks have one q-block);
  // with pack_gqa, mask.H is 1.
  struct FlexBlockMaskArgs mask;  // mask.kv_num_blocks == null: no block mask
  int* error_flag;
  struct FlexBuffer buffers[FLEXJIT_CUDA_MAX_BUFFERS];
  float params[FLEXJIT_CUDA_MAX_PARAMS];
};

#endif  // FLEXJIT_CUDA_ABI_H

// Host-side planning of one CUDA flash-decoding call (templates/cuda/flash_decode.cuh): checks,
// kernel spec, split into partitions, grids, shared memory, workspace and the
// __grid_constant__ parameter block. Plain C++ on plain views whose pointers are device pointers
// (never dereferenced here), so it is unit-tested on machines without a GPU; the kernels
// themselves run under the CPU emulator in tests (tests/support/cuda_emulator.h).
//
// The contract is the CPU decode's (runtime/attention.h paged_flex_attention, runtime/decode.h):
// the same q / out / lse layouts, contiguous or paged KV ([num_pages, page_size, Hkv, D] with
// block_table and seq_lens), absolute positions for paged queries, the same mods and BlockMask.
// CUDA graphs: a planned call allocates nothing and never synchronises; its workspace comes
// from the caller (set_cuda_decode_workspace) and its kernel is compiled before capture
// (run_cuda_decode once, or warm the cache).
#pragma once

#include <cstddef>
#include <string>

#include "runtime/cuda_prefill.h"
#include "runtime/tuning_db.h"

namespace flexjit {

// The KV side of a decode call, on the device.
struct CudaDecodeKv {
  const TensorView* k = nullptr;  // contiguous [Bkv, Hkv, Lkv, D], or paged [num_pages, page_size, Hkv, D]
  const TensorView* v = nullptr;  // ... Dv
  const TensorView* block_table = nullptr;  // paged: int32 [B, max_pages] (null: contiguous)
  const TensorView* seq_lens = nullptr;     // paged: int32 [B]
  // Paged: the longest seq_lens entry, known on the host (as vLLM passes it): it sizes the grid.
  // A sequence longer than this, or a page index past num_pages, is not read: the kernel zero-
  // fills and raises bit 2 of the error flag instead.
  int64_t max_seq_len = 0;
};

struct CudaDecodePlan {
  jit::KernelSpec spec;            // backend Cuda, kind Decode
  unsigned grid[3] = {0, 0, 0};    // (partitions, units x row tiles, B); any 0: nothing to launch
  unsigned block_threads = 0;
  int smem_bytes = 0;
  unsigned merge_grid[3] = {0, 0, 0};  // (units x row tiles, B, 1); used when num_partitions > 1
  unsigned merge_threads = 128;
  int64_t partition_size = 0, num_partitions = 1;
  bool pack_gqa = false;           // a GQA group's heads share one tile's rows
  std::string split;               // where PARTITION_SIZE came from: "user", "tuned" or "cost model"
  size_t workspace_bytes = 0;      // device memory the call needs (0 with one partition)
  FlexCudaDecodeArgs args{};
  std::string describe() const;    // "cuda decode bf16 ... grid 8x8x4, 128 threads, 70 KiB smem, 8 partitions of 512 (cost model)"
};

// The decode kernel spec plan_cuda_decode picks for these head dims and GQA group on `dev`:
// BLOCK_N (block_n, 0 = 32), then two K/V stages and 4 warps, fewer where shared memory is short.
// Throws flexjit::Error when nothing fits.
jit::KernelSpec cuda_decode_kernel_spec(DType dtype, int head_dim, int head_dim_v, int gqa_group,
                                        const CudaDeviceInfo& dev, int block_n = 0);

// The tuning database bucket of a CUDA decode call (runtime/tuning_db.h): the CPU decode's fields,
// with engine "cuda-mma", threads = the GPU's SMs and cpu = "GPU <name>" (the GPU model), so a
// choice tuned on one GPU model and SM count applies to calls there only. `work` = B x head units.
runtime::TuningBucket cuda_decode_bucket(DType dtype, int head_dim, int head_dim_v, int gqa_group, int64_t lq,
                                         int64_t lkv, int64_t work, bool paged, const CudaDeviceInfo& dev);

// q [B, Hq, Lq, D] with Lq in 1..16, out [B, Hq, Lq, Dv], lse [B, Hq, Lq] fp32 or null; bf16 or
// fp16; the last dim contiguous and rows 16-byte aligned. `mask`: a BlockMask on the device with
// one q-block holding the Lq rows (paged: built over absolute positions, runtime/block_mask.h
// create_paged_block_mask), or null. `error_flag`: a device int the kernels OR bits into (1: a
// mod indexed a buffer out of range; 2: a page index or sequence length out of range), or null.
// Knobs: opt.block_n (0 = 32), opt.partition_size; when the user sets neither and opt.use_tuning,
// the tuning database's entry for cuda_decode_bucket on this GPU (dev.name; `flexjit tune --device
// cuda` writes it; full build only), else the cost model (cuda_decode_cost_model_partition).
// plan.split says which ("user", "tuned", "cost model"). Throws flexjit::Error saying what is wrong.
CudaDecodePlan plan_cuda_decode(const TensorView& q, const CudaDecodeKv& kv, const TensorView& out,
                                const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                                const FlexBlockMaskArgs* mask, const AttentionOptions& opt,
                                const CudaDeviceInfo& dev, int* error_flag);

// The cost model's PARTITION_SIZE for `lkv` keys when the grid has `base_ctas` CTAs per partition
// (B x head units x row tiles) and `slots` CTAs run at once (SMs x CTAs per SM): the split with the
// least waves x keys per partition (wave quantisation: 136 CTAs on 132 slots take two waves), at
// least min_size keys a partition, a multiple of `step` (BLOCK_N); more partitions only when >= 3%
// better. Exposed for its tests.
int64_t cuda_decode_cost_model_partition(int64_t lkv, int64_t base_ctas, int64_t step, int64_t min_size,
                                         int64_t slots);

// Points the plan at `workspace` (plan.workspace_bytes of device memory, 16-byte aligned; null
// is fine when workspace_bytes is 0). Throws if the plan needs one and none is given.
void set_cuda_decode_workspace(CudaDecodePlan& plan, void* workspace);

// Compiles (or finds) the plan's kernels, loads them into the current context and enqueues the
// partition kernel and, with several partitions, the merge on `stream`. Needs a GPU.
CudaRunInfo run_cuda_decode(CudaDecodePlan& plan, const ModSet& mods, void* stream);

}  // namespace flexjit

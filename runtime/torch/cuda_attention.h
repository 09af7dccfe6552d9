// flex_attention on CUDA for libtorch: the at::Tensor side of runtime/cuda_prefill (plan, NVRTC
// compile through the kernel cache, launch on torch's current stream). Needs only torch_cpu / c10
// and the CUDA driver, loaded with dlopen (runtime/cuda_driver.h): no libtorch_cuda, no CUDA
// headers, no CPU backend (the CUDA-only build's op library links it without LLVM or TBB).
// Callers: flexjit::flex_attention's CUDA branch (flex_attention.cpp) and the op's CUDA kernel
// (op_common.h: ops::flex_attention_cuda, defined in cuda_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "runtime/torch/block_mask_interop.h"
#include "runtime/torch/flex_attention.h"

namespace flexjit {

// A tensor's element type as flexjit's DType (float32 / 64, bfloat16, float16, int32 / 64, bool);
// throws flexjit::Error naming `name` and what flexjit takes otherwise. Shared by the CPU and CUDA
// views.
DType dtype_of(const at::Tensor& t, const std::string& name);

// FlexOptions' scale, enable_gqa and kernel_options (BLOCK_M, BLOCK_N, USE_AMX, USE_DPBF16,
// PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION) as AttentionOptions; throws flexjit::Error for an
// unknown option or a bad value. The CPU and CUDA paths add what is their own.
AttentionOptions kernel_options_of(const FlexOptions& o);

// A strided view of a tensor on a CUDA device: data is a device pointer, never read on the host.
// Throws flexjit::Error for other devices, more than 4 dims or an unsupported dtype.
TensorView cuda_view_of(const at::Tensor& t, const std::string& name);

// A copy of the memory a host view spans on `device` (kept alive in *keep), as a view with the
// host view's sizes and strides. For buffers flexjit owns on the host (a registered mod's example
// buffers, a host BlockMask's mask_mod buffers): a synchronous copy per call.
TensorView copy_view_to_device(const TensorView& host, c10::Device device, const std::string& name,
                               std::vector<at::Tensor>* keep);

// PyTorch BlockMask tensors ready for a CUDA call of query q [B, Hq, Lq, D] against Lkv keys:
// int32, contiguous, on q's device; a B or H dim that is broadcast (size 1, or expanded with
// stride 0 as flexjit.create_block_mask returns it) becomes 1. Checks dtypes, ranks and shapes
// (as from_torch_block_mask does). Contents: tensors on the CPU are checked row by row before the
// copy (counts in 0..KVB, indices in 0..KVB-1, no block twice in a row); tensors already on the
// device are trusted, as PyTorch's flex_attention trusts them: reading them back would
// synchronise the stream and break CUDA-graph capture. Throws flexjit::Error.
TorchBlockMaskTensors cuda_block_mask(const TorchBlockMaskTensors& t, const at::Tensor& q, int64_t Lkv);

// The CUDA prefill kernel on q [B, Hq, Lq, D], k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv]: bf16
// or fp16 (fp32 too for Lq <= 16, which takes the decode kernel) on one CUDA device (rows that are not 16-byte aligned with a contiguous last dim are
// copied first). `bind` binds every buffer of `mods` to a view on that device; `mask` is null or
// from cuda_block_mask. Allocates out [B, Hq, Lq, Dv] (q's dtype) and, with o.return_lse,
// lse [B, Hq, Lq] fp32 on the device, and enqueues the kernel on torch's current stream of that
// device: asynchronous, nothing is synchronised (so a call can be captured in a CUDA graph once
// its kernel is compiled), except with FLEXJIT_CUDA_CHECK=1, which waits for the kernel and
// raises if a mod indexed a buffer out of range. o.kernel_options: BLOCK_M, BLOCK_N (default 64;
// they must divide the mask's blocks); FORCE_USE_FLEX_ATTENTION, PARTITION_SIZE (decode), USE_AMX /
// USE_DPBF16 = 0 are accepted and = 1 refused (CPU engines). o.report gets backend "cuda", the arch,
// the kernel's cache state and compile time. Throws flexjit::Error naming the problem and the fix.
// Lq <= 16 (and no FORCE_USE_FLEX_ATTENTION, and a BlockMask, if any, whose q-block holds the rows)
// runs the CUDA flash-decoding kernel instead (runtime/cuda_decode.h: split-KV partitions chosen
// by PARTITION_SIZE or a cost model filling the SMs, merged by a second kernel; its workspace from
// torch's caching allocator), with path "decode" and the partitions in the report.
FlexResult cuda_flex_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ModSet& mods,
                               const ModBindings& bind, const TorchBlockMaskTensors* mask, const FlexOptions& o);

// paged_flex_attention on CUDA (the CPU contract of runtime/attention.h): q [B, Hq, Lq <= 16, D],
// k_cache / v_cache [num_pages, page_size, Hkv, D / Dv] bf16 / fp16 on one device, block_table
// int32 [B, max_pages] and seq_lens int32 [B] on that device or the CPU. seq_lens on the CPU is
// checked and its maximum sizes the grid; on the device it is not read (no synchronisation: the
// call stays graph-capturable) and the table's capacity sizes the grid instead, with bad entries
// caught on the device (FLEXJIT_CUDA_CHECK=1 raises them). With seq_lens on the CPU and mods that
// read no tensors, a BlockMask over absolute positions is built on the host and copied (full build),
// so blocks a mask_mod empties are skipped; otherwise the mask_mod is evaluated on every key block.
// Asynchronous, on torch's current stream.
FlexResult cuda_paged_flex_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_table, const at::Tensor& seq_lens, const ModSet& mods,
                                     const ModBindings& bind, const FlexOptions& o);

}  // namespace flexjit

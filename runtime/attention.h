// The CPU runtime entry: validates a call, picks a kernel (JIT, cached), binds mods, and runs
// it in parallel with TBB. Works on plain strided views; runtime/torch wraps it for at::Tensor.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "jit/mods.h"
#include "runtime/block_mask.h"

namespace flexjit {

struct AttentionOptions {
  std::optional<double> scale;  // default 1/sqrt(D)
  bool enable_gqa = false;      // allow Hq != Hkv (Hq must be a multiple of Hkv)
  int block_m = 0;              // BLOCK_M; 0 = default
  int block_n = 0;              // BLOCK_N; 0 = default
  int num_threads = 0;          // 0 = all cores (TBB default); with parallel_for: that pool's size
  // Decode (see the dispatch rule at flex_attention): keys per partition, 0 = tuned or cost
  // model. A multiple of BLOCK_N (and of the page size for paged KV); the kernel option PARTITION_SIZE.
  int64_t partition_size = 0;
  // Run the prefill kernel even where the decode kernel applies (PyTorch's kernel option
  // FORCE_USE_FLEX_ATTENTION). Paged calls have no prefill kernel and refuse it.
  bool force_prefill = false;
  // false: knobs not given above come from the cost model even where the tuning database (see
  // `flexjit tune`) has an entry for the call's shape (reproducible runs, benchmarks).
  bool use_tuning = true;
  // bf16 and fp16 matmuls on AMX tiles (fp16 split into bf16 hi + lo halves, three products):
  // -1 = when the host has AMX-BF16 and the OS grants the tile state (and FLEXJIT_AMX is not 0),
  // for decode calls only from runtime::kDecodeAmxMinRows query rows per KV head (GQA group x
  // Lq; bf16 on paged caches from 4, fp16 from 16), 0 = never, 1 = required (an error where unavailable). Needs BLOCK_N a multiple of 32;
  // fp32 always uses the FMA (prefill) or dot (decode) engine.
  int use_amx = -1;
  // bf16 matmuls on AVX512-BF16's vdpbf16ps (templates/cpu/prefill_dpbf16.h), the engine for
  // hosts without AMX: -1 = where the host has AVX512-BF16 and AMX is not used (and
  // FLEXJIT_DPBF16 is not 0; FLEXJIT_DPBF16=1 prefers it over AMX), 0 = never, 1 = required,
  // over AMX too (an error where unavailable). The kernel option USE_DPBF16.
  int use_dpbf16 = -1;
  // CUDA prefill on Hopper's warpgroup MMA (templates/cuda/flash_prefill_wgmma.cuh, sm_90a):
  // -1 = when FLEXJIT_CUDA_WGMMA=1 and the call allows it (an sm_90 GPU, D a multiple of 64 up to
  // 256, Dv 64 / 128 / 256, blocks of 64 or 128), else the mma.sync engine (the default until a
  // GPU run has measured both); 0 = never; 1 = required (an error where the call does not allow
  // it). The kernel option USE_WGMMA.
  int use_wgmma = -1;
  // Runs body over [0, n) split into chunks, on some thread pool; unset: TBB (num_threads
  // workers). The torch layer passes at::parallel_for, so a call shares torch's OpenMP threads
  // instead of competing with them (their spin-waits slowed a call right after SDPA by ~25%).
  // Chunks of items are rebalanced (interleaved cheap and dear items) before body sees them.
  std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)> parallel_for;
};

// One JIT kernel a call used.
struct KernelUse {
  std::string role;        // "attention" (shape-specialised) or "mods" (the mod set's kernels)
  std::string cache;       // miss / memory / disk / prebuilt (the costliest of the kernels')
  double compile_ms = 0;   // when cache == miss
  double load_ms = 0;      // when cache == disk
  std::string symbol, key, source_path;
};

// What a call did, for --report and the demo. cache / compile_ms / load_ms / lookup_us sum up
// all kernels of the call (cache: miss if any compiled, else disk if any loaded, else memory;
// compile_ms: wall time, the kernels compile in parallel); symbol / key / source_path are the
// attention kernel's; `kernels` has each one.
struct AttentionReport {
  std::string backend = "cpu";
  std::string target;            // cpu: the CPU the kernels were compiled for (host name or FLEXJIT_CPU_TARGET)
  std::string path = "prefill";  // "prefill" or "decode" (the kernel template that ran)
  bool paged = false;
  int64_t partition_size = 0;    // decode: keys per partition
  int64_t num_partitions = 0;    // decode: partitions per sequence (1: no split, no merge)
  std::string tuning;            // where the block sizes (and PARTITION_SIZE) came from: tuned, default or user
  double merge_ms = 0;           // decode: merging the partitions' states
  std::string cache;         // miss / memory / disk / prebuilt
  double compile_ms = 0;     // when cache == miss
  double load_ms = 0;        // when cache == disk
  double lookup_us = 0;      // kernel lookup overhead of this call
  double kernel_ms = 0;      // the parallel kernel run
  double block_mask_ms = 0;  // when a BlockMask was built for this call
  int block_m = 0, block_n = 0, gqa_group = 1;
  bool pack_gqa = false;     // a tile held a GQA group's query heads (decode-like calls)
  std::string engine = "fma";  // the attention kernel's matmul engine: fma, amx, dpbf16 (prefill) or dot (decode)
  std::string dtype;
  std::string symbol, key, source_path;
  std::string block_mask;    // BlockMask::describe() of the mask used, if any
  std::vector<KernelUse> kernels;
};

// q [B, Hq, Lq, D], k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv], out [B, Hq, Lq, Dv] (same dtype
// as q), lse [B, Hq, Lq] fp32 or null. Bkv is 1 or B. If mods has a mask_mod and block_mask is
// null, a BlockMask is built for this call (pass one in to reuse it across calls).
// Throws flexjit::Error on bad input, naming the problem and the fix.
//
// Dispatch: the call runs the flash-decoding kernel (templates/cpu/flash_decode.h: KV split into
// partitions that run in parallel, merged after) when Lq <= 16, opt.force_prefill is off,
// opt.use_dpbf16 is not 1 (that engine is the prefill kernel's), the last dims of k and v are
// contiguous and a given block_mask has q_block_size >= Lq and a kv_block_size that is a
// multiple of 16; otherwise the prefill kernel (flash_prefill.h).
void flex_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                    const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                    const runtime::BlockMask* block_mask = nullptr, const AttentionOptions& opt = {},
                    AttentionReport* report = nullptr);

// Flash decoding against a paged KV cache (FlashInfer's NHD layout):
//   q [B, Hq, Lq, D] with Lq <= 16, out [B, Hq, Lq, Dv], lse [B, Hq, Lq] fp32 or null;
//   k_cache [num_pages, page_size, Hkv, D], v_cache [num_pages, page_size, Hkv, Dv] (q's dtype,
//   last dim contiguous); block_table int32 [B, max_pages]; seq_lens int32 [B].
// Sequence b has seq_lens[b] keys, key n in page block_table[b, n / page_size] at slot
// n % page_size; its query i sits at the absolute position seq_lens[b] - Lq + i, and the mods
// see absolute q_idx and kv_idx (so `causal` works unchanged). seq_lens[b] = 0 (a padding
// slot) gives out 0 and lse -inf; otherwise seq_lens[b] >= Lq. Pages past seq_lens[b] are
// never read. A mask_mod is turned into a block mask over the absolute positions for this call.
// PARTITION_SIZE must be a multiple of page_size. Throws flexjit::Error on bad input
// (shapes, dtypes, page indices out of range, ...).
void paged_flex_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                          const TensorView& block_table, const TensorView& seq_lens, const TensorView& out,
                          const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                          const AttentionOptions& opt = {}, AttentionReport* report = nullptr);

// Whether bf16 and fp16 kernels can use AMX tiles in this process: the host CPU has AMX-TILE, AMX-BF16 and
// AVX512-BF16, Linux granted the tile data state (arch_prctl, asked once), and the environment
// does not say FLEXJIT_AMX=0. `why` (optional) gets the reason when it cannot.
bool amx_available(std::string* why = nullptr);

// Whether bf16 kernels can use vdpbf16ps: the host CPU has AVX512-BF16 and AVX512-BW, and the
// environment does not say FLEXJIT_DPBF16=0. `why` (optional) gets the reason when it cannot.
bool dpbf16_available(std::string* why = nullptr);

// The engine a prefill call on `dtype` asks for before its blocks are known (the AMX engine
// then still needs BLOCK_N a multiple of 32): the options and FLEXJIT_DPBF16 resolved against
// the host. Throws flexjit::Error when an option requires an engine that cannot run.
PrefillEngine preferred_prefill_engine(DType dtype, const AttentionOptions& opt);

// The prefill kernel's default block sizes (the cost model, when the tuning database has no
// entry) for a head dim, dtype, query length and engine.
void default_blocks(int head_dim, DType dtype, int64_t q_len, int* block_m, int* block_n,
                    PrefillEngine engine = PrefillEngine::Fma);

}  // namespace flexjit

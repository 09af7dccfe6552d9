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
  int num_threads = 0;          // 0 = all cores (TBB default)
  // bf16 matmuls on AMX tiles: -1 = when the host has AMX-BF16 and the OS grants the tile
  // state (and FLEXJIT_AMX is not 0), 0 = never, 1 = required (an error where unavailable).
  // Needs BLOCK_N a multiple of 32; other dtypes always use the FMA engine.
  int use_amx = -1;
  // Runs body over [0, n) split into chunks, on some thread pool; unset: TBB (num_threads
  // workers). The torch layer passes at::parallel_for, so a call shares torch's OpenMP threads
  // instead of competing with them (their spin-waits slowed a call right after SDPA by ~25%).
  // Chunks of items are rebalanced (interleaved cheap and dear items) before body sees them.
  std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)> parallel_for;
};

// One JIT kernel a call used.
struct KernelUse {
  std::string role;        // "attention" (shape-specialised) or "mods" (the mod set's kernels)
  std::string cache;       // miss / memory / disk
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
  std::string path = "prefill";
  std::string cache;         // miss / memory / disk
  double compile_ms = 0;     // when cache == miss
  double load_ms = 0;        // when cache == disk
  double lookup_us = 0;      // kernel lookup overhead of this call
  double kernel_ms = 0;      // the parallel kernel run
  double block_mask_ms = 0;  // when a BlockMask was built for this call
  int block_m = 0, block_n = 0, gqa_group = 1;
  bool pack_gqa = false;     // a tile held a GQA group's query heads (decode-like calls)
  bool amx = false;          // the attention kernel ran its matmuls on AMX tiles
  std::string dtype;
  std::string symbol, key, source_path;
  std::string block_mask;    // BlockMask::describe() of the mask used, if any
  std::vector<KernelUse> kernels;
};

// q [B, Hq, Lq, D], k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv], out [B, Hq, Lq, Dv] (same dtype
// as q), lse [B, Hq, Lq] fp32 or null. Bkv is 1 or B. If mods has a mask_mod and block_mask is
// null, a BlockMask is built for this call (pass one in to reuse it across calls).
// Throws flexjit::Error on bad input, naming the problem and the fix.
void flex_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                    const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                    const runtime::BlockMask* block_mask = nullptr, const AttentionOptions& opt = {},
                    AttentionReport* report = nullptr);

// Whether bf16 kernels can use AMX tiles in this process: the host CPU has AMX-TILE, AMX-BF16 and
// AVX512-BF16, Linux granted the tile data state (arch_prctl, asked once), and the environment
// does not say FLEXJIT_AMX=0. `why` (optional) gets the reason when it cannot.
bool amx_available(std::string* why = nullptr);

// The default kernel block sizes for a head dim, dtype and query length, for the FMA engine or
// (amx) the AMX one.
void default_blocks(int head_dim, DType dtype, int64_t q_len, int* block_m, int* block_n, bool amx = false);

}  // namespace flexjit

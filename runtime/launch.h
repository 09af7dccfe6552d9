// Running a kernel's work items on a thread pool: the caller's (AttentionOptions::parallel_for,
// e.g. torch's OpenMP threads) or TBB's.
#pragma once

#include <cstdint>
#include <functional>

#include <vector>

#include "jit/pipeline.h"
#include "runtime/attention.h"
#include "templates/mod_abi.h"

namespace flexjit::runtime {

// Calls run(begin, end) over disjoint ranges covering [0, items), in parallel. With `zigzag`
// and a caller's pool (which may cut [0, items) into one contiguous chunk per thread) chunk
// positions map to items 0, n-1, 1, n-2, ... so each chunk gets as many cheap as dear items
// (items ordered by a growing cost, like causal q-blocks). TBB steals work, so it needs none.
void run_items(const AttentionOptions& opt, int64_t items, bool zigzag,
               const std::function<void(int64_t begin, int64_t end)>& run);

// flex_attention's checks of q, k, v, out and lse (shapes, dtypes, GQA); throws flexjit::Error
// prefixed "flex_attention: ".
void check_attention_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                            const TensorView* lse, const AttentionOptions& opt);

// Fills the kernel part of a report: each kernel's role ("attention" for the first, "mods" for
// the rest), cache state and timings, and the call's summed cache / compile_ms / load_ms /
// lookup_us, with symbol / key / source_path from the first kernel. kernels_ms: the wall time of
// fetching them all.
void record_kernels(AttentionReport& rep, const std::vector<jit::KernelHandle>& kernels, double kernels_ms);

// An upper bound on the prefill kernel's per-thread tile scratch (bytes) for these blocks and
// engine; the kernel allows kTileScratchLimit (templates/cpu/prefill_<engine>.h static_assert it).
constexpr int64_t kTileScratchLimit = int64_t(1) << 20;
int64_t tile_scratch_bound(DType dtype, int64_t D, int64_t Dv, int64_t bm, int64_t bn, PrefillEngine engine);

// The prefill kernel's engine for the chosen blocks: `preferred` (preferred_prefill_engine),
// except that AMX needs BLOCK_N a multiple of 32 (else, for bf16, vdpbf16ps where it can run;
// else FMA).
// Checks the tile's per-thread scratch. Throws flexjit::Error prefixed by `what` (USE_AMX=1 with
// a BLOCK_N it cannot take, blocks too large for D / Dv).
PrefillEngine prefill_engine_for_blocks(PrefillEngine preferred, DType dtype, int bm, int bn, int64_t D,
                                        int64_t Dv, const AttentionOptions& opt, const char* what);

// A prefill call's kernels: [0] the attention kernel, [1] the mod set's (when it has a mod),
// the mods table filled from it (all null / 0 when the set has no mod), and the wall time of
// fetching them (compiled in parallel).
struct PrefillKernels {
  std::vector<jit::KernelHandle> kernels;
  FlexModKernels mods{};
  double ms = 0;
};
PrefillKernels get_prefill_kernels(DType dtype, int head_dim, int head_dim_v, int bm, int bn, int gqa_group,
                                   PrefillEngine engine, const ModSet& mods);

// The report of a prefill-kernel call (flex_attention's prefill path, varlen): its kernels
// (record_kernels) and knobs.
void record_prefill(AttentionReport& rep, const PrefillKernels& pk, int bm, int bn, const std::string& tuning,
                    int gqa_group, PrefillEngine engine, DType dtype);

}  // namespace flexjit::runtime

// Running a kernel's work items on a thread pool: the caller's (AttentionOptions::parallel_for,
// e.g. torch's OpenMP threads) or TBB's.
#pragma once

#include <cstdint>
#include <functional>

#include <vector>

#include "jit/pipeline.h"
#include "runtime/attention.h"

namespace flexjit::runtime {

// Calls run(begin, end) over disjoint ranges covering [0, items), in parallel. With `zigzag`
// and a caller's pool (which may cut [0, items) into one contiguous chunk per thread) chunk
// positions map to items 0, n-1, 1, n-2, ... so each chunk gets as many cheap as dear items
// (items ordered by a growing cost, like causal q-blocks). TBB steals work, so it needs none.
void run_items(const AttentionOptions& opt, int64_t items, bool zigzag,
               const std::function<void(int64_t begin, int64_t end)>& run);

// Fills the kernel part of a report: each kernel's role ("attention" for the first, "mods" for
// the rest), cache state and timings, and the call's summed cache / compile_ms / load_ms /
// lookup_us, with symbol / key / source_path from the first kernel. kernels_ms: the wall time of
// fetching them all.
void record_kernels(AttentionReport& rep, const std::vector<jit::KernelHandle>& kernels, double kernels_ms);

}  // namespace flexjit::runtime

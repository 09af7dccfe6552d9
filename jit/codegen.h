// IR -> the source of a mod, for one backend. One visitor, one spelling table per backend.
//
// The emitted text defines (see templates/mod_abi.h for FlexModArgs):
//   #define FLEXJIT_HAS_SCORE_MOD 0|1
//   #define FLEXJIT_HAS_MASK_MOD 0|1
//   FJ_FN float flexjit_score_mod(float score, fj_i64 b, fj_i64 h, fj_i64 q_idx,
//                                         fj_i64 kv_idx, const struct FlexModArgs* fj_mod);
//   FJ_FN bool flexjit_mask_mod(fj_i64 b, fj_i64 h, fj_i64 q_idx, fj_i64 kv_idx,
//                                       const struct FlexModArgs* fj_mod);
// (FJ_FN: `static inline` on CPU, `static __device__ __forceinline__` on CUDA), plus small helpers (bounds-checked buffer reads, UB-free integer ops). User text never
// reaches the output: names become slot numbers, literals are re-printed from the IR.
#pragma once

#include <string>

#include "jit/mods.h"

namespace flexjit::jit {

// Cpu: Clang C++17 for the in-process JIT (vectorisable inline math of our own).
// Cuda: CUDA C++ for NVRTC, header-free (no INFINITY, no cuda_fp16.h): FJ_FN functions are
// __device__ __forceinline__, buffers are read with __ldg, math is CUDA's expf/logf/tanhf.
enum class Backend { Cpu, Cuda };

std::string emit_mod_body(const ModSet& mods, Backend backend = Backend::Cpu);

}  // namespace flexjit::jit

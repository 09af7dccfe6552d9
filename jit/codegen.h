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

// The mods as code: the helpers (mod_helpers, unless with_helpers is false), the FLEXJIT_HAS_*
// and FLEXJIT_NUM_* macros, the buffer readers, flexjit_score_mod / flexjit_mask_mod and, on CPU,
// the relative-position tables.
std::string emit_mod_body(const ModSet& mods, Backend backend = Backend::Cpu, bool with_helpers = true);

// The backend's fixed helper code every mod body uses (FJ_FN, the error flag, integer and math
// helpers): the same text for every mod set, so a mods TU can put it in its precompiled prefix.
std::string mod_helpers(Backend backend);

// What, besides the mods and the templates, decides the text emit_mod_body writes: a version
// (bumped when the generated code changes) and the switches it reads (FLEXJIT_MOD_TABLES=0 turns
// the CPU's relative-position tables off). Part of every kernel's cache key.
std::string codegen_identity(Backend backend);

// The CPU mod body plus the score_mod's derivatives (jit/grad.h), for the backward pass
// (templates/cpu/mods_grad.h):
//   #define FLEXJIT_NUM_GRAD_LOADS n   (differentiable buffer reads)
//   float flexjit_score_mod_dscore(float score, b, h, q_idx, kv_idx, const FlexModArgs*)
//   void flexjit_score_mod_dbuf(float score, float g, b, h, q_idx, kv_idx, const FlexModArgs*,
//                               const FlexGradArgs*)   grads[slot][element] += g * partial
// Buffer gradients are dense row-major fp32 arrays of the buffer's sizes; an index outside the
// buffer sets the error flag (and adds to element 0 instead, like the forward's reads).
std::string emit_mod_grad_body(const ModSet& mods);

}  // namespace flexjit::jit

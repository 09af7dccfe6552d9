// A mod set: the score_mod and mask_mod of one attention call, as IR, plus the captured
// buffers and runtime params they read. This is what codegen consumes and what the cache key
// hashes (by structure, dtype and rank; never by buffer contents or param values).
#pragma once

#include <string>
#include <vector>

#include "jit/ir.h"

namespace flexjit {

// The mods' index contract: every call gives b, h, q_idx and kv_idx values in [0, 2^31), as
// PyTorch's int32 index tensors do (the runtime rejects larger batches, head counts and
// lengths). Codegen relies on it: index arithmetic that provably stays in int32 converts to
// float through int32, which vectorises on every ISA.
inline constexpr int64_t kModIndexLimit = int64_t(1) << 31;

struct ModSet {
  ir::Expr score_mod;                   // null = identity (score unchanged)
  ir::Expr mask_mod;                    // null = nothing masked
  std::vector<ir::BufferDecl> buffers;  // sorted by name; index = slot in FlexModArgs
  std::vector<ir::ParamDecl> params;    // sorted by name; index = slot in FlexModArgs

  bool has_score_mod() const { return score_mod != nullptr; }
  bool has_mask_mod() const { return mask_mod != nullptr; }
  int buffer_slot(const std::string& name) const;  // -1 if absent
  int param_slot(const std::string& name) const;   // -1 if absent
  // Canonical text of everything that affects generated code (for hashing and dumps).
  std::string signature() const;
};

// Values bound to a ModSet's slots for one call.
struct ModBindings {
  std::vector<std::pair<std::string, TensorView>> buffers;
  std::vector<std::pair<std::string, double>> params;
  // The tensor bound to buffer `name` (the last binding of that name), or null.
  const TensorView* find_buffer(const std::string& name) const;
};

// Checks that a mod set is well formed: score_mod is Float, mask_mod is Bool, a mask_mod does
// not read `score`, every buffer/param the trees read is declared. Throws flexjit::Error.
void validate(const ModSet& mods);

}  // namespace flexjit

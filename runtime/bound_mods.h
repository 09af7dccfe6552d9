// Binds a ModSet's slots to this call's tensors and scalar values, producing the FlexModArgs a
// kernel reads. Checks every buffer's dtype and rank against what the kernel was built for.
#pragma once

#include <string>
#include <vector>

#include "jit/mods.h"
#include "templates/mod_abi.h"

namespace flexjit::runtime {

// The mods' index contract (jit/mods.h kModIndexLimit): throws flexjit::Error unless the batch,
// head counts and lengths of a call are below 2^31, so every b, h, q_idx and kv_idx a mod sees is.
// `what` names the call.
void check_mod_index_range(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, const std::string& what);

class BoundMods {
 public:
  BoundMods(const ModSet& mods, const ModBindings& bind);
  BoundMods(const BoundMods&) = delete;
  BoundMods& operator=(const BoundMods&) = delete;
  const FlexModArgs& args() const { return args_; }
  // Throws flexjit::Error when a kernel set the error flag (out-of-range buffer index or
  // integer division by zero in a mod); `what` names the call.
  void check_error_flag(const std::string& what) const;

 private:
  std::vector<FlexBuffer> buffers_;
  std::vector<float> params_;
  std::string buffer_list_;
  mutable int error_flag_ = 0;
  FlexModArgs args_{};
};

}  // namespace flexjit::runtime

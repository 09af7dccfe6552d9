#include "jit/mods.h"

#include <algorithm>
#include <sstream>

namespace flexjit {

int ModSet::buffer_slot(const std::string& name) const {
  for (size_t i = 0; i < buffers.size(); ++i)
    if (buffers[i].name == name) return static_cast<int>(i);
  return -1;
}

const TensorView* ModBindings::find_buffer(const std::string& name) const {
  const TensorView* view = nullptr;
  for (const auto& [n, v] : buffers)
    if (n == name) view = &v;
  return view;
}

int ModSet::param_slot(const std::string& name) const {
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].name == name) return static_cast<int>(i);
  return -1;
}

std::string ModSet::signature() const {
  std::ostringstream os;
  os << "score_mod=" << ir::to_string(score_mod) << "\n";
  os << "mask_mod=" << ir::to_string(mask_mod) << "\n";
  for (const auto& b : buffers) os << "buffer " << b.name << " " << dtype_name(b.dtype) << " rank " << b.rank << "\n";
  for (const auto& p : params) os << "param " << p.name << "\n";
  return os.str();
}

void validate(const ModSet& mods) {
  if (mods.score_mod && mods.score_mod->type != ir::Type::Float)
    throw Error("score_mod must produce a float score, but " + ir::to_string(mods.score_mod) + " is " +
                ir::type_name(mods.score_mod->type) + "; wrap it in float(...) if that is intended");
  if (mods.mask_mod && mods.mask_mod->type != ir::Type::Bool)
    throw Error("mask_mod must produce a bool, but " + ir::to_string(mods.mask_mod) + " is " +
                ir::type_name(mods.mask_mod->type) + "; compare it (e.g. `... != 0`)");
  if (mods.mask_mod && ir::uses_var(mods.mask_mod, ir::Var::Score))
    throw Error("mask_mod cannot read `score` (it decides which scores exist); move that logic to score_mod");
  if (!std::is_sorted(mods.buffers.begin(), mods.buffers.end(),
                      [](const auto& a, const auto& b) { return a.name < b.name; }))
    internal_error(__FILE__, __LINE__, "ModSet buffers are sorted by name");
  for (const ir::Expr& e : {mods.score_mod, mods.mask_mod}) {
    for (const auto& n : ir::buffers_used(e))
      if (mods.buffer_slot(n) < 0) throw Error("mod reads buffer '" + n + "' but no tensor was captured under that name");
    for (const auto& n : ir::params_used(e))
      if (mods.param_slot(n) < 0) throw Error("mod reads param '" + n + "' but no such param was declared");
  }
}

}  // namespace flexjit

#include "runtime/bound_mods.h"

#include <cmath>

namespace flexjit::runtime {

void check_mod_index_range(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, const std::string& what) {
  for (auto [n, name] : {std::pair{B, "batch"}, {H, "head count"}, {Lq, "query length"}, {Lkv, "key length"}})
    if (n >= kModIndexLimit)
      throw Error(what + ": the " + name + " is " + std::to_string(n) + "; flexjit's mods index b, h, q_idx and " +
                  "kv_idx below 2^31 (as PyTorch's int32 index tensors do): split the call");
}

BoundMods::BoundMods(const ModSet& mods, const ModBindings& bind) {
  for (const auto& d : mods.buffers) {
    const TensorView* view = bind.find_buffer(d.name);
    if (!view)
      throw Error("the mods read buffer '" + d.name + "' but no tensor is bound to it; capture one " +
                  "(C++: flexjit::capture, CLI: --buffer " + d.name + "=FILE.npy)");
    if (view->dtype != d.dtype || view->rank != d.rank)
      throw Error("buffer '" + d.name + "' is bound to a " + dtype_name(view->dtype) + " tensor of rank " +
                  std::to_string(view->rank) + " but the mod was built for " + dtype_name(d.dtype) +
                  " rank " + std::to_string(d.rank));
    if (!view->data && view->numel() > 0) throw Error("buffer '" + d.name + "' has no data pointer");
    // Generated readers address a buffer in int32 (jit/codegen.cpp emit_index_head): every size and
    // the extent sum((size - 1) * |stride|) must stay below 2^31 elements.
    double extent = 0;
    bool big = false;
    for (int i = 0; i < view->rank; ++i) {
      big = big || view->sizes[i] >= kModIndexLimit;
      if (view->sizes[i] > 0) extent += double(view->sizes[i] - 1) * std::fabs(double(view->strides[i]));
    }
    if (big || extent >= double(kModIndexLimit))
      throw Error("buffer '" + d.name + "' " + view->shape_str() + " spans " + std::to_string(int64_t(extent) + 1) +
                  " elements; a captured tensor must stay below 2^31 elements in every size and in its extent " +
                  "(mods address it with 32-bit offsets): slice it, or make it contiguous if it is a strided view");
    FlexBuffer fb{};
    fb.data = view->data;
    for (int i = 0; i < 4; ++i) {
      fb.sizes[i] = i < view->rank ? view->sizes[i] : 1;
      fb.strides[i] = i < view->rank ? view->strides[i] : 0;
    }
    buffers_.push_back(fb);
    buffer_list_ += (buffer_list_.empty() ? "" : ", ") + d.name + " " + view->shape_str();
  }
  for (const auto& p : mods.params) {
    const double* value = nullptr;
    for (const auto& [n, v] : bind.params)
      if (n == p.name) value = &v;
    if (!value)
      throw Error("param '" + p.name + "' has no value; give one (C++: ModBindings::params, CLI: --param " +
                  p.name + "=VALUE)");
    params_.push_back(static_cast<float>(*value));
  }
  args_.buffers = buffers_.data();
  args_.params = params_.data();
  args_.error_flag = &error_flag_;
}

void BoundMods::check_error_flag(const std::string& what) const {
  if (__atomic_load_n(&error_flag_, __ATOMIC_RELAXED) == 0) return;
  throw Error(what + ": a mod indexed a captured buffer out of range or divided an int by zero, so the "
              "result is invalid. Check the index expressions against the buffer shapes (" +
              (buffer_list_.empty() ? std::string("no buffers") : buffer_list_) + ").");
}

}  // namespace flexjit::runtime

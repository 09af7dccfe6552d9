// Named mods: the built-ins (score_mods/builtin.cpp) and whatever users register, by C++
// functor (traced) or by expression text (parsed). The CLI and config files refer to mods by
// name; each built-in also knows how to make example buffers for a shape, which the demo,
// the CLI and the tests use (so every new built-in is tested automatically).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "jit/trace.h"

namespace flexjit {

enum class ModKind { Score, Mask };

// A tensor that owns its bytes (contiguous), for default buffers and file-loaded data.
struct OwnedTensor {
  std::string name;
  std::shared_ptr<std::vector<unsigned char>> bytes;
  TensorView view;
  static OwnedTensor make(std::string name, DType dtype, std::vector<int64_t> sizes);
  template <typename T>
  T* data() { return static_cast<T*>(view.data); }
};

struct ShapeInfo {
  int64_t B = 1, Hq = 1, Hkv = 1, Lq = 1, Lkv = 1;
};

struct RegisteredMod {
  std::string name;
  ModKind kind = ModKind::Score;
  std::string doc;
  std::string text;  // the expression, as text (printed from the IR for traced mods)
  TracedMod mod;     // IR, buffer/param decls, default bindings (param defaults, traced buffers)
  // Example buffers for a call shape (built-ins); null when the mod's bindings are fixed.
  std::function<std::vector<OwnedTensor>(const ShapeInfo&)> make_buffers;
};

void register_mod(RegisteredMod m);  // replaces an existing mod of the same name
namespace detail {
void register_traced(const std::string& name, ModKind kind, TracedMod traced, std::string doc);
}
template <typename F>
void register_score_mod(const std::string& name, F&& f, std::string doc = "") {
  detail::register_traced(name, ModKind::Score, trace_score_mod(std::forward<F>(f)), std::move(doc));
}
template <typename F>
void register_mask_mod(const std::string& name, F&& f, std::string doc = "") {
  detail::register_traced(name, ModKind::Mask, trace_mask_mod(std::forward<F>(f)), std::move(doc));
}
// Registers expression text; `buffers` declares the tensors it reads, `params` its scalars
// with default values. Throws ParseError for bad text.
void register_mod_text(const std::string& name, ModKind kind, const std::string& text,
                       std::vector<ir::BufferDecl> buffers,
                       std::vector<std::pair<std::string, double>> params, std::string doc = "",
                       std::function<std::vector<OwnedTensor>(const ShapeInfo&)> make_buffers = {});

// Throws flexjit::Error listing the known names when `name` is not registered.
const RegisteredMod& find_mod(const std::string& name);
bool has_mod(const std::string& name);
std::vector<std::string> mod_names(ModKind kind);
std::vector<std::string> builtin_mod_names();  // registered by flexjit itself

// Parses text into a TracedMod with the given buffers (views bound) and params (values).
TracedMod parse_mod(const std::string& text, ModKind kind, const std::vector<OwnedTensor>& buffers,
                    const std::vector<std::pair<std::string, double>>& params);

// The ModSet of one mod alone: its expression as the score_mod or mask_mod (by `kind`), with its
// buffer and param declarations.
ModSet mod_set_of(const TracedMod& t, ModKind kind);

// Binds a registered mod to example buffers for a shape: its TracedMod with bindings that
// point into `storage` (which the caller keeps alive).
TracedMod instantiate_example(const RegisteredMod& m, const ShapeInfo& shape,
                              std::vector<OwnedTensor>* storage);

namespace detail {
void register_builtins();  // score_mods/builtin.cpp; called once by the registry
}

}  // namespace flexjit

#include "score_mods/registry.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <mutex>

#include "jit/parser.h"

namespace flexjit {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, RegisteredMod> mods;
  std::vector<std::string> builtins;
};

// The storage alone; register_mod uses it directly because the built-ins register themselves
// while registry() is still initialising.
Registry& raw_registry() {
  static Registry r;
  return r;
}

Registry& registry() {
  static std::once_flag once;
  std::call_once(once, [] {
    detail::register_builtins();
    Registry& r = raw_registry();
    std::lock_guard lock(r.mu);
    for (auto& [n, m] : r.mods) r.builtins.push_back(n);
  });
  return raw_registry();
}

}  // namespace

OwnedTensor OwnedTensor::make(std::string name, DType dtype, std::vector<int64_t> sizes) {
  OwnedTensor t;
  t.name = std::move(name);
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  t.bytes = std::make_shared<std::vector<unsigned char>>(size_t(n) * dtype_size(dtype));
  t.view.data = t.bytes->data();
  t.view.dtype = dtype;
  t.view.rank = int(sizes.size());
  int64_t stride = 1;
  for (int d = t.view.rank - 1; d >= 0; --d) {
    t.view.sizes[d] = sizes[d];
    t.view.strides[d] = stride;
    stride *= sizes[d];
  }
  return t;
}

void detail::register_traced(const std::string& name, ModKind kind, TracedMod traced, std::string doc) {
  RegisteredMod m;
  m.name = name;
  m.kind = kind;
  m.doc = std::move(doc);
  m.mod = std::move(traced);
  m.text = ir::to_string(m.mod.expr);
  register_mod(std::move(m));
}

void register_mod(RegisteredMod m) {
  if (m.name.empty()) throw Error("register_mod: a mod needs a name");
  for (char c : m.name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-'))
      throw Error("register_mod: name '" + m.name + "' may only use letters, digits, '_' and '-'");
  if (m.kind == ModKind::Mask && m.mod.expr && m.mod.expr->type != ir::Type::Bool)
    throw Error("register_mod: mask_mod '" + m.name + "' must return bool");
  Registry& r = raw_registry();
  std::lock_guard lock(r.mu);
  r.mods[m.name] = std::move(m);
}

// Parses mod text in the scope of the given buffers and params, typed as its kind requires.
static ir::Expr parse_as(const std::string& text, ModKind kind, std::vector<ir::BufferDecl> buffers,
                  const std::vector<std::pair<std::string, double>>& params) {
  ParseScope scope;
  scope.allow_score = kind == ModKind::Score;
  scope.buffers = std::move(buffers);
  for (const auto& [n, v] : params) scope.params.push_back({n});
  return ir::cast(parse_expr(text, scope, kind == ModKind::Score ? "score_mod" : "mask_mod"),
                  kind == ModKind::Score ? ir::Type::Float : ir::Type::Bool);
}

TracedMod parse_mod(const std::string& text, ModKind kind, const std::vector<OwnedTensor>& buffers,
                    const std::vector<std::pair<std::string, double>>& params) {
  std::vector<ir::BufferDecl> decls;
  for (const auto& b : buffers) decls.push_back({b.name, b.view.dtype, b.view.rank});
  TracedMod t;
  t.expr = parse_as(text, kind, decls, params);
  // Keep only what the expression reads, so unrelated buffers do not enter the cache key.
  auto used_b = ir::buffers_used(t.expr);
  auto used_p = ir::params_used(t.expr);
  for (const auto& b : buffers)
    if (std::count(used_b.begin(), used_b.end(), b.name)) {
      t.buffers.push_back({b.name, b.view.dtype, b.view.rank});
      t.bindings.buffers.push_back({b.name, b.view});
    }
  for (const auto& [n, v] : params)
    if (std::count(used_p.begin(), used_p.end(), n)) {
      t.params.push_back({n});
      t.bindings.params.push_back({n, v});
    }
  return t;
}

void register_mod_text(const std::string& name, ModKind kind, const std::string& text,
                       std::vector<ir::BufferDecl> buffers, std::vector<std::pair<std::string, double>> params,
                       std::string doc, std::function<std::vector<OwnedTensor>(const ShapeInfo&)> make_buffers) {
  RegisteredMod m;
  m.name = name;
  m.kind = kind;
  m.doc = std::move(doc);
  m.text = text;
  m.mod.expr = parse_as(text, kind, buffers, params);
  m.mod.buffers = std::move(buffers);
  std::sort(m.mod.buffers.begin(), m.mod.buffers.end(), [](auto& a, auto& b) { return a.name < b.name; });
  for (const auto& [n, v] : params) {
    m.mod.params.push_back({n});
    m.mod.bindings.params.push_back({n, v});
  }
  m.make_buffers = std::move(make_buffers);
  register_mod(std::move(m));
}

const RegisteredMod& find_mod(const std::string& name) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  auto it = r.mods.find(name);
  if (it != r.mods.end()) return it->second;
  std::string known;
  for (auto& [n, m] : r.mods) known += (known.empty() ? "" : ", ") + n;
  throw Error("unknown mod '" + name + "'; registered mods: " + known);
}

bool has_mod(const std::string& name) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  return r.mods.count(name) > 0;
}

std::vector<std::string> mod_names(ModKind kind) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  std::vector<std::string> out;
  for (auto& [n, m] : r.mods)
    if (m.kind == kind) out.push_back(n);
  return out;
}

std::vector<std::string> builtin_mod_names() {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  return r.builtins;
}

TracedMod instantiate_example(const RegisteredMod& m, const ShapeInfo& shape, std::vector<OwnedTensor>* storage) {
  TracedMod t = m.mod;
  if (!m.make_buffers) return t;
  std::vector<OwnedTensor> made = m.make_buffers(shape);
  t.bindings.buffers.clear();
  for (auto& b : made) {
    t.bindings.buffers.push_back({b.name, b.view});
    storage->push_back(b);
  }
  return t;
}

ModSet mod_set_of(const TracedMod& t, ModKind kind) {
  ModSet mods;
  (kind == ModKind::Score ? mods.score_mod : mods.mask_mod) = t.expr;
  mods.buffers = t.buffers;
  mods.params = t.params;
  return mods;
}

}  // namespace flexjit

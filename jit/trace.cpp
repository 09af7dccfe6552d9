#include "jit/trace.h"

#include <algorithm>
#include <map>

namespace flexjit {

using ir::Op;

Sym operator+(const Sym& a, const Sym& b) { return ir::binary(Op::Add, a.expr(), b.expr()); }
Sym operator-(const Sym& a, const Sym& b) { return ir::binary(Op::Sub, a.expr(), b.expr()); }
Sym operator*(const Sym& a, const Sym& b) { return ir::binary(Op::Mul, a.expr(), b.expr()); }
Sym operator/(const Sym& a, const Sym& b) { return ir::binary(Op::Div, a.expr(), b.expr()); }
Sym operator%(const Sym& a, const Sym& b) { return ir::binary(Op::Mod, a.expr(), b.expr()); }
Sym operator<(const Sym& a, const Sym& b) { return ir::binary(Op::Lt, a.expr(), b.expr()); }
Sym operator<=(const Sym& a, const Sym& b) { return ir::binary(Op::Le, a.expr(), b.expr()); }
Sym operator>(const Sym& a, const Sym& b) { return ir::binary(Op::Gt, a.expr(), b.expr()); }
Sym operator>=(const Sym& a, const Sym& b) { return ir::binary(Op::Ge, a.expr(), b.expr()); }
Sym operator==(const Sym& a, const Sym& b) { return ir::binary(Op::Eq, a.expr(), b.expr()); }
Sym operator!=(const Sym& a, const Sym& b) { return ir::binary(Op::Ne, a.expr(), b.expr()); }
Sym operator&&(const Sym& a, const Sym& b) { return ir::binary(Op::And, a.expr(), b.expr()); }
Sym operator||(const Sym& a, const Sym& b) { return ir::binary(Op::Or, a.expr(), b.expr()); }
Sym operator-(const Sym& a) { return ir::unary(Op::Neg, a.expr()); }
Sym operator!(const Sym& a) { return ir::unary(Op::Not, a.expr()); }

Sym where(const Sym& c, const Sym& a, const Sym& b) { return ir::select(c.expr(), a.expr(), b.expr()); }
Sym min(const Sym& a, const Sym& b) { return ir::binary(Op::Min, a.expr(), b.expr()); }
Sym max(const Sym& a, const Sym& b) { return ir::binary(Op::Max, a.expr(), b.expr()); }
Sym abs(const Sym& a) { return ir::unary(Op::Abs, a.expr()); }
Sym exp(const Sym& a) { return ir::unary(Op::Exp, a.expr()); }
Sym exp2(const Sym& a) { return ir::unary(Op::Exp2, a.expr()); }
Sym log(const Sym& a) { return ir::unary(Op::Log, a.expr()); }
Sym log2(const Sym& a) { return ir::unary(Op::Log2, a.expr()); }
Sym tanh(const Sym& a) { return ir::unary(Op::Tanh, a.expr()); }
Sym sin(const Sym& a) { return ir::unary(Op::Sin, a.expr()); }
Sym cos(const Sym& a) { return ir::unary(Op::Cos, a.expr()); }
Sym tan(const Sym& a) { return ir::unary(Op::Tan, a.expr()); }
Sym sqrt(const Sym& a) { return ir::unary(Op::Sqrt, a.expr()); }
Sym rsqrt(const Sym& a) { return ir::unary(Op::Rsqrt, a.expr()); }
Sym sigmoid(const Sym& a) { return ir::unary(Op::Sigmoid, a.expr()); }
Sym floor(const Sym& a) { return ir::unary(Op::Floor, a.expr()); }
Sym ceil(const Sym& a) { return ir::unary(Op::Ceil, a.expr()); }
Sym to_float(const Sym& a) { return ir::cast(a.expr(), ir::Type::Float); }
Sym to_int(const Sym& a) { return ir::cast(a.expr(), ir::Type::Int); }

BufferSym::BufferSym(std::string name, TensorView view) : view_(view) {
  decl_.name = std::move(name);
  decl_.dtype = view.dtype;
  decl_.rank = view.rank;
  if (view.dtype == DType::Bool)
    throw Error("captured buffer '" + decl_.name + "' is bool; pass it as int32 (0/1) instead");
}

Sym BufferSym::operator[](const Sym& i) const { return index({i}); }

Sym BufferSym::index(std::vector<Sym> idx) const {
  std::vector<ir::Expr> e;
  for (auto& s : idx) e.push_back(s.expr());
  Sym r = ir::load(decl_, std::move(e));
  detail::record_buffer(decl_, view_);
  return r;
}

ParamSym::ParamSym(std::string name, double default_value)
    : name_(std::move(name)), default_value_(default_value) {}

ParamSym::operator Sym() const {
  detail::record_param(name_, default_value_);
  return ir::param(name_);
}

BufferSym capture(const std::string& name, const TensorView& view) { return BufferSym(name, view); }
ParamSym scalar_param(const std::string& name, double default_value) { return ParamSym(name, default_value); }

namespace detail {
namespace {
struct TraceState {
  bool active = false;
  std::map<std::string, std::pair<ir::BufferDecl, TensorView>> buffers;
  std::map<std::string, double> params;
};
thread_local TraceState g_trace;
}  // namespace

void trace_begin() {
  FLEXJIT_CHECK(!g_trace.active, "traces do not nest");
  g_trace = TraceState{};
  g_trace.active = true;
}

void trace_abort() { g_trace = TraceState{}; }

void record_buffer(const ir::BufferDecl& d, const TensorView& v) {
  if (!g_trace.active) return;  // building IR outside a trace: nothing to record
  auto it = g_trace.buffers.find(d.name);
  if (it != g_trace.buffers.end() && it->second.second.data != v.data)
    throw Error("two different tensors were captured under the name '" + d.name + "'; give each a unique name");
  g_trace.buffers[d.name] = {d, v};
}

void record_param(const std::string& name, double default_value) {
  if (g_trace.active) g_trace.params[name] = default_value;
}

TracedMod trace_end(ir::Expr result) {
  TracedMod t;
  t.expr = std::move(result);
  for (auto& [n, bv] : g_trace.buffers) {
    t.buffers.push_back(bv.first);
    t.bindings.buffers.push_back({n, bv.second});
  }
  for (auto& [n, v] : g_trace.params) {
    t.params.push_back({n});
    t.bindings.params.push_back({n, v});
  }
  g_trace = TraceState{};
  return t;
}
}  // namespace detail

std::pair<ModSet, ModBindings> combine(const TracedMod* score_mod, const TracedMod* mask_mod) {
  ModSet set;
  ModBindings bind;
  std::map<std::string, std::pair<ir::BufferDecl, TensorView>> bufs;
  std::map<std::string, double> params;
  for (const TracedMod* t : {score_mod, mask_mod}) {
    if (!t) continue;
    for (const auto& d : t->buffers) {
      auto it = bufs.find(d.name);
      if (it != bufs.end() && (it->second.first.dtype != d.dtype || it->second.first.rank != d.rank))
        throw Error("buffer '" + d.name + "' is captured by score_mod and mask_mod with different dtype or rank");
      bufs.emplace(d.name, std::make_pair(d, TensorView{}));
    }
    // Bindings are matched by name: a mod may carry bindings it does not read, in any order.
    for (const auto& [n, view] : t->bindings.buffers) {
      auto it = bufs.find(n);
      if (it == bufs.end()) continue;
      if (it->second.second.data && view.data && it->second.second.data != view.data)
        throw Error("score_mod and mask_mod bind different tensors to buffer '" + n +
                    "'; give them different names or share one tensor");
      if (view.data) it->second.second = view;
    }
    for (const auto& [n, v] : t->bindings.params) params[n] = v;
  }
  if (score_mod) set.score_mod = score_mod->expr;
  if (mask_mod) set.mask_mod = mask_mod->expr;
  for (auto& [n, bv] : bufs) {
    set.buffers.push_back(bv.first);
    if (bv.second.data) bind.buffers.push_back({n, bv.second});  // unbound: BoundMods says so
  }
  for (auto& [n, v] : params) {
    set.params.push_back({n});
    bind.params.push_back({n, v});
  }
  validate(set);
  return {set, bind};
}

}  // namespace flexjit

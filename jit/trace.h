// Tracing C++ functors into the mod IR. A user writes an ordinary generic lambda
//
//   auto slopes = flexjit::capture("slopes", slopes_view);          // a buffer
//   auto cap = flexjit::scalar_param("cap");                         // a runtime scalar
//   auto mod = flexjit::trace_score_mod(
//       [&](auto score, auto b, auto h, auto q_idx, auto kv_idx) {
//         return score + slopes[h] * (kv_idx - q_idx);
//       });
//
// and flexjit calls it once with symbolic arguments (Sym); the operators below build IR.
// Buffers and params touched during the trace are recorded with their bindings.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "jit/ir.h"
#include "jit/mods.h"

namespace flexjit {

// A symbolic value: wraps an IR expression.
class Sym {
 public:
  Sym(ir::Expr e) : e_(std::move(e)) {}  // NOLINT(google-explicit-constructor)
  Sym(int v) : e_(ir::constant_int(v)) {}          // NOLINT
  Sym(long v) : e_(ir::constant_int(v)) {}         // NOLINT
  Sym(long long v) : e_(ir::constant_int(v)) {}    // NOLINT
  Sym(double v) : e_(ir::constant(v)) {}           // NOLINT
  Sym(float v) : e_(ir::constant(v)) {}            // NOLINT
  Sym(bool v) : e_(ir::constant_bool(v)) {}        // NOLINT
  const ir::Expr& expr() const { return e_; }

 private:
  ir::Expr e_;
};

Sym operator+(const Sym& a, const Sym& b);
Sym operator-(const Sym& a, const Sym& b);
Sym operator*(const Sym& a, const Sym& b);
Sym operator/(const Sym& a, const Sym& b);
Sym operator%(const Sym& a, const Sym& b);
Sym operator<(const Sym& a, const Sym& b);
Sym operator<=(const Sym& a, const Sym& b);
Sym operator>(const Sym& a, const Sym& b);
Sym operator>=(const Sym& a, const Sym& b);
Sym operator==(const Sym& a, const Sym& b);
Sym operator!=(const Sym& a, const Sym& b);
Sym operator&&(const Sym& a, const Sym& b);
Sym operator||(const Sym& a, const Sym& b);
Sym operator-(const Sym& a);
Sym operator!(const Sym& a);

Sym where(const Sym& c, const Sym& a, const Sym& b);
Sym min(const Sym& a, const Sym& b);
Sym max(const Sym& a, const Sym& b);
Sym abs(const Sym& a);
Sym exp(const Sym& a);
Sym exp2(const Sym& a);
Sym log(const Sym& a);
Sym log2(const Sym& a);
Sym tanh(const Sym& a);
Sym sin(const Sym& a);
Sym cos(const Sym& a);
Sym tan(const Sym& a);
Sym sqrt(const Sym& a);
Sym rsqrt(const Sym& a);
Sym sigmoid(const Sym& a);
Sym floor(const Sym& a);
Sym ceil(const Sym& a);
Sym to_float(const Sym& a);
Sym to_int(const Sym& a);

// A captured tensor, indexed symbolically. Holds its binding (the view), which must outlive
// the attention calls that use the traced mod.
class BufferSym {
 public:
  BufferSym(std::string name, TensorView view);
  Sym operator[](const Sym& i) const;
  template <typename... I>
  Sym operator()(const I&... idx) const {
    return index({Sym(idx)...});
  }
  const ir::BufferDecl& decl() const { return decl_; }
  const TensorView& view() const { return view_; }

 private:
  Sym index(std::vector<Sym> idx) const;
  ir::BufferDecl decl_;
  TensorView view_;
};

// A runtime scalar parameter; its value is given per call (ModBindings / --param).
class ParamSym {
 public:
  explicit ParamSym(std::string name, double default_value = 0.0);
  operator Sym() const;  // NOLINT(google-explicit-constructor)
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  double default_value_;
};

BufferSym capture(const std::string& name, const TensorView& view);
ParamSym scalar_param(const std::string& name, double default_value = 0.0);

// The result of tracing: IR plus what it read, with the bindings seen during the trace.
struct TracedMod {
  ir::Expr expr;
  std::vector<ir::BufferDecl> buffers;
  std::vector<ir::ParamDecl> params;
  ModBindings bindings;  // buffer views; params with their default values
};

namespace detail {
// Records buffers/params used while a trace is active on this thread.
void trace_begin();
TracedMod trace_end(ir::Expr result);
void trace_abort();
void record_buffer(const ir::BufferDecl& d, const TensorView& v);
void record_param(const std::string& name, double default_value);
}  // namespace detail

template <typename F>
TracedMod trace_score_mod(F&& f) {
  detail::trace_begin();
  try {
    Sym r = f(Sym(ir::variable(ir::Var::Score)), Sym(ir::variable(ir::Var::B)),
              Sym(ir::variable(ir::Var::H)), Sym(ir::variable(ir::Var::QIdx)),
              Sym(ir::variable(ir::Var::KvIdx)));
    return detail::trace_end(ir::cast(r.expr(), ir::Type::Float));
  } catch (...) {
    detail::trace_abort();
    throw;
  }
}

template <typename F>
TracedMod trace_mask_mod(F&& f) {
  detail::trace_begin();
  try {
    Sym r = f(Sym(ir::variable(ir::Var::B)), Sym(ir::variable(ir::Var::H)),
              Sym(ir::variable(ir::Var::QIdx)), Sym(ir::variable(ir::Var::KvIdx)));
    return detail::trace_end(ir::cast(r.expr(), ir::Type::Bool));
  } catch (...) {
    detail::trace_abort();
    throw;
  }
}

// Combines a traced score_mod and mask_mod (either may have a null expr) into one ModSet
// plus bindings. Throws flexjit::Error if the two disagree on a buffer's dtype or rank.
std::pair<ModSet, ModBindings> combine(const TracedMod* score_mod, const TracedMod* mask_mod);

}  // namespace flexjit

#include "jit/grad.h"

#include <cmath>
#include <functional>
#include <unordered_map>
#include <unordered_set>

namespace flexjit::ir {
namespace {

bool is_leaf(const Expr& e) { return e->args.empty() || e->op == Op::Load; }
bool is_const(const Expr& e) {
  return e->op == Op::ConstFloat || e->op == Op::ConstInt || e->op == Op::ConstBool;
}
bool is_num(const Expr& e, double v) {
  return (e->op == Op::ConstFloat && e->fval == v) || (e->op == Op::ConstInt && double(e->ival) == v);
}
Expr zero_of(Type t) { return t == Type::Float ? constant(0.0) : constant_int(0); }

// Structural equality (the printer's notion: two trees print the same iff equal).
bool same(const Expr& a, const Expr& b) {
  if (a == b) return true;
  if (a->op != b->op || a->type != b->type || a->ival != b->ival || a->var != b->var ||
      a->name != b->name || a->args.size() != b->args.size())
    return false;
  if (a->op == Op::ConstFloat &&
      !(a->fval == b->fval && std::signbit(a->fval) == std::signbit(b->fval)) &&
      !(std::isnan(a->fval) && std::isnan(b->fval)))
    return false;
  for (size_t i = 0; i < a->args.size(); ++i)
    if (!same(a->args[i], b->args[i])) return false;
  return true;
}

// One node with already simplified operands: the local rewrite rules.
Expr rules(const Expr& e) {
  if (is_leaf(e)) return e;
  bool all_const = true;
  for (const Expr& a : e->args) all_const &= is_const(a);
  if (all_const) {
    try {
      Value v = eval(e, EvalEnv{});
      if (e->type == Type::Float) return constant(v.f);
      if (e->type == Type::Int) return constant_int(v.i);
      return constant_bool(v.i != 0);
    } catch (const Error&) {
      return e;  // int division by zero: keep it for the runtime to meet
    }
  }
  const Expr& a = e->args[0];
  switch (e->op) {
    case Op::Neg:
      if (a->op == Op::Neg) return a->args[0];
      break;
    case Op::Add:
      if (is_num(e->args[1], 0)) return a;
      if (is_num(a, 0)) return e->args[1];
      break;
    case Op::Sub:
      if (is_num(e->args[1], 0)) return a;
      if (is_num(a, 0)) return rules(unary(Op::Neg, e->args[1]));
      break;
    case Op::Mul:
      if (is_num(a, 0) || is_num(e->args[1], 0)) return zero_of(e->type);
      if (is_num(e->args[1], 1)) return a;
      if (is_num(a, 1)) return e->args[1];
      break;
    case Op::Div:
      if (is_num(e->args[1], 1)) return a;
      break;
    case Op::Select:
      if (a->op == Op::ConstBool) return a->ival ? e->args[1] : e->args[2];
      if (same(e->args[1], e->args[2])) return e->args[1];
      break;
    default: break;
  }
  return e;
}

// Rebuilds e over new operands with the typing constructors (the operands keep their types,
// so the node keeps its type).
Expr rebuild(const Expr& e, const std::vector<Expr>& args) {
  if (e->op == Op::Select) return select(args[0], args[1], args[2]);
  if (is_unary(e->op)) return unary(e->op, args[0]);
  return binary(e->op, args[0], args[1]);
}

class Simplifier {
 public:
  Expr run(const Expr& e) {
    if (is_leaf(e)) return e;
    auto it = memo_.find(e.get());
    if (it != memo_.end()) return it->second;
    std::vector<Expr> args;
    bool changed = false;
    for (const Expr& a : e->args) {
      args.push_back(run(a));
      changed |= args.back() != a;
    }
    Expr out = rules(changed ? rebuild(e, args) : e);
    FLEXJIT_CHECK(out->type == e->type, "simplify keeps the type");
    memo_.emplace(e.get(), out);
    return out;
  }

 private:
  std::unordered_map<const Node*, Expr> memo_;
};

// Smart constructors for derivative terms: build, then apply the local rules.
Expr neg(Expr a) { return rules(unary(Op::Neg, std::move(a))); }
Expr add(Expr a, Expr b) { return rules(binary(Op::Add, std::move(a), std::move(b))); }
Expr sub(Expr a, Expr b) { return rules(binary(Op::Sub, std::move(a), std::move(b))); }
Expr mul(Expr a, Expr b) { return rules(binary(Op::Mul, std::move(a), std::move(b))); }
Expr div(Expr a, Expr b) { return rules(binary(Op::Div, std::move(a), std::move(b))); }
Expr sel(Expr c, Expr a, Expr b) { return rules(select(std::move(c), std::move(a), std::move(b))); }
Expr num(double v) { return constant(v); }

using Wrt = std::function<bool(const Node&)>;  // is this leaf the variable?

// d e / d (the leaf `wrt` picks), unsimplified only in the sense that rules ran node by node.
class Differentiator {
 public:
  explicit Differentiator(Wrt wrt) : wrt_(std::move(wrt)) {}

  Expr d(const Expr& e) {
    // Int and bool values are piecewise constant: derivative 0 (this covers comparisons,
    // && || !, %, casts to int, int loads and everything in index expressions).
    if (e->type != Type::Float) return num(0);
    auto it = memo_.find(e.get());
    if (it != memo_.end()) return it->second;
    Expr out = compute(e);
    memo_.emplace(e.get(), out);
    return out;
  }

 private:
  Expr compute(const Expr& e) {
    if (e->op == Op::Variable || e->op == Op::Load) return num(wrt_(*e) ? 1 : 0);
    if (is_leaf(e)) return num(0);  // constants, params
    const Expr& x = e->args[0];
    if (e->op == Op::ToFloat) return num(0);  // the operand is int or bool
    if (is_unary(e->op)) {
      Expr dx = d(x);
      if (is_num(dx, 0)) return num(0);
      const double ln2 = std::log(2.0);
      switch (e->op) {
        case Op::Neg: return neg(dx);
        case Op::Abs:
          return mul(sel(binary(Op::Gt, x, num(0)), num(1),
                         sel(binary(Op::Lt, x, num(0)), num(-1), num(0))),
                     dx);
        case Op::Exp: return mul(e, dx);
        case Op::Exp2: return mul(mul(e, num(ln2)), dx);
        case Op::Log: return div(dx, x);
        case Op::Log2: return div(dx, mul(x, num(ln2)));
        case Op::Tanh: return mul(sub(num(1), mul(e, e)), dx);
        case Op::Sin: return mul(unary(Op::Cos, x), dx);
        case Op::Cos: return neg(mul(unary(Op::Sin, x), dx));
        case Op::Tan: return mul(add(num(1), mul(e, e)), dx);
        case Op::Sqrt: return mul(div(num(0.5), e), dx);
        case Op::Rsqrt: return mul(div(mul(num(-0.5), e), x), dx);
        case Op::Sigmoid: return mul(mul(e, sub(num(1), e)), dx);
        case Op::Floor:
        case Op::Ceil: return num(0);
        default: FLEXJIT_CHECK(false, "every float unary op has a derivative rule");
      }
    }
    if (e->op == Op::Select) return sel(x, d(e->args[1]), d(e->args[2]));
    const Expr& y = e->args[1];
    Expr dx = d(x), dy = d(y);
    switch (e->op) {
      case Op::Add: return add(dx, dy);
      case Op::Sub: return sub(dx, dy);
      case Op::Mul: return add(mul(dx, y), mul(x, dy));
      case Op::Div: return sub(div(dx, y), div(mul(x, dy), mul(y, y)));
      case Op::Min:
      case Op::Max: {
        // torch.minimum / maximum: the chosen operand gets the gradient, a tie splits it.
        Op first = e->op == Op::Min ? Op::Lt : Op::Gt;
        Op second = e->op == Op::Min ? Op::Gt : Op::Lt;
        return sel(binary(first, x, y), dx,
                   sel(binary(second, x, y), dy, mul(num(0.5), add(dx, dy))));
      }
      default: FLEXJIT_CHECK(false, "every float binary op has a derivative rule");
    }
    return num(0);
  }

  Wrt wrt_;
  std::unordered_map<const Node*, Expr> memo_;
};

}  // namespace

Expr simplify(const Expr& e) {
  FLEXJIT_CHECK(e != nullptr, "simplify takes a tree");
  return Simplifier().run(e);
}

Expr grad_score(const Expr& e) {
  FLEXJIT_CHECK(e != nullptr, "grad_score takes a tree");
  Differentiator diff([](const Node& n) { return n.op == Op::Variable && n.var == Var::Score; });
  return simplify(diff.d(e));
}

std::vector<LoadGrad> grad_loads(const Expr& e) {
  FLEXJIT_CHECK(e != nullptr, "grad_loads takes a tree");
  // Float loads outside index expressions, first visit first.
  std::vector<Expr> loads;
  std::unordered_set<const Node*> seen;
  std::function<void(const Expr&)> visit = [&](const Expr& n) {
    if (!seen.insert(n.get()).second) return;
    if (n->op == Op::Load) {
      if (n->type == Type::Float) loads.push_back(n);
      return;  // the indices are int context
    }
    for (const Expr& a : n->args) visit(a);
  };
  visit(e);

  std::vector<LoadGrad> out;
  for (const Expr& l : loads) {
    const Node* target = l.get();
    Differentiator diff([target](const Node& n) { return &n == target; });
    Expr p = simplify(diff.d(e));
    if (is_num(p, 0)) continue;
    out.push_back({l, std::move(p)});
  }
  return out;
}

}  // namespace flexjit::ir

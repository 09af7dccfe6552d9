#include "jit/interval.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

namespace flexjit::ir {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const Interval kBool{0, 1};

Interval hull(Interval a, Interval b) { return {std::min(a.lo, b.lo), std::max(a.hi, b.hi)}; }

// Range of f over [a.lo, a.hi] x [b.lo, b.hi] for f monotone in each argument on the box:
// the extremes are at corners. NaN (inf - inf, 0 * inf) means "no bound".
Interval corners(Interval a, Interval b, double (*f)(double, double)) {
  double c[4] = {f(a.lo, b.lo), f(a.lo, b.hi), f(a.hi, b.lo), f(a.hi, b.hi)};
  Interval r{c[0], c[0]};
  for (double x : c) {
    if (std::isnan(x)) return Interval::any();
    r.lo = std::min(r.lo, x);
    r.hi = std::max(r.hi, x);
  }
  return r;
}

Interval monotone(Interval a, double (*f)(double)) {
  double lo = f(a.lo), hi = f(a.hi);
  if (std::isnan(lo) || std::isnan(hi)) return Interval::any();
  return {lo, hi};
}

Interval truth(bool all_true, bool all_false) {
  if (all_true) return Interval::point(1);
  if (all_false) return Interval::point(0);
  return kBool;
}

Interval as_bool(Interval a) {  // x != 0
  return truth(a.hi < 0 || a.lo > 0, a.lo == 0 && a.hi == 0);
}

}  // namespace

IntervalEvaluator::IntervalEvaluator(std::vector<std::pair<std::string, double>> params,
                                     std::vector<BoundBuffer> buffers)
    : params_(std::move(params)), buffers_(std::move(buffers)) {
  for (auto& v : vars_) v = Interval::any();
}

void IntervalEvaluator::set_point(Var v, int64_t value) { vars_[int(v)] = Interval::point(double(value)); }

void IntervalEvaluator::set_range(Var v, int64_t lo, int64_t hi) {
  vars_[int(v)] = {double(lo), double(hi)};
}

void IntervalEvaluator::set_load_range(const std::string& buffer, Interval r) {
  load_hints_.emplace_back(buffer, r);
}

int IntervalEvaluator::decide(const Expr& e) {
  Interval r = as_bool(eval(e));
  return r.is_point() ? int(r.lo) : -1;
}

Interval IntervalEvaluator::load_range(const Node& n) {
  const BoundBuffer* buf = nullptr;
  for (const auto& b : buffers_)
    if (b.name == n.name) buf = &b;
  if (!buf) {
    for (const auto& [name, r] : load_hints_)
      if (name == n.name) return r;
    return Interval::any();
  }
  const TensorView& t = buf->view;
  std::vector<Interval> idx;
  for (const auto& a : n.args) idx.push_back(eval(a));
  // Out-of-range reads are the exact evaluator's business (it flags them): stay unknown.
  for (int d = 0; d < t.rank; ++d)
    if (idx[d].lo < 0 || idx[d].hi >= double(t.sizes[d]) || std::isinf(idx[d].lo)) return Interval::any();
  // A value a double cannot hold exactly (int64 beyond 2^53) or a NaN has no sound bound here:
  // report it as NaN and let the caller give up on the whole load.
  auto read = [&](const std::vector<int64_t>& at) {
    int64_t off = 0;
    for (int d = 0; d < t.rank; ++d) off += at[d] * t.strides[d];
    double v = read_element_f64(t, off);
    return std::fabs(v) > 9007199254740992.0 && t.dtype == DType::I64 ? std::nan("") : v;
  };
  bool all_points = true;
  for (auto& i : idx) all_points &= i.is_point();
  if (all_points) {
    std::vector<int64_t> at;
    for (auto& i : idx) at.push_back(int64_t(i.lo));
    double v = read(at);
    return std::isnan(v) ? Interval::any() : Interval::point(v);
  }
  if (t.rank != 1) return Interval::any();
  int64_t lo = int64_t(idx[0].lo), hi = int64_t(idx[0].hi);
  if (hi - lo > (1 << 16)) return Interval::any();  // too wide to scan; exact evaluation decides
  auto key = std::make_tuple(n.name, lo, hi);
  auto it = slice_memo_.find(key);
  if (it != slice_memo_.end()) return it->second;
  Interval r{kInf, -kInf};
  for (int64_t i = lo; i <= hi; ++i) {
    double v = read({i});
    if (std::isnan(v)) {
      r = Interval::any();
      break;
    }
    r.lo = std::min(r.lo, v);
    r.hi = std::max(r.hi, v);
  }
  if (slice_memo_.size() > 4096) slice_memo_.clear();
  slice_memo_[key] = r;
  return r;
}

Interval IntervalEvaluator::eval(const Expr& e) {
  Interval r = eval_node(e);
  return assumed_.empty() ? r : apply_assumed(e, r);
}

Interval IntervalEvaluator::apply_assumed(const Expr& e, Interval r) {
  std::string text;
  for (const Assumed& a : assumed_) {
    if (a.node->op != e->op || a.node->type != e->type || a.node->args.size() != e->args.size()) continue;
    if (a.node != e) {
      if (text.empty()) text = to_string(e);
      if (text != a.text) continue;
    }
    r = {std::max(r.lo, a.range.lo), std::min(r.hi, a.range.hi)};  // may be empty: unreachable
  }
  return r;
}

void IntervalEvaluator::assume(const Expr& e, Interval r) {
  if (e->op == Op::ConstFloat || e->op == Op::ConstInt || e->op == Op::ConstBool) return;
  std::string text = to_string(e);
  uint64_t id = refinement_id() ^ 0x9e3779b97f4a7c15ull;
  for (char ch : text) id = (id ^ uint8_t(ch)) * 0x100000001b3ull;
  for (double d : {r.lo, r.hi}) id = (id ^ std::hash<double>{}(d)) * 0x100000001b3ull;
  assumed_.push_back({e, std::move(text), r, id});
}

void IntervalEvaluator::push_refinement(const Expr& cond, bool taken) {
  const Node& c = *cond;
  if (c.op == Op::Not) return push_refinement(c.args[0], !taken);
  if ((c.op == Op::And && taken) || (c.op == Op::Or && !taken)) {
    push_refinement(c.args[0], taken);
    push_refinement(c.args[1], taken);
    return;
  }
  if (c.op != Op::Lt && c.op != Op::Le && c.op != Op::Gt && c.op != Op::Ge) return;
  // Normalise to x < y (strict) or x <= y on the side that holds.
  Expr x = c.args[0], y = c.args[1];
  bool strict = c.op == Op::Lt || c.op == Op::Gt;
  if (c.op == Op::Gt || c.op == Op::Ge) std::swap(x, y);  // x > y  <=>  y < x
  if (!taken) {  // !(x < y) <=> y <= x;  !(x <= y) <=> y < x
    std::swap(x, y);
    strict = !strict;
  }
  const bool ints = x->type != Type::Float;
  const Interval a = eval(x), b = eval(y);
  // A float comparison with a NaN is false whatever the ranges say; finite ranges have no NaN.
  if (!ints && !(std::isfinite(a.lo) && std::isfinite(a.hi) && std::isfinite(b.lo) && std::isfinite(b.hi))) return;
  const double step = strict && ints ? 1 : 0;  // x < y on ints: x <= y - 1
  assume(x, {-kInf, b.hi - step});
  assume(y, {a.lo + step, kInf});
}

Interval IntervalEvaluator::eval_node(const Expr& e) {
  const Node& n = *e;
  switch (n.op) {
    case Op::ConstFloat: case Op::ConstInt: case Op::ConstBool:
      return Interval::point(n.op == Op::ConstFloat ? n.fval : double(n.ival));
    case Op::Variable: return vars_[int(n.var)];
    case Op::Param:
      for (const auto& [name, v] : params_)
        if (name == n.name) return Interval::point(v);
      return Interval::any();
    case Op::Load: return load_range(n);
    case Op::Select: {
      Interval c = as_bool(eval(n.args[0]));
      if (c.is_point()) return eval(c.lo != 0 ? n.args[1] : n.args[2]);
      if (!refine_selects_) return hull(eval(n.args[1]), eval(n.args[2]));
      const size_t mark = refinement_mark();
      push_refinement(n.args[0], true);
      const Interval t = eval(n.args[1]);
      pop_refinement(mark);
      push_refinement(n.args[0], false);
      const Interval f = eval(n.args[2]);
      pop_refinement(mark);
      if (t.lo > t.hi) return f;  // a branch no value reaches
      if (f.lo > f.hi) return t;
      return hull(t, f);
    }
    default: break;
  }
  if (is_unary(n.op)) {
    Interval a = eval(n.args[0]);
    switch (n.op) {
      case Op::Neg: return {-a.hi, -a.lo};
      case Op::Not: { Interval b = as_bool(a); return {1 - b.hi, 1 - b.lo}; }
      case Op::Abs:
        if (a.lo >= 0) return a;
        if (a.hi <= 0) return {-a.hi, -a.lo};
        return {0, std::max(-a.lo, a.hi)};
      case Op::Exp: return monotone(a, [](double x) { return std::exp(x); });
      case Op::Exp2: return monotone(a, [](double x) { return std::exp2(x); });
      case Op::Tanh: return monotone(a, [](double x) { return std::tanh(x); });
      case Op::Sigmoid: return monotone(a, [](double x) { return 1 / (1 + std::exp(-x)); });
      case Op::Floor: return monotone(a, [](double x) { return std::floor(x); });
      case Op::Ceil: return monotone(a, [](double x) { return std::ceil(x); });
      case Op::ToFloat: return a;
      case Op::ToInt: {  // out of int64 range the conversion gives INT64_MIN: no monotone bound
        if (!(a.lo > -9.2233720368547758e18 && a.hi < 9.2233720368547758e18)) return Interval::any();
        if (n.args[0]->type == Type::Float && n.args[0]->op != Op::ConstFloat) {
          // The operand is computed in fp32 with approximate math, over the reals here: its value
          // may sit a few ulps outside [a.lo, a.hi], and its truncation an integer beyond. The
          // slack (one integer plus 2^-12 of the larger bound) is generous for that; codegen's
          // int32 narrowing also clamps the converted value to this range (fj_f2i32).
          const double slack = 1 + std::max(std::fabs(a.lo), std::fabs(a.hi)) * 0x1p-12;
          return {std::trunc(a.lo - slack), std::trunc(a.hi + slack)};
        }
        return monotone(a, [](double x) { return std::trunc(x); });
      }
      case Op::ToBool: return as_bool(a);
      case Op::Log: case Op::Log2: case Op::Sqrt: case Op::Rsqrt:
        if (a.lo <= 0) return Interval::any();  // domain edge: leave it to exact evaluation
        if (n.op == Op::Log) return monotone(a, [](double x) { return std::log(x); });
        if (n.op == Op::Log2) return monotone(a, [](double x) { return std::log2(x); });
        if (n.op == Op::Sqrt) return monotone(a, [](double x) { return std::sqrt(x); });
        return {1 / std::sqrt(a.hi), 1 / std::sqrt(a.lo)};
      default: return Interval::any();  // sin, cos, tan: periodic
    }
  }
  Interval a = eval(n.args[0]), b = eval(n.args[1]);
  bool ints = n.args[0]->type != Type::Float;
  switch (n.op) {
    case Op::And: {
      Interval x = as_bool(a), y = as_bool(b);
      return truth(x.lo == 1 && y.lo == 1, x.hi == 0 || y.hi == 0);
    }
    case Op::Or: {
      Interval x = as_bool(a), y = as_bool(b);
      return truth(x.lo == 1 || y.lo == 1, x.hi == 0 && y.hi == 0);
    }
    case Op::Add: return corners(a, b, [](double x, double y) { return x + y; });
    case Op::Sub: return corners(a, b, [](double x, double y) { return x - y; });
    case Op::Mul: return corners(a, b, [](double x, double y) { return x * y; });
    case Op::Min: return {std::min(a.lo, b.lo), std::min(a.hi, b.hi)};
    case Op::Max: return {std::max(a.lo, b.lo), std::max(a.hi, b.hi)};
    case Op::Div:
      if (b.lo <= 0 && b.hi >= 0) return Interval::any();  // divisor range contains zero
      return ints ? corners(a, b, [](double x, double y) { return std::trunc(x / y); })
                  : corners(a, b, [](double x, double y) { return x / y; });
    case Op::Mod:
      if (b.is_point() && b.lo > 0 && a.lo >= 0 && !std::isinf(a.hi)) {
        double m = b.lo;
        if (a.hi - a.lo < m && std::fmod(a.lo, m) <= std::fmod(a.hi, m))
          return {std::fmod(a.lo, m), std::fmod(a.hi, m)};
        return {0, m - 1};
      }
      if (b.lo >= 1) {  // |a % b| < b and |a % b| <= |a|, with a's sign (C's truncating %)
        const double m = b.hi - 1;
        return {a.lo < 0 ? std::max(-m, a.lo) : 0.0, a.hi > 0 ? std::min(m, a.hi) : 0.0};
      }
      return Interval::any();
    case Op::Lt: return truth(a.hi < b.lo, a.lo >= b.hi);
    case Op::Le: return truth(a.hi <= b.lo, a.lo > b.hi);
    case Op::Gt: return truth(a.lo > b.hi, a.hi <= b.lo);
    case Op::Ge: return truth(a.lo >= b.hi, a.hi < b.lo);
    case Op::Eq: return truth(a.is_point() && b.is_point() && a.lo == b.lo, a.hi < b.lo || b.hi < a.lo);
    case Op::Ne: return truth(a.hi < b.lo || b.hi < a.lo, a.is_point() && b.is_point() && a.lo == b.lo);
    default: break;
  }
  return Interval::any();
}

}  // namespace flexjit::ir

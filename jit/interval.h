// Interval evaluation of mod IR: given ranges for q_idx and kv_idx (and fixed b, h, params),
// bound the value of an expression over the whole box. Used to classify BlockMask blocks
// without touching their elements: a mask_mod whose interval is [1, 1] is true on the whole
// block (full), [0, 0] false (empty); anything else is undecided and is evaluated exactly.
// Every rule is conservative: the true range is always inside the computed one.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "jit/ir.h"

namespace flexjit::ir {

struct Interval {
  double lo, hi;  // inclusive; Bool is {0, 1}; unbounded ends are +-inf
  static Interval point(double v) { return {v, v}; }
  static Interval any() {
    constexpr double inf = std::numeric_limits<double>::infinity();
    return {-inf, inf};
  }
  bool is_point() const { return lo == hi; }
};

class IntervalEvaluator {
 public:
  // params: value per param name; buffers: views for range look-ups of rank-1 int/float loads.
  IntervalEvaluator(std::vector<std::pair<std::string, double>> params,
                    std::vector<BoundBuffer> buffers);
  void set_point(Var v, int64_t value);              // b, h
  void set_range(Var v, int64_t lo, int64_t hi);     // q_idx, kv_idx (inclusive)
  // The range of any element of a buffer that is not bound (codegen: an int32 buffer's values
  // lie in int32's range without knowing the data). Unbound, unhinted loads are unbounded.
  void set_load_range(const std::string& buffer, Interval r);
  Interval eval(const Expr& e);

  // Tri-state for a bool expression: 1 = true everywhere, 0 = false everywhere, -1 = unknown.
  int decide(const Expr& e);

  // Path refinement through where(c, a, b) (off by default; codegen turns it on): `a` is
  // evaluated knowing c holds and `b` knowing it does not, when c is a comparison (<, <=, >, >=)
  // of int operands or of floats with finite ranges, or a conjunction (true side) / disjunction
  // (false side) of such. The known range is attached to the compared subexpression and applies
  // to every structurally equal subexpression of that branch: in
  // where(d < 8, d, min(8 + int(log(float(d) / 8) * 2), 15)) the log's argument is >= 1.
  void set_refine_selects(bool on) { refine_selects_ = on; }
  // Evaluate (or emit) a select's branch under the same refinement: push what `cond` == `taken`
  // implies; pop_refinement(mark) drops everything pushed since mark = refinement_mark().
  size_t refinement_mark() const { return assumed_.size(); }
  void push_refinement(const Expr& cond, bool taken);
  void pop_refinement(size_t mark) { assumed_.resize(mark); }
  // Identifies what is assumed now (equal stacks give equal values): a memo key for callers.
  uint64_t refinement_id() const { return assumed_.empty() ? 0 : assumed_.back().id; }

 private:
  struct Assumed {
    Expr node;
    std::string text;  // to_string(node): structurally equal subtrees match
    Interval range;
    uint64_t id;  // hash of this entry and those below it
  };
  Interval eval_node(const Expr& e);
  Interval apply_assumed(const Expr& e, Interval r);
  void assume(const Expr& e, Interval r);
  bool refine_selects_ = false;
  std::vector<Assumed> assumed_;
  Interval load_range(const Node& n);
  Interval vars_[5];
  std::vector<std::pair<std::string, double>> params_;
  std::vector<BoundBuffer> buffers_;
  std::vector<std::pair<std::string, Interval>> load_hints_;
  // (buffer, lo, hi) -> min/max of the slice: rows of blocks reuse the same q range.
  std::map<std::tuple<std::string, int64_t, int64_t>, Interval> slice_memo_;
};

}  // namespace flexjit::ir

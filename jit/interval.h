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

 private:
  Interval load_range(const Node& n);
  Interval vars_[5];
  std::vector<std::pair<std::string, double>> params_;
  std::vector<BoundBuffer> buffers_;
  std::vector<std::pair<std::string, Interval>> load_hints_;
  // (buffer, lo, hi) -> min/max of the slice: rows of blocks reuse the same q range.
  std::map<std::tuple<std::string, int64_t, int64_t>, Interval> slice_memo_;
};

}  // namespace flexjit::ir

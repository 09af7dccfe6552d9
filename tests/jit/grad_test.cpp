// LABELS: unit
// Symbolic differentiation of the mod IR (jit/grad.h): every derivative is checked against
// central finite differences of ir::eval (float64), so the tests do not depend on the formulas
// grad.cpp uses; plus the documented conventions at kinks, grad_loads' bookkeeping, and the
// simplifier (values kept, identities folded, trees well typed).
#include "jit/grad.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "jit/parser.h"
#include "tests/support/ir_builders.h"

namespace flexjit {
namespace {

using ir::Expr;
using ir::Op;
using ir::Type;
using ir::Var;
using namespace testing;  // tests/support/ir_builders.h: score(), q(), f(), bin(), ...


// ---------------------------------------------------------------- test mods and environments

// A captured buffer with data we own: float buffers are stored as fp64 so that a finite
// difference step of 1e-6 is not lost to rounding.
struct Buf {
  std::string name;
  bool is_int = false;
  std::vector<int64_t> sizes;
  std::vector<double> f;   // float data (fp64)
  std::vector<int32_t> i;  // int data (int32)

  ir::BufferDecl decl() const {
    return {name, is_int ? DType::I32 : DType::F64, static_cast<int>(sizes.size())};
  }
  TensorView view() {
    TensorView t;
    t.data = is_int ? static_cast<void*>(i.data()) : static_cast<void*>(f.data());
    t.dtype = is_int ? DType::I32 : DType::F64;
    t.rank = static_cast<int>(sizes.size());
    int64_t stride = 1;
    for (int d = t.rank - 1; d >= 0; --d) {
      t.sizes[d] = sizes[d];
      t.strides[d] = stride;
      stride *= sizes[d];
    }
    return t;
  }
};

std::vector<double> ramp(int n, double start, double step) {
  std::vector<double> v;
  for (int k = 0; k < n; ++k) v.push_back(start + step * k + 0.01 * k * k);
  return v;
}

struct Mod {
  Expr e;
  std::vector<Buf> bufs;
  std::vector<std::pair<std::string, double>> params;

  ir::EvalEnv env(double s, int64_t h, int64_t qi, int64_t kvi) {
    ir::EvalEnv env;
    env.score = s;
    env.h = h;
    env.q_idx = qi;
    env.kv_idx = kvi;
    env.params = params;
    for (Buf& b : bufs) env.buffers.push_back({b.name, b.view()});
    return env;
  }
};

// The buffers every test mod may use (fp64 data, away from the kinks the mods test).
std::vector<Buf> standard_buffers() {
  std::vector<Buf> v;
  v.push_back({"slopes", false, {4}, {0.5, 0.25, 0.125, 0.0625}, {}});
  v.push_back({"bias", false, {4}, {0.7, -1.1, 2.3, 0.35}, {}});
  v.push_back({"rel", false, {17}, ramp(17, -0.8, 0.13), {}});
  v.push_back({"rel2", false, {9, 9}, ramp(81, -1.5, 0.041), {}});
  v.push_back({"w", false, {5}, {1.3, -0.6, 0.9, 2.2, -1.7}, {}});
  v.push_back({"doc", true, {9}, {}, {0, 0, 0, 1, 1, 2, 2, 2, 3}});
  return v;
}

Mod parse_mod(const std::string& text) {
  Mod m;
  m.bufs = standard_buffers();
  m.params = {{"cap", 2.5}};
  ParseScope scope;
  for (const Buf& b : m.bufs) scope.buffers.push_back(b.decl());
  scope.params = {{"cap"}};
  m.e = parse_expr(text, scope, "score_mod");
  return m;
}

struct Idx {
  int64_t h, q, kv;
};
const std::vector<double> kScores = {-3.7, -1.3, -0.45, 0.3, 0.77, 1.9, 4.2};
const std::vector<Idx> kIdx = {{1, 5, 2}, {3, 2, 7}, {0, 4, 4}, {2, 8, 0}};

double evf(const Expr& e, const ir::EvalEnv& env) { return ir::eval(e, env).as_float(); }

// Central difference of g(x) around x; NaN where g is not finite nearby.
template <typename G>
double central_difference(G&& g, double x, double* step_out, double* value_out) {
  double h = 1e-6 * std::max(1.0, std::fabs(x));
  double up = g(x + h), down = g(x - h);
  *step_out = h;
  *value_out = std::max(std::fabs(up), std::fabs(down));
  if (!std::isfinite(up) || !std::isfinite(down)) return std::nan("");
  return (up - down) / (2 * h);
}

// |analytic - numeric| within ~1e-6 relative, plus the rounding noise of the difference.
::testing::AssertionResult close(double analytic, double numeric, double value, double step) {
  double tol = 1e-6 * std::fabs(numeric) + 1e-7 + 1e-14 * value / step;
  if (std::fabs(analytic - numeric) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "analytic " << analytic << " vs finite difference "
                                       << numeric << " (tolerance " << tol << ")";
}

// Rebuilds a tree bottom-up with the typing constructors: a well-typed tree prints the same.
Expr retype(const Expr& e) {
  if (e->args.empty() || e->op == Op::Load) return e;
  std::vector<Expr> a;
  for (const Expr& x : e->args) a.push_back(retype(x));
  if (e->op == Op::Select) return ir::select(a[0], a[1], a[2]);
  if (ir::is_unary(e->op)) return ir::unary(e->op, a[0]);
  return ir::binary(e->op, a[0], a[1]);
}
void expect_well_typed(const Expr& e) { EXPECT_EQ(ir::to_string(retype(e)), ir::to_string(e)); }

// d mod / d score against finite differences at every point that is finite there.
void check_score_grad(Mod& m, const std::string& what) {
  SCOPED_TRACE(what);
  Expr g = ir::grad_score(m.e);
  ASSERT_EQ(g->type, Type::Float) << ir::to_string(g);
  expect_well_typed(g);
  int checked = 0;
  for (const Idx& ix : kIdx) {
    for (double s : kScores) {
      ir::EvalEnv env = m.env(s, ix.h, ix.q, ix.kv);
      double step, value;
      double fd = central_difference(
          [&](double x) {
            ir::EvalEnv e2 = env;
            e2.score = x;
            return evf(m.e, e2);
          },
          s, &step, &value);
      if (std::isnan(fd)) continue;
      ++checked;
      EXPECT_TRUE(close(evf(g, env), fd, value, step))
          << "score " << s << " h " << ix.h << " q " << ix.q << " kv " << ix.kv << "\n  d/dscore = "
          << ir::to_string(g);
    }
  }
  EXPECT_GT(checked, 0) << "no point where the mod is finite";
}

// The flat element offset a Load reads in env.
int64_t element_of(const Expr& load, const ir::EvalEnv& env) {
  for (const auto& bb : env.buffers) {
    if (bb.name != load->name) continue;
    int64_t off = 0;
    for (size_t d = 0; d < load->args.size(); ++d)
      off += ir::eval(load->args[d], env).i * bb.view.strides[d];
    return off;
  }
  ADD_FAILURE() << "no buffer " << load->name;
  return -1;
}

// d mod / d (every element of every float buffer) against finite differences: the sum of the
// partials of the grad_loads entries that read that element (0 if none do).
void check_load_grads(Mod& m, const std::string& what) {
  SCOPED_TRACE(what);
  std::vector<ir::LoadGrad> grads = ir::grad_loads(m.e);
  for (const auto& lg : grads) {
    EXPECT_EQ(lg.load->op, Op::Load);
    EXPECT_EQ(lg.load->type, Type::Float);
    EXPECT_EQ(lg.partial->type, Type::Float);
    expect_well_typed(lg.partial);
  }
  for (const Idx& ix : kIdx) {
    for (double s : {-1.3, 0.3, 1.9}) {
      ir::EvalEnv env = m.env(s, ix.h, ix.q, ix.kv);
      if (!std::isfinite(evf(m.e, env))) continue;
      for (size_t bi = 0; bi < m.bufs.size(); ++bi) {
        Buf& buf = m.bufs[bi];
        if (buf.is_int) continue;
        for (size_t k = 0; k < buf.f.size(); ++k) {
          double expected = 0;
          for (const auto& lg : grads)
            if (lg.load->name == buf.name && element_of(lg.load, env) == static_cast<int64_t>(k))
              expected += evf(lg.partial, env);
          double saved = buf.f[k];
          double step, value;
          double fd = central_difference(
              [&](double x) {
                buf.f[k] = x;
                double r = evf(m.e, env);  // env's views point at buf's data
                buf.f[k] = saved;
                return r;
              },
              saved, &step, &value);
          if (std::isnan(fd)) continue;
          EXPECT_TRUE(close(expected, fd, value, step))
              << buf.name << "[" << k << "] at score " << s << " h " << ix.h << " q " << ix.q
              << " kv " << ix.kv;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- d / d score

const std::vector<std::string> kMods = {
    "score + slopes[h] * (kv_idx - q_idx)",
    "cap * tanh(score / cap)",
    "30.0 * tanh(score / 30.0)",
    "score * score",
    "score * score * score - 2 * score",
    "exp(score) / (1 + abs(score))",
    "sigmoid(score) * score",
    "sigmoid(-2 * score + 1)",
    "log(1 + score * score)",
    "log(abs(score))",
    "log(score)",
    "sqrt(score * score + 0.5)",
    "sqrt(score)",
    "rsqrt(2 + sin(score))",
    "rsqrt(score * score + 1)",
    "sin(score) * cos(2 * score) + tan(score / 4)",
    "cos(score) / (2 + sin(score))",
    "exp2(score / 2) + log2(3 + tanh(score))",
    "log2(score * score + 0.25) * exp2(-score)",
    "min(score, 1.0) + max(score * 2, -1.0)",
    "min(score * score, 2.0) * max(score, slopes[h])",
    "where(score > 0.5, score * score, -score)",
    "where(score > 0 && q_idx >= kv_idx, score, score * 0.1)",
    "where(q_idx < kv_idx, -inf, score)",
    "where(abs(score) < 1, exp(score), 1 / score)",
    "score + rel[q_idx - kv_idx + 8]",
    "bias[h] * score + bias[h]",
    "score * rel2(q_idx, kv_idx) + tanh(rel2(q_idx, kv_idx) * score)",
    "score / (2 + score * score) - 3 / (score + 10)",
    "(score + 1) / slopes[h]",
    "1 / score",
    "floor(score) + score * 2",
    "float(int(score)) * 3 + score",
    "ceil(score * 2) * score",
    "-score + abs(score - 1) * 0.5",
    "score + float((q_idx - kv_idx) % 3)",
    "score * float(doc[q_idx] == doc[kv_idx]) + w[doc[kv_idx]] * score",
    "score * w[int(w[0] * 2.0)]",
    "-(-score) * (score - 0) + 0 * exp(score)",
    "abs(score) * (q_idx - kv_idx) / 3.0",
    "tanh(tanh(score) * bias[h] + score / cap) * cap",
};

TEST(GradScore, MatchesFiniteDifferences) {
  for (const std::string& text : kMods) {
    Mod m = parse_mod(text);
    check_score_grad(m, text);
  }
}

size_t distinct_nodes(const Expr& e) {
  std::vector<const ir::Node*> stack = {e.get()}, seen;
  while (!stack.empty()) {
    const ir::Node* n = stack.back();
    stack.pop_back();
    if (std::find(seen.begin(), seen.end(), n) != seen.end()) continue;
    seen.push_back(n);
    for (const Expr& a : n->args) stack.push_back(a.get());
  }
  return seen.size();
}

// A DAG like a traced mod makes: t = tanh(score / cap) used three times, then `levels` levels
// that each use the previous level twice (2^levels paths from the root to score).
Expr shared_dag(int levels, Expr x = score()) {
  Expr t = un(Op::Tanh, bin(Op::Div, x, ir::param("cap")));
  Expr e = bin(Op::Add, bin(Op::Mul, t, t), t);
  for (int k = 0; k < levels; ++k)
    e = bin(Op::Add, bin(Op::Mul, e, f(0.5)), bin(Op::Mul, un(Op::Sin, e), f(0.25)));
  return e;
}

TEST(GradScore, SharedSubtreesAreDifferentiatedOnce) {
  Mod m = parse_mod("score");
  m.e = shared_dag(8);  // small enough for the (unmemoised) evaluator
  check_score_grad(m, "shared");
  // 2^60 paths: only memoisation by node pointer makes these finish, and the results stay DAGs
  // of a size linear in the input's.
  Expr big = shared_dag(60);
  Expr g = ir::grad_score(big);
  EXPECT_LT(distinct_nodes(g), 20 * distinct_nodes(big));
  Expr s = ir::simplify(big);
  EXPECT_EQ(s, big);
  const ir::BufferDecl kW{"w", DType::F32, 1};
  Expr wl = ir::load(kW, {i(0)});
  Expr big2 = shared_dag(60, bin(Op::Mul, wl, score()));
  auto lg = ir::grad_loads(big2);
  ASSERT_EQ(lg.size(), 1u);
  EXPECT_EQ(lg[0].load, wl);
  EXPECT_LT(distinct_nodes(lg[0].partial), 20 * distinct_nodes(big2));
}

TEST(GradScore, ModWithoutScoreIsZero) {
  for (const char* text : {"slopes[h] * (kv_idx - q_idx)", "float(int(score))", "floor(score) + 1",
                           "where(score > 0, 1.0, 2.0)", "rel[q_idx - kv_idx + 8] * cap",
                           "w[int(score + 5)]"}) {
    Mod m = parse_mod(text);
    EXPECT_EQ(ir::to_string(ir::grad_score(m.e)), "0.0") << text;
  }
  // A mask_mod (bool) is not differentiable either.
  EXPECT_EQ(ir::to_string(ir::grad_score(bin(Op::Ge, q(), kv()))), "0.0");
}

TEST(GradScore, MinMaxSplitTiesEvenly) {
  ir::EvalEnv env;
  env.score = 1.0;
  Expr mn = bin(Op::Min, score(), f(1.0)), mx = bin(Op::Max, score(), f(1.0));
  EXPECT_EQ(evf(ir::grad_score(mn), env), 0.5);
  EXPECT_EQ(evf(ir::grad_score(mx), env), 0.5);
  env.score = 0.5;
  EXPECT_EQ(evf(ir::grad_score(mn), env), 1.0);
  EXPECT_EQ(evf(ir::grad_score(mx), env), 0.0);
  env.score = 1.5;
  EXPECT_EQ(evf(ir::grad_score(mn), env), 0.0);
  EXPECT_EQ(evf(ir::grad_score(mx), env), 1.0);
  // A tie of two score-dependent operands: the mean of their derivatives, 0.5 * (2 + 1).
  env.score = 1.0;
  Expr two = bin(Op::Mul, f(2), score()), plus1 = bin(Op::Add, score(), f(1));
  EXPECT_EQ(evf(ir::grad_score(bin(Op::Min, two, plus1)), env), 1.5);
  EXPECT_EQ(evf(ir::grad_score(bin(Op::Max, two, plus1)), env), 1.5);
  // min(score, score) is score.
  for (double s : {-2.0, 0.0, 3.0}) {
    env.score = s;
    EXPECT_EQ(evf(ir::grad_score(bin(Op::Min, score(), score())), env), 1.0);
  }
}

TEST(GradScore, AbsHasZeroSlopeAtZero) {
  Expr g = ir::grad_score(un(Op::Abs, score()));
  ir::EvalEnv env;
  env.score = 0.0;
  EXPECT_EQ(evf(g, env), 0.0);
  env.score = -0.0;
  EXPECT_EQ(evf(g, env), 0.0);
  env.score = 2.0;
  EXPECT_EQ(evf(g, env), 1.0);
  env.score = -1e-30;
  EXPECT_EQ(evf(g, env), -1.0);
}

TEST(GradScore, SelectDoesNotDifferentiateTheCondition) {
  // where(score > 0, 1, 2) is a step: its derivative is 0 everywhere (including at the step).
  Expr step = ir::select(bin(Op::Gt, score(), f(0)), f(1), f(2));
  EXPECT_EQ(ir::to_string(ir::grad_score(step)), "0.0");
  // Masked-out branches give exact zeros: where(q < kv, -inf, score) has derivative 0 there.
  Expr masked = ir::select(bin(Op::Lt, q(), kv()), f(-INFINITY), score());
  Expr g = ir::grad_score(masked);
  ir::EvalEnv env;
  env.q_idx = 1;
  env.kv_idx = 2;
  EXPECT_EQ(evf(g, env), 0.0);
  env.kv_idx = 0;
  EXPECT_EQ(evf(g, env), 1.0);
}

// ---------------------------------------------------------------- d / d buffer element

TEST(GradLoads, MatchFiniteDifferences) {
  for (const std::string& text : kMods) {
    Mod m = parse_mod(text);
    check_load_grads(m, text);
  }
}

TEST(GradLoads, AlibiSlopes) {
  Mod m = parse_mod("score + slopes[h] * (kv_idx - q_idx)");
  auto g = ir::grad_loads(m.e);
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(g[0].load->name, "slopes");
  ir::EvalEnv env = m.env(0.3, 2, 7, 3);
  EXPECT_EQ(evf(g[0].partial, env), -4.0);
  EXPECT_FALSE(ir::uses_var(g[0].partial, Var::Score));
}

TEST(GradLoads, SkipIntBuffersAndIndexExpressions) {
  // doc is int: never an entry. w[0] inside w's index is int context: not an entry either.
  Mod m = parse_mod("score + float(doc[h]) + w[doc[q_idx]] + w[int(w[0] * 2.0)] * score");
  auto g = ir::grad_loads(m.e);
  ASSERT_EQ(g.size(), 2u);
  for (const auto& lg : g) {
    EXPECT_EQ(lg.load->name, "w");
    EXPECT_NE(ir::to_string(lg.load), "w[0]");
  }
  EXPECT_EQ(ir::to_string(g[0].load), "w[doc[q_idx]]");
  EXPECT_EQ(ir::to_string(g[0].partial), "1.0");
  EXPECT_EQ(ir::to_string(g[1].load), "w[int((w[0] * 2.0))]");
  EXPECT_EQ(ir::to_string(g[1].partial), "score");
  // Loads whose partial is 0 (only in conditions, or cast to int) are left out.
  for (const char* text : {"score + float(w[0] > 0.5)", "where(w[0] > 0, score, 1.0)",
                           "score * float(int(bias[h]))", "floor(bias[h]) + score",
                           "score * 0 * bias[h]", "slopes[h] * 0 + score"}) {
    Mod z = parse_mod(text);
    EXPECT_TRUE(ir::grad_loads(z.e).empty()) << text;
  }
  EXPECT_TRUE(ir::grad_loads(score()).empty());
}

TEST(GradLoads, LoadNodesAreTheTreesOwnInFirstVisitOrder) {
  const ir::BufferDecl kW{"w", DType::F32, 1}, kBias{"bias", DType::F32, 1};
  Expr a = ir::load(kW, {i(1)}), b = ir::load(kBias, {hv()}), a2 = ir::load(kW, {i(1)});
  Expr e = bin(Op::Add, bin(Op::Add, bin(Op::Mul, a, score()), b), bin(Op::Mul, a2, a));
  auto g = ir::grad_loads(e);
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[0].load, a);
  EXPECT_EQ(g[1].load, b);
  EXPECT_EQ(g[2].load, a2);
  ir::EvalEnv env;
  std::vector<float> wd = {0.5f, 3.0f}, bd = {7.0f};
  env.buffers = {{"w", contiguous_view(wd.data(), DType::F32, {2})},
                 {"bias", contiguous_view(bd.data(), DType::F32, {1})}};
  env.score = 10;
  EXPECT_EQ(evf(g[0].partial, env), 10.0 + 3.0);  // d/da of a*score + a2*a
  EXPECT_EQ(evf(g[1].partial, env), 1.0);
  EXPECT_EQ(evf(g[2].partial, env), 3.0);
}

TEST(GradLoads, OneNodeUsedTwiceIsOneVariable) {
  const ir::BufferDecl kBias{"bias", DType::F64, 1};
  Expr b = ir::load(kBias, {hv()});
  ir::EvalEnv env;
  std::vector<double> bd = {0.7, -1.1};
  env.buffers = {{"bias", contiguous_view(bd.data(), DType::F64, {2})}};
  env.h = 1;
  env.score = 2.5;

  auto g = ir::grad_loads(bin(Op::Add, b, b));
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(g[0].load, b);
  EXPECT_EQ(evf(g[0].partial, env), 2.0);

  g = ir::grad_loads(bin(Op::Add, bin(Op::Mul, b, score()), b));  // bias[h] * score + bias[h]
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(evf(g[0].partial, env), 3.5);

  g = ir::grad_loads(bin(Op::Mul, b, b));
  ASSERT_EQ(g.size(), 1u);
  EXPECT_DOUBLE_EQ(evf(g[0].partial, env), -2.2);

  // Parsed text makes one node per read; the partials then add up to the same gradient.
  Mod m = parse_mod("bias[h] * score + bias[h]");
  g = ir::grad_loads(m.e);
  double total = 0;
  ir::EvalEnv menv = m.env(2.5, 1, 0, 0);
  for (const auto& lg : g) total += evf(lg.partial, menv);
  EXPECT_DOUBLE_EQ(total, 3.5);
  check_load_grads(m, "parsed twice");
}

TEST(GradLoads, Rank2Buffer) {
  Mod m = parse_mod("score * rel2(q_idx, kv_idx) + rel2(kv_idx, q_idx) * rel2(q_idx, kv_idx)");
  auto g = ir::grad_loads(m.e);
  ASSERT_GE(g.size(), 2u);
  for (const auto& lg : g) EXPECT_EQ(lg.load->args.size(), 2u);
  check_load_grads(m, "rank 2");
}

// ---------------------------------------------------------------- simplify

std::string simp(const Expr& e) { return ir::to_string(ir::simplify(e)); }

TEST(Simplify, FoldsTheIdentities) {
  EXPECT_EQ(simp(bin(Op::Mul, score(), f(1))), "score");
  EXPECT_EQ(simp(bin(Op::Mul, f(1), score())), "score");
  EXPECT_EQ(simp(bin(Op::Add, score(), f(0))), "score");
  EXPECT_EQ(simp(bin(Op::Add, f(0), score())), "score");
  EXPECT_EQ(simp(bin(Op::Sub, score(), f(0))), "score");
  EXPECT_EQ(simp(bin(Op::Div, score(), f(1))), "score");
  EXPECT_EQ(simp(un(Op::Neg, un(Op::Neg, score()))), "score");
  EXPECT_EQ(simp(bin(Op::Mul, f(0), score())), "0.0");
  EXPECT_EQ(simp(bin(Op::Mul, score(), f(0))), "0.0");
  EXPECT_EQ(simp(bin(Op::Mul, un(Op::Exp, score()), f(0))), "0.0");
  EXPECT_EQ(simp(ir::select(ir::constant_bool(true), score(), f(2))), "score");
  EXPECT_EQ(simp(ir::select(ir::constant_bool(false), score(), f(2))), "2.0");
  EXPECT_EQ(simp(ir::select(bin(Op::Lt, q(), kv()), score(), score())), "score");
  // select(c, a, a) compares structure, not pointers.
  Expr t1 = un(Op::Tanh, score()), t2 = un(Op::Tanh, score());
  EXPECT_EQ(simp(ir::select(bin(Op::Lt, q(), kv()), t1, t2)), "tanh(score)");
  // Int identities too.
  EXPECT_EQ(simp(bin(Op::Mul, bin(Op::Sub, q(), i(0)), i(1))), "q_idx");
  EXPECT_EQ(simp(bin(Op::Add, i(0), kv())), "kv_idx");
  EXPECT_EQ(simp(bin(Op::Mul, q(), i(0))), "0");
}

TEST(Simplify, FoldsConstants) {
  EXPECT_EQ(simp(bin(Op::Mul, bin(Op::Add, f(2), f(3)), score())), "(5.0 * score)");
  EXPECT_EQ(simp(un(Op::Exp, f(0))), "1.0");
  EXPECT_EQ(simp(bin(Op::Add, score(), bin(Op::Sub, f(1), f(1)))), "score");
  EXPECT_EQ(simp(bin(Op::Mul, score(), un(Op::Sqrt, f(4)))), "(score * 2.0)");
  EXPECT_EQ(simp(un(Op::Neg, f(2))), "(-2.0)");
  EXPECT_EQ(simp(bin(Op::Add, i(2), bin(Op::Mul, i(3), i(4)))), "14");
  EXPECT_EQ(simp(ir::select(bin(Op::Lt, f(1), f(2)), score(), f(0))), "score");
  EXPECT_EQ(simp(bin(Op::Add, score(), ir::cast(i(3), Type::Float))), "(score + 3.0)");
  EXPECT_EQ(simp(bin(Op::Add, ir::cast(ir::cast(f(2.7), Type::Int), Type::Float), score())),
            "(2.0 + score)");
  // Folding happens in float64.
  Expr third = ir::simplify(bin(Op::Div, f(1), f(3)));
  ASSERT_EQ(third->op, Op::ConstFloat);
  EXPECT_EQ(third->fval, 1.0 / 3.0);
  // An int division by a literal 0 is not folded (it would throw); it stays for run time.
  EXPECT_EQ(simp(bin(Op::Div, i(1), i(0))), "(1 / 0)");
}

TEST(Simplify, SharesUnchangedSubtrees) {
  Expr t = un(Op::Tanh, bin(Op::Div, score(), ir::param("cap")));
  Expr e = bin(Op::Mul, ir::param("cap"), t);
  EXPECT_EQ(ir::simplify(e), e);
  Expr e2 = bin(Op::Add, bin(Op::Mul, t, f(1)), f(0));
  EXPECT_EQ(ir::simplify(e2), t);
  Expr e3 = bin(Op::Add, bin(Op::Mul, t, f(2)), f(0));
  Expr s3 = ir::simplify(e3);
  EXPECT_EQ(s3, e3->args[0]);
  // Loads keep their identity (their index expressions are not rewritten).
  Expr l = ir::load({"w", DType::F32, 1}, {bin(Op::Add, q(), i(0))});
  EXPECT_EQ(ir::simplify(l), l);
  Expr s = ir::simplify(bin(Op::Mul, bin(Op::Mul, l, f(1)), score()));
  EXPECT_EQ(s->args[0], l);
}

// Random well-defined trees: intermediates stay finite, so simplify must keep every value.
class RandomTree {
 public:
  explicit RandomTree(unsigned seed) : rng_(seed) {}

  Expr flt(int depth) {
    if (depth == 0 || pick(4) == 0) return fleaf();
    switch (pick(14)) {
      case 0: return bin(Op::Add, flt(depth - 1), flt(depth - 1));
      case 1: return bin(Op::Sub, flt(depth - 1), flt(depth - 1));
      case 2:
      case 3: return bin(Op::Mul, flt(depth - 1), flt(depth - 1));
      case 4:  // denominator >= 1
        return bin(Op::Div, flt(depth - 1),
                   bin(Op::Add, f(1), un(Op::Abs, flt(depth - 1))));
      case 5: return un(Op::Neg, flt(depth - 1));
      case 6: return un(pick_of({Op::Tanh, Op::Sin, Op::Cos, Op::Sigmoid, Op::Abs}), flt(depth - 1));
      case 7: return un(pick_of({Op::Floor, Op::Ceil}), flt(depth - 1));
      case 8: return un(Op::Exp, un(Op::Tanh, flt(depth - 1)));
      case 9: return bin(pick_of({Op::Min, Op::Max}), flt(depth - 1), flt(depth - 1));
      case 10: return ir::select(cond(depth - 1), flt(depth - 1), flt(depth - 1));
      case 11: return ir::cast(integer(depth - 1), Type::Float);
      case 12: return bin(Op::Mul, flt(depth - 1), integer(depth - 1));
      default: return un(Op::Neg, un(Op::Neg, flt(depth - 1)));
    }
  }

 private:
  int pick(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }
  Op pick_of(std::initializer_list<Op> ops) { return *(ops.begin() + pick(int(ops.size()))); }

  Expr fleaf() {
    switch (pick(7)) {
      case 0: return f(0);
      case 1: return f(1);
      case 2: return f(pick(2) ? -1.5 : 2.25);
      case 3: return ir::param("cap");
      case 4: return ir::load({"w", DType::F64, 1}, {i(pick(5))});
      default: return score();
    }
  }
  Expr integer(int depth) {
    if (depth == 0 || pick(3) == 0) {
      switch (pick(5)) {
        case 0: return i(0);
        case 1: return i(1);
        case 2: return i(pick(7) - 3);
        case 3: return q();
        default: return kv();
      }
    }
    switch (pick(5)) {
      case 0: return bin(Op::Add, integer(depth - 1), integer(depth - 1));
      case 1: return bin(Op::Sub, integer(depth - 1), integer(depth - 1));
      case 2: return bin(Op::Mul, integer(depth - 1), integer(depth - 1));
      case 3: return ir::cast(un(Op::Floor, flt(depth - 1)), Type::Int);
      default: return ir::select(cond(depth - 1), integer(depth - 1), integer(depth - 1));
    }
  }
  Expr cond(int depth) {
    if (pick(4) == 0) return ir::constant_bool(pick(2));
    Op op = pick_of({Op::Lt, Op::Le, Op::Gt, Op::Ge, Op::Eq, Op::Ne});
    if (pick(2)) return bin(op, flt(depth), flt(depth));
    return bin(op, integer(depth), integer(depth));
  }

  std::mt19937 rng_;
};

TEST(Simplify, KeepsValuesOfRandomTrees) {
  std::vector<double> w = {0.0, 1.0, -0.75, 3.5, 1e-3};
  int changed = 0;
  for (unsigned seed = 0; seed < 400; ++seed) {
    RandomTree gen(seed);
    Expr e = gen.flt(6);
    Expr s = ir::simplify(e);
    ASSERT_EQ(s->type, e->type);
    expect_well_typed(s);
    if (ir::to_string(s) != ir::to_string(e)) ++changed;
    EXPECT_EQ(ir::to_string(ir::simplify(s)), ir::to_string(s)) << "simplify is idempotent";
    for (double sc : {-2.5, -1.0, 0.0, 0.4, 1.0, 3.0}) {
      for (auto [qi, kvi] : {std::pair<int64_t, int64_t>{0, 0}, {3, 1}, {2, 5}}) {
        ir::EvalEnv env;
        env.score = sc;
        env.q_idx = qi;
        env.kv_idx = kvi;
        env.params = {{"cap", 0.5}};
        env.buffers = {{"w", contiguous_view(w.data(), DType::F64, {5})}};
        double a = evf(e, env), b = evf(s, env);
        ASSERT_TRUE(std::isfinite(a)) << ir::to_string(e);
        EXPECT_EQ(a, b) << "seed " << seed << " score " << sc << "\n  " << ir::to_string(e)
                        << "\n  " << ir::to_string(s);
      }
    }
  }
  EXPECT_GT(changed, 100) << "the generator should exercise the rules";
}

TEST(Simplify, DerivativesAreWellTypedAndSmall) {
  Mod m = parse_mod("cap * tanh(score / cap)");
  Expr g = ir::grad_score(m.e);
  expect_well_typed(g);
  // No leftover identity: the simplified derivative has no "* 1.0", "+ 0.0", "0.0 *".
  std::string s = ir::to_string(g);
  for (const char* bad : {"* 1.0)", "(1.0 *", "+ 0.0)", "(0.0 +", "(0.0 *", "* 0.0)", "- 0.0)"})
    EXPECT_EQ(s.find(bad), std::string::npos) << s;
  EXPECT_EQ(ir::to_string(ir::grad_score(score())), "1.0");
  EXPECT_EQ(ir::to_string(ir::grad_score(parse_mod("score + slopes[h] * (kv_idx - q_idx)").e)), "1.0");
  EXPECT_EQ(ir::to_string(ir::grad_score(bin(Op::Mul, f(3), score()))), "3.0");
}

}  // namespace
}  // namespace flexjit

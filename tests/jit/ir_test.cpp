// LABELS: unit
// The mod IR on its own: the C++ typing rules applied by the node constructors, the canonical
// printer and its hash, the inspection helpers, and the float64 / int64 reference evaluator.
#include "jit/ir.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tests/support/ir_builders.h"

namespace flexjit {
namespace {

using ir::Expr;
using ir::Op;
using ir::Type;
using ir::Var;
using namespace testing;  // tests/support/ir_builders.h: score(), q(), f(), bin(), ...

Expr yes() { return ir::constant_bool(true); }

const ir::BufferDecl kSlopes{"slopes", DType::F32, 1};
const ir::BufferDecl kBias2{"bias2", DType::F32, 2};
const ir::BufferDecl kDoc{"doc", DType::I32, 1};

// The message of the flexjit::Error thrown by `f`, or "" (with a failure) if none was thrown.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no flexjit::Error thrown";
  return "";
}

// ---------------------------------------------------------------- typing

TEST(IrTyping, LeavesHaveTheirTypes) {
  EXPECT_EQ(score()->type, Type::Float);
  for (Var v : {Var::B, Var::H, Var::QIdx, Var::KvIdx}) EXPECT_EQ(ir::variable(v)->type, Type::Int);
  EXPECT_EQ(i(3)->type, Type::Int);
  EXPECT_EQ(f(3)->type, Type::Float);
  EXPECT_EQ(yes()->type, Type::Bool);
  EXPECT_EQ(ir::param("cap")->type, Type::Float);
  EXPECT_EQ(ir::load(kSlopes, {hv()})->type, Type::Float);
  EXPECT_EQ(ir::load(kDoc, {q()})->type, Type::Int);
  EXPECT_EQ(ir::load({"w", DType::I64, 1}, {q()})->type, Type::Int);
  EXPECT_EQ(ir::load({"w", DType::BF16, 1}, {q()})->type, Type::Float);
  EXPECT_EQ(ir::load({"w", DType::F16, 1}, {q()})->type, Type::Float);
  EXPECT_EQ(ir::load({"w", DType::F64, 1}, {q()})->type, Type::Float);
}

TEST(IrTyping, IntAndFloatPromoteToFloat) {
  Expr e = bin(Op::Add, q(), f(0.5));
  EXPECT_EQ(e->type, Type::Float);
  ASSERT_EQ(e->args.size(), 2u);
  EXPECT_EQ(e->args[0]->op, Op::ToFloat);  // the int operand is converted, like C++
  EXPECT_EQ(e->args[0]->type, Type::Float);
  EXPECT_EQ(e->args[1]->type, Type::Float);
  EXPECT_EQ(bin(Op::Mul, score(), i(2))->type, Type::Float);
  EXPECT_EQ(bin(Op::Div, i(7), f(2))->type, Type::Float);
  EXPECT_EQ(bin(Op::Min, q(), score())->type, Type::Float);
  EXPECT_EQ(bin(Op::Sub, q(), kv())->type, Type::Int);
  EXPECT_EQ(bin(Op::Div, q(), kv())->type, Type::Int);
  // An int literal next to a float is folded to a float literal, not wrapped in float(...).
  Expr lit = bin(Op::Add, score(), i(1));
  EXPECT_EQ(lit->args[1]->op, Op::ConstFloat);
  EXPECT_EQ(lit->args[1]->fval, 1.0);
}

TEST(IrTyping, BoolArithmeticIsInt) {
  EXPECT_EQ(bin(Op::Add, yes(), yes())->type, Type::Int);
  EXPECT_EQ(bin(Op::Mul, bin(Op::Lt, q(), kv()), i(3))->type, Type::Int);
  EXPECT_EQ(bin(Op::Mul, bin(Op::Lt, q(), kv()), score())->type, Type::Float);
  EXPECT_EQ(un(Op::Neg, bin(Op::Lt, q(), kv()))->type, Type::Int);
  EXPECT_EQ(un(Op::Abs, yes())->type, Type::Int);
  EXPECT_EQ(bin(Op::Mod, yes(), i(2))->type, Type::Int);
  EXPECT_EQ(bin(Op::Max, yes(), yes())->type, Type::Int);
}

TEST(IrTyping, ComparisonsAndLogicGiveBool) {
  for (Op op : {Op::Lt, Op::Le, Op::Gt, Op::Ge, Op::Eq, Op::Ne}) {
    EXPECT_EQ(bin(op, q(), kv())->type, Type::Bool) << ir::op_name(op);
    EXPECT_EQ(bin(op, score(), i(0))->type, Type::Bool) << ir::op_name(op);
    EXPECT_EQ(bin(op, yes(), yes())->type, Type::Bool) << ir::op_name(op);
  }
  // Mixed comparison compares as float.
  EXPECT_EQ(bin(Op::Lt, q(), f(2.5))->args[0]->type, Type::Float);
  // && || ! take their operands as bool.
  Expr a = bin(Op::And, q(), score());
  EXPECT_EQ(a->type, Type::Bool);
  EXPECT_EQ(a->args[0]->op, Op::ToBool);
  EXPECT_EQ(a->args[1]->op, Op::ToBool);
  EXPECT_EQ(bin(Op::Or, i(0), yes())->type, Type::Bool);
  EXPECT_EQ(un(Op::Not, q())->type, Type::Bool);
  EXPECT_EQ(un(Op::Not, q())->args[0]->op, Op::ToBool);
}

TEST(IrTyping, UnaryOps) {
  EXPECT_EQ(un(Op::Neg, q())->type, Type::Int);
  EXPECT_EQ(un(Op::Neg, score())->type, Type::Float);
  EXPECT_EQ(un(Op::Abs, q())->type, Type::Int);
  EXPECT_EQ(un(Op::Abs, score())->type, Type::Float);
  for (Op op : {Op::Exp, Op::Exp2, Op::Log, Op::Log2, Op::Tanh, Op::Sin, Op::Cos, Op::Tan, Op::Sqrt,
                Op::Rsqrt, Op::Sigmoid, Op::Floor, Op::Ceil}) {
    Expr e = un(op, q());  // math functions take and give float
    EXPECT_EQ(e->type, Type::Float) << ir::op_name(op);
    EXPECT_EQ(e->args[0]->type, Type::Float) << ir::op_name(op);
  }
  // The cast ops go through cast(): no node when the type already matches.
  Expr s = score();
  EXPECT_EQ(un(Op::ToFloat, s), s);
  EXPECT_EQ(un(Op::ToInt, q())->op, Op::Variable);
  EXPECT_EQ(un(Op::ToInt, s)->op, Op::ToInt);
  EXPECT_EQ(un(Op::ToBool, s)->type, Type::Bool);
}

TEST(IrTyping, SelectTakesTheCommonType) {
  EXPECT_EQ(ir::select(yes(), i(1), f(2))->type, Type::Float);
  EXPECT_EQ(ir::select(yes(), i(1), i(2))->type, Type::Int);
  EXPECT_EQ(ir::select(yes(), yes(), yes())->type, Type::Bool);
  EXPECT_EQ(ir::select(yes(), yes(), i(2))->type, Type::Int);  // bool meets int: int
  Expr e = ir::select(q(), score(), kv());                     // condition converted to bool
  EXPECT_EQ(e->args[0]->op, Op::ToBool);
  EXPECT_EQ(e->args[2]->op, Op::ToFloat);
}

TEST(IrTyping, CastsFoldLiterals) {
  EXPECT_EQ(ir::cast(i(3), Type::Float)->op, Op::ConstFloat);
  EXPECT_EQ(ir::cast(yes(), Type::Int)->op, Op::ConstInt);
  EXPECT_EQ(ir::cast(i(0), Type::Bool)->op, Op::ConstBool);
  EXPECT_EQ(ir::cast(i(0), Type::Bool)->ival, 0);
  EXPECT_EQ(ir::cast(i(-5), Type::Bool)->ival, 1);
  // A float literal is not folded to int: truncation stays visible.
  EXPECT_EQ(ir::cast(f(2.5), Type::Int)->op, Op::ToInt);
}

TEST(IrTyping, FloatModuloIsRejectedWithAFix) {
  std::string msg = error_of([] { bin(Op::Mod, score(), i(2)); });
  EXPECT_NE(msg.find("'%' needs int operands"), std::string::npos) << msg;
  EXPECT_NE(msg.find("float % int"), std::string::npos) << msg;
  EXPECT_NE(msg.find("score"), std::string::npos) << msg;  // shows the operands
  EXPECT_NE(msg.find("int(...)"), std::string::npos) << msg;
  msg = error_of([] { bin(Op::Mod, q(), f(2)); });
  EXPECT_NE(msg.find("int % float"), std::string::npos) << msg;
  EXPECT_NO_THROW(bin(Op::Mod, q(), i(2)));
  EXPECT_NO_THROW(bin(Op::Mod, q(), ir::cast(score(), Type::Int)));
}

TEST(IrTyping, LoadChecksRankAndIndexType) {
  std::string msg = error_of([] { ir::load(kBias2, {q()}); });
  EXPECT_NE(msg.find("buffer 'bias2' has rank 2 but is read with 1 index"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("bias2(i, j, ...)"), std::string::npos) << msg;  // how to write it instead
  msg = error_of([] { ir::load(kSlopes, {q(), kv()}); });
  EXPECT_NE(msg.find("buffer 'slopes' has rank 1 but is read with 2 index"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("slopes[i]"), std::string::npos) << msg;
  msg = error_of([] { ir::load(kSlopes, {}); });
  EXPECT_NE(msg.find("read with 0 index"), std::string::npos) << msg;

  msg = error_of([] { ir::load(kSlopes, {bin(Op::Mul, score(), i(2))}); });
  EXPECT_NE(msg.find("'slopes' is indexed with a float expression ((score * 2.0))"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("int(...)"), std::string::npos) << msg;

  msg = error_of([] { ir::load({"t", DType::F32, 5}, {q(), q(), q(), q(), q()}); });
  EXPECT_NE(msg.find("rank 1 to 4"), std::string::npos) << msg;
  msg = error_of([] { ir::load({"t", DType::F32, 0}, {}); });
  EXPECT_NE(msg.find("rank 1 to 4"), std::string::npos) << msg;

  // Bool indices are fine (converted to int); so is an explicit int() of a float.
  Expr e = ir::load(kSlopes, {bin(Op::Lt, q(), kv())});
  EXPECT_EQ(e->args[0]->type, Type::Int);
  EXPECT_NO_THROW(ir::load(kSlopes, {ir::cast(score(), Type::Int)}));
}

// ---------------------------------------------------------------- printing and hashing

// The hash is FNV-1a of the printed text; written out here so a change of either shows.
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

Expr alibi() {
  return bin(Op::Add, score(), bin(Op::Mul, ir::load(kSlopes, {hv()}), bin(Op::Sub, kv(), q())));
}

TEST(IrPrint, CanonicalForm) {
  EXPECT_EQ(ir::to_string(alibi()), "(score + (slopes[h] * float((kv_idx - q_idx))))");
  EXPECT_EQ(ir::to_string(bin(Op::Ge, q(), kv())), "(q_idx >= kv_idx)");
  EXPECT_EQ(ir::to_string(bin(Op::Mul, ir::param("cap"),
                              un(Op::Tanh, bin(Op::Div, score(), ir::param("cap"))))),
            "(cap * tanh((score / cap)))");
  EXPECT_EQ(ir::to_string(ir::load(kBias2, {bv(), hv()})), "bias2(b, h)");
  EXPECT_EQ(ir::to_string(ir::select(bin(Op::Lt, q(), i(3)), score(), f(-1.5))),
            "((q_idx < 3) ? score : (-1.5))");
  EXPECT_EQ(ir::to_string(bin(Op::Min, q(), i(-2))), "min(q_idx, (-2))");
  EXPECT_EQ(ir::to_string(bin(Op::Max, score(), f(0))), "max(score, 0.0)");
  EXPECT_EQ(ir::to_string(un(Op::Neg, q())), "(-q_idx)");
  EXPECT_EQ(ir::to_string(un(Op::Not, bin(Op::Eq, hv(), bv()))), "(!(h == b))");
  EXPECT_EQ(ir::to_string(un(Op::Exp2, q())), "exp2(float(q_idx))");
  EXPECT_EQ(ir::to_string(ir::cast(score(), Type::Int)), "int(score)");
  EXPECT_EQ(ir::to_string(ir::cast(q(), Type::Bool)), "bool(q_idx)");
  EXPECT_EQ(ir::to_string(bin(Op::Or, yes(), ir::constant_bool(false))), "(true || false)");
  EXPECT_EQ(ir::to_string(bin(Op::Mod, q(), i(3))), "(q_idx % 3)");
  EXPECT_EQ(ir::to_string(Expr()), "<none>");
}

TEST(IrPrint, FloatLiteralsRoundTrip) {
  EXPECT_EQ(ir::to_string(f(1)), "1.0");
  EXPECT_EQ(ir::to_string(f(0.5)), "0.5");
  EXPECT_EQ(ir::to_string(f(-2)), "(-2.0)");
  EXPECT_EQ(ir::to_string(f(0.1)), "0.10000000000000001");  // every bit of the double
  EXPECT_EQ(ir::to_string(f(1e300)), "1.0000000000000001e+300");
  EXPECT_EQ(ir::to_string(f(std::numeric_limits<double>::infinity())), "inf");
  EXPECT_EQ(ir::to_string(f(-std::numeric_limits<double>::infinity())), "(-inf)");
  EXPECT_EQ(ir::to_string(i(-7)), "(-7)");
  EXPECT_EQ(ir::to_string(i(std::numeric_limits<int64_t>::max())), "9223372036854775807");
  for (double v : {0.1, 1.0 / 3.0, 1e-310, 123456789.123456789, -0.75}) {
    Expr e = f(v);
    std::string s = ir::to_string(e);
    if (s.front() == '(') s = s.substr(1, s.size() - 2);
    EXPECT_EQ(std::strtod(s.c_str(), nullptr), v) << s;
  }
}

TEST(IrPrint, SameTreeSameTextAndHash) {
  Expr a = alibi(), b = alibi();  // built twice, separately
  ASSERT_NE(a, b);
  EXPECT_EQ(ir::to_string(a), ir::to_string(b));
  EXPECT_EQ(ir::hash(a), ir::hash(b));
  EXPECT_EQ(ir::hash(a), fnv1a(ir::to_string(a)));
  // Pinned: symbol names and logs must not change between builds or releases.
  EXPECT_EQ(ir::hash(score()), 0xb52659eae952e61full);
  EXPECT_EQ(ir::hash(bin(Op::Ge, q(), kv())), 0x472675ee9d0200a1ull);
}

TEST(IrPrint, DifferentTreesDiffer) {
  std::vector<Expr> trees = {
      bin(Op::Sub, q(), kv()),
      bin(Op::Sub, kv(), q()),
      bin(Op::Add, score(), i(1)),
      bin(Op::Add, score(), f(1.5)),
      bin(Op::Add, q(), i(1)),
      bin(Op::Add, q(), f(1)),  // int vs float arithmetic
      f(0.1),
      f(double(0.1f)),  // literals keep every bit
      f(1e-300),
      f(0),
      f(-0.0),
      i(0),
      ir::constant_bool(false),
      bin(Op::Add, bin(Op::Add, q(), kv()), hv()),
      bin(Op::Add, q(), bin(Op::Add, kv(), hv())),
      ir::load(kSlopes, {hv()}),
      ir::load({"slopes2", DType::F32, 1}, {hv()}),
      ir::load(kSlopes, {bv()}),
      ir::param("cap"),
      ir::param("cap2"),
      bin(Op::Div, q(), kv()),
      bin(Op::Div, ir::cast(q(), Type::Float), ir::cast(kv(), Type::Float)),
      bin(Op::Lt, q(), kv()),
      bin(Op::Le, q(), kv()),
      ir::select(bin(Op::Lt, q(), kv()), score(), f(0)),
      ir::select(bin(Op::Lt, q(), kv()), f(0), score()),
      bin(Op::Min, q(), kv()),
      bin(Op::Max, q(), kv()),
      un(Op::Exp, score()),
      un(Op::Exp2, score()),
      ir::variable(Var::B),
      ir::variable(Var::H),
  };
  for (size_t x = 0; x < trees.size(); ++x)
    for (size_t y = x + 1; y < trees.size(); ++y) {
      EXPECT_NE(ir::to_string(trees[x]), ir::to_string(trees[y])) << x << " vs " << y;
      EXPECT_NE(ir::hash(trees[x]), ir::hash(trees[y])) << ir::to_string(trees[x]);
    }
}

// ---------------------------------------------------------------- inspection

TEST(IrInspect, UsesVar) {
  Expr e = alibi();
  EXPECT_TRUE(ir::uses_var(e, Var::Score));
  EXPECT_TRUE(ir::uses_var(e, Var::H));
  EXPECT_TRUE(ir::uses_var(e, Var::QIdx));
  EXPECT_TRUE(ir::uses_var(e, Var::KvIdx));
  EXPECT_FALSE(ir::uses_var(e, Var::B));
  // Variables inside buffer indices count.
  EXPECT_TRUE(ir::uses_var(ir::load(kDoc, {bv()}), Var::B));
  EXPECT_FALSE(ir::uses_var(Expr(), Var::Score));
  EXPECT_FALSE(ir::uses_var(f(1), Var::Score));
}

TEST(IrInspect, ParamsAndBuffersUsedAreSortedAndUnique) {
  Expr e =
      bin(Op::Add, bin(Op::Mul, ir::param("zeta"), ir::load(kSlopes, {ir::load(kDoc, {q()})})),
          bin(Op::Add, ir::param("alpha"),
              bin(Op::Add, ir::param("zeta"), ir::load(kBias2, {ir::load(kDoc, {kv()}), hv()}))));
  EXPECT_EQ(ir::params_used(e), (std::vector<std::string>{"alpha", "zeta"}));
  EXPECT_EQ(ir::buffers_used(e), (std::vector<std::string>{"bias2", "doc", "slopes"}));
  EXPECT_TRUE(ir::params_used(Expr()).empty());
  EXPECT_TRUE(ir::buffers_used(score()).empty());
}

// ---------------------------------------------------------------- evaluation

ir::Value ev(const Expr& e, const ir::EvalEnv& env = {}) { return ir::eval(e, env); }

TEST(IrEval, IntDivisionTruncatesLikeCpp) {
  for (int64_t a : {7, -7, 6, -6, 0, 1, -1})
    for (int64_t b : {2, -2, 3, -3, 1, -1, 7}) {
      EXPECT_EQ(ev(bin(Op::Div, i(a), i(b))).i, a / b) << a << " / " << b;
      EXPECT_EQ(ev(bin(Op::Mod, i(a), i(b))).i, a % b) << a << " % " << b;
      EXPECT_EQ(ev(bin(Op::Div, i(a), i(b))).type, Type::Int);
    }
  EXPECT_DOUBLE_EQ(ev(bin(Op::Div, i(7), f(2))).f, 3.5);
  EXPECT_EQ(ev(bin(Op::Div, i(-7), i(2))).i, -3);  // not floor (-4) like Python
  EXPECT_EQ(ev(bin(Op::Mod, i(-7), i(3))).i, -1);  // sign of the dividend
}

TEST(IrEval, IntDivisionByZeroThrows) {
  std::string msg = error_of([] { ev(bin(Op::Div, q(), i(0))); });
  EXPECT_NE(msg.find("integer division by zero in (q_idx / 0)"), std::string::npos) << msg;
  msg = error_of([] { ev(bin(Op::Mod, q(), bin(Op::Sub, kv(), kv()))); });
  EXPECT_NE(msg.find("integer division by zero"), std::string::npos) << msg;
  // Float division by zero is IEEE, not an error.
  EXPECT_EQ(ev(bin(Op::Div, f(1), f(0))).f, std::numeric_limits<double>::infinity());
}

// INT64_MIN / -1 overflows; in C++ it traps (SIGFPE) on x86. Generated code defines it as the
// wrapped value (fj_idiv: INT64_MIN, fj_imod: 0); the reference evaluator must agree, and must
// never take the process down. Runs in a child process so a trap fails only this test.
TEST(IrEvalDeathTest, Int64MinDividedByMinusOneWrapsLikeGeneratedCode) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto check = [] {
    const int64_t mn = std::numeric_limits<int64_t>::min();
    Expr lo = bin(Op::Sub, i(-std::numeric_limits<int64_t>::max()),
                  i(1));  // INT64_MIN, as users write it
    bool ok =
        ev(lo).i == mn && ev(bin(Op::Div, lo, i(-1))).i == mn && ev(bin(Op::Mod, lo, i(-1))).i == 0;
    std::exit(ok ? 0 : 1);
  };
  EXPECT_EXIT(check(), ::testing::ExitedWithCode(0), "")
      << "ir::eval of INT64_MIN / -1 or INT64_MIN % -1 crashed or disagreed with codegen";
}

TEST(IrEval, IntArithmeticWrapsLikeGeneratedCode) {
  const int64_t mx = std::numeric_limits<int64_t>::max(), mn = std::numeric_limits<int64_t>::min();
  EXPECT_EQ(ev(bin(Op::Add, i(mx), i(1))).i, mn);
  EXPECT_EQ(ev(bin(Op::Sub, i(-mx), i(2))).i, mx);
  EXPECT_EQ(ev(bin(Op::Mul, i(mx), i(2))).i, -2);
}

TEST(IrEval, BoolsAndComparisons) {
  EXPECT_EQ(ev(bin(Op::Add, yes(), yes())).i, 2);
  EXPECT_EQ(ev(un(Op::Neg, yes())).i, -1);
  ir::EvalEnv env;
  env.q_idx = 5;
  env.kv_idx = 3;
  EXPECT_TRUE(ev(bin(Op::Ge, q(), kv()), env).as_bool());
  EXPECT_FALSE(ev(bin(Op::Lt, q(), kv()), env).as_bool());
  EXPECT_EQ(ev(bin(Op::Lt, q(), kv()), env).type, Type::Bool);
  EXPECT_TRUE(ev(bin(Op::Lt, q(), f(5.5)), env).as_bool());  // compares as float
  EXPECT_FALSE(ev(bin(Op::Lt, q(), f(4.5)), env).as_bool());
  EXPECT_TRUE(ev(bin(Op::And, q(), f(0.5)), env).as_bool());
  EXPECT_FALSE(ev(bin(Op::And, q(), f(0)), env).as_bool());
  EXPECT_TRUE(ev(bin(Op::Or, i(0), f(-0.5)), env).as_bool());
  EXPECT_TRUE(ev(un(Op::Not, i(0))).as_bool());
  EXPECT_EQ(ev(un(Op::Abs, i(-4))).i, 4);
  EXPECT_EQ(ev(bin(Op::Min, i(-4), i(2))).i, -4);
  EXPECT_EQ(ev(bin(Op::Max, f(-4), i(2))).f, 2.0);
}

TEST(IrEval, Casts) {
  EXPECT_EQ(ev(ir::cast(f(3.7), Type::Int)).i, 3);
  EXPECT_EQ(ev(ir::cast(f(-3.7), Type::Int)).i, -3);  // truncation toward zero
  EXPECT_EQ(ev(ir::cast(f(1e30), Type::Int)).i, std::numeric_limits<int64_t>::min());  // like x86
  EXPECT_EQ(ev(ir::cast(f(std::nan("")), Type::Int)).i, std::numeric_limits<int64_t>::min());
  EXPECT_EQ(ev(ir::cast(f(0.25), Type::Bool)).i, 1);
  EXPECT_EQ(ev(ir::cast(f(0.0), Type::Bool)).i, 0);
  ir::EvalEnv env;
  env.q_idx = 9;
  env.score = -2.5;
  ir::Value v = ev(ir::cast(q(), Type::Float), env);
  EXPECT_EQ(v.type, Type::Float);
  EXPECT_EQ(v.f, 9.0);
  EXPECT_EQ(ev(ir::cast(score(), Type::Int), env).i, -2);
  EXPECT_EQ(ev(un(Op::Floor, score()), env).f, -3.0);
  EXPECT_EQ(ev(un(Op::Ceil, score()), env).f, -2.0);
  EXPECT_DOUBLE_EQ(ev(un(Op::Sigmoid, score()), env).f, 1 / (1 + std::exp(2.5)));
  EXPECT_DOUBLE_EQ(ev(un(Op::Rsqrt, f(4)), env).f, 0.5);
}

TEST(IrEval, SelectIsLazy) {
  // The branch not taken is never evaluated: no division by zero, no out-of-range read.
  Expr e = ir::select(bin(Op::Eq, kv(), i(0)), i(-1), bin(Op::Div, q(), kv()));
  ir::EvalEnv env;
  env.q_idx = 8;
  env.kv_idx = 0;
  EXPECT_EQ(ev(e, env).i, -1);
  env.kv_idx = 3;
  EXPECT_EQ(ev(e, env).i, 2);

  std::vector<float> s = {1, 2, 3, 4};
  env.buffers = {{"slopes", contiguous_view(s.data(), DType::F32, {4})}};
  Expr guarded = ir::select(bin(Op::Lt, q(), i(4)), ir::load(kSlopes, {q()}), f(0));
  env.q_idx = 100;
  EXPECT_EQ(ev(guarded, env).f, 0.0);
  env.q_idx = 3;
  EXPECT_EQ(ev(guarded, env).f, 4.0);
}

TEST(IrEval, ParamsAndUnboundNames) {
  ir::EvalEnv env;
  env.params = {{"cap", 30.0}};
  env.score = 45;
  Expr e = bin(Op::Mul, ir::param("cap"), un(Op::Tanh, bin(Op::Div, score(), ir::param("cap"))));
  EXPECT_DOUBLE_EQ(ev(e, env).f, 30 * std::tanh(1.5));
  std::string msg = error_of([&] { ev(ir::param("other"), env); });
  EXPECT_NE(msg.find("param 'other'"), std::string::npos) << msg;
  msg = error_of([&] { ev(ir::load(kSlopes, {hv()}), env); });
  EXPECT_NE(msg.find("buffer 'slopes'"), std::string::npos) << msg;
}

TEST(IrEval, OutOfRangeBufferReadThrows) {
  std::vector<float> s = {0.5f, 0.25f, 0.125f, 0.0625f};
  ir::EvalEnv env;
  env.buffers = {{"slopes", contiguous_view(s.data(), DType::F32, {4})}};
  env.h = 3;
  EXPECT_EQ(ev(ir::load(kSlopes, {hv()}), env).f, 0.0625);
  env.h = 4;
  std::string msg = error_of([&] { ev(ir::load(kSlopes, {hv()}), env); });
  EXPECT_NE(msg.find("buffer 'slopes' index 4 out of range for dim 0 of size 4"), std::string::npos)
      << msg;
  env.h = -1;
  msg = error_of([&] { ev(ir::load(kSlopes, {hv()}), env); });
  EXPECT_NE(msg.find("index -1 out of range"), std::string::npos) << msg;

  std::vector<float> m = {0, 1, 2, 10, 11, 12};
  env.buffers = {{"bias2", contiguous_view(m.data(), DType::F32, {2, 3})}};
  env.b = 1;
  env.h = 3;
  msg = error_of([&] { ev(ir::load(kBias2, {bv(), hv()}), env); });
  EXPECT_NE(msg.find("index 3 out of range for dim 1 of size 3"), std::string::npos) << msg;
  // A buffer bound with another rank than the IR reads is an error, not a wild read.
  env.buffers = {{"bias2", contiguous_view(m.data(), DType::F32, {6})}};
  msg = error_of([&] { ev(ir::load(kBias2, {bv(), hv()}), env); });
  EXPECT_NE(msg.find("bias2"), std::string::npos) << msg;
}

TEST(IrEval, StridedBuffers) {
  // A [2, 3] view with strides {1, 2} (a transpose): element (i, j) is at i + 2 j.
  std::vector<float> m = {0, 1, 2, 3, 4, 5};
  TensorView t = contiguous_view(m.data(), DType::F32, {2, 3});
  t.strides[0] = 1;
  t.strides[1] = 2;
  ir::EvalEnv env;
  env.buffers = {{"bias2", t}};
  env.b = 1;
  env.h = 2;
  EXPECT_EQ(ev(ir::load(kBias2, {bv(), hv()}), env).f, 5.0);
  env.b = 0;
  env.h = 1;
  EXPECT_EQ(ev(ir::load(kBias2, {bv(), hv()}), env).f, 2.0);
  // Every other element of a rank-1 buffer.
  TensorView every2 = contiguous_view(m.data(), DType::F32, {3});
  every2.strides[0] = 2;
  env.buffers = {{"slopes", every2}};
  env.h = 2;
  EXPECT_EQ(ev(ir::load(kSlopes, {hv()}), env).f, 4.0);
}

TEST(IrEval, Int64BuffersAreExact) {
  const int64_t big = (int64_t(1) << 53) + 1;  // not a double
  std::vector<int64_t> w = {big, std::numeric_limits<int64_t>::max(), -big,
                            std::numeric_limits<int64_t>::min()};
  ir::BufferDecl d{"w", DType::I64, 1};
  ir::EvalEnv env;
  env.buffers = {{"w", contiguous_view(w.data(), DType::I64, {4})}};
  for (int64_t k = 0; k < 4; ++k) {
    ir::Value v = ev(ir::load(d, {i(k)}), env);
    EXPECT_EQ(v.type, Type::Int);
    EXPECT_EQ(v.i, w[size_t(k)]) << k;
  }
  EXPECT_TRUE(ev(bin(Op::Eq, ir::load(d, {i(0)}), i(big)), env).as_bool());
  EXPECT_FALSE(ev(bin(Op::Eq, ir::load(d, {i(0)}), i(big - 1)), env).as_bool());
  EXPECT_EQ(ev(bin(Op::Sub, ir::load(d, {i(0)}), i(big - 1)), env).i, 1);

  std::vector<int32_t> w32 = {-5, 2147483647};
  ir::BufferDecl d32{"w", DType::I32, 1};
  env.buffers = {{"w", contiguous_view(w32.data(), DType::I32, {2})}};
  EXPECT_EQ(ev(ir::load(d32, {i(0)}), env).i, -5);
  EXPECT_EQ(ev(ir::load(d32, {i(1)}), env).i, 2147483647);
}

TEST(IrEval, HalfAndBfloat16Buffers) {
  // bf16: the top 16 bits of an fp32.  0x3FC0 = 1.5, 0xC049 = -3.140625, 0x7F80 = inf.
  std::vector<uint16_t> bf = {0x3FC0, 0xC049, 0x7F80, 0x0001};
  ir::BufferDecl dbf{"t", DType::BF16, 1};
  ir::EvalEnv env;
  env.buffers = {{"t", contiguous_view(bf.data(), DType::BF16, {4})}};
  EXPECT_EQ(ev(ir::load(dbf, {i(0)}), env).f, 1.5);
  EXPECT_EQ(ev(ir::load(dbf, {i(1)}), env).f, -3.140625);
  EXPECT_EQ(ev(ir::load(dbf, {i(2)}), env).f, std::numeric_limits<double>::infinity());
  EXPECT_EQ(ev(ir::load(dbf, {i(3)}), env).f,
            double(std::numeric_limits<float>::denorm_min()) * 65536);
  // fp16: 0x3E00 = 1.5, 0x7BFF = 65504 (max), 0x0001 = 2^-24 (subnormal), 0xC000 = -2.
  std::vector<uint16_t> h = {0x3E00, 0x7BFF, 0x0001, 0xC000};
  ir::BufferDecl dh{"t", DType::F16, 1};
  env.buffers = {{"t", contiguous_view(h.data(), DType::F16, {4})}};
  EXPECT_EQ(ev(ir::load(dh, {i(0)}), env).f, 1.5);
  EXPECT_EQ(ev(ir::load(dh, {i(1)}), env).f, 65504.0);
  EXPECT_EQ(ev(ir::load(dh, {i(2)}), env).f, std::ldexp(1.0, -24));
  EXPECT_EQ(ev(ir::load(dh, {i(3)}), env).f, -2.0);
  // fp64 keeps every bit.
  std::vector<double> d = {0.1};
  env.buffers = {{"t", contiguous_view(d.data(), DType::F64, {1})}};
  EXPECT_EQ(ev(ir::load({"t", DType::F64, 1}, {i(0)}), env).f, 0.1);
}

// ---------------------------------------------------------------- rewriting

TEST(IrRewrite, SubstituteReplacesEveryOccurrenceAndSharesTheRest) {
  // user(score) = score * 2 + score; score := 30 * tanh(score / 30)
  const Expr user = bin(Op::Add, bin(Op::Mul, score(), f(2)), score());
  const Expr capped = bin(Op::Mul, f(30), un(Op::Tanh, bin(Op::Div, score(), f(30))));
  const Expr composed = ir::substitute(user, Var::Score, capped);
  EXPECT_EQ(ir::to_string(composed), "(((30.0 * tanh((score / 30.0))) * 2.0) + (30.0 * tanh((score / 30.0))))");
  ir::EvalEnv env;
  env.score = 12.5;
  const double c = 30 * std::tanh(12.5 / 30);
  EXPECT_DOUBLE_EQ(ir::eval(composed, env).f, c * 2 + c);
  // A tree without the variable comes back as is (same node); index variables work too.
  const Expr mask = bin(Op::Ge, q(), kv());
  EXPECT_EQ(ir::substitute(mask, Var::Score, capped), mask);
  const Expr shifted = ir::substitute(mask, Var::QIdx, bin(Op::Add, q(), i(5)));
  EXPECT_EQ(ir::to_string(shifted), "((q_idx + 5) >= kv_idx)");
  // The replacement must keep the variable's type.
  EXPECT_NE(error_of([&] { ir::substitute(mask, Var::QIdx, f(1.5)); }).find("q_idx is int"), std::string::npos);
}

}  // namespace
}  // namespace flexjit

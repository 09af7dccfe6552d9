// LABELS: unit errors
// The expression-text parser: precedence, typing (through the IR constructors), functions,
// buffers and params, the mods users actually write, and precise rejection of everything else.
#include "jit/parser.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace flexjit {
namespace {

using ir::Type;

ParseScope score_scope() {
  ParseScope s;
  s.buffers = {{"slopes", DType::F32, 1}, {"doc", DType::I32, 1}, {"bias2", DType::F32, 2}};
  s.params = {{"cap"}, {"scale"}};
  return s;
}

ParseScope mask_scope() {
  ParseScope s = score_scope();
  s.allow_score = false;
  return s;
}

// Small buffers bound for eval: slopes[4], doc[6] (int32), bias2[2][3].
struct Fixture {
  std::vector<float> slopes = {0.5f, 0.25f, 0.125f, 0.0625f};
  std::vector<int32_t> doc = {0, 0, 1, 1, 1, 2};
  std::vector<float> bias2 = {0, 1, 2, 10, 11, 12};
  ir::EvalEnv env;

  Fixture() {
    env.score = 0.5;
    env.b = 0;
    env.h = 2;
    env.q_idx = 5;
    env.kv_idx = 3;
    env.params = {{"cap", 30.0}, {"scale", 0.125}};
    env.buffers = {{"slopes", contiguous_view(slopes.data(), DType::F32, {4})},
                   {"doc", contiguous_view(doc.data(), DType::I32, {6})},
                   {"bias2", contiguous_view(bias2.data(), DType::F32, {2, 3})}};
  }
};

ir::Expr parse(const std::string& text) { return parse_expr(text, score_scope(), "score_mod"); }
std::string str(const std::string& text) { return ir::to_string(parse(text)); }

ir::Value eval_at(const std::string& text, const ir::EvalEnv& env) {
  return ir::eval(parse(text), env);
}

double evf(const std::string& text) {
  Fixture f;
  ir::Value v = eval_at(text, f.env);
  EXPECT_EQ(v.type, Type::Float) << text;
  return v.f;
}

int64_t evi(const std::string& text) {
  Fixture f;
  ir::Value v = eval_at(text, f.env);
  EXPECT_EQ(v.type, Type::Int) << text;
  return v.i;
}

bool evb(const std::string& text) {
  Fixture f;
  ir::Value v = eval_at(text, f.env);
  EXPECT_EQ(v.type, Type::Bool) << text;
  return v.i != 0;
}

// ---- precedence and associativity ----

TEST(Parser, PrecedenceInPrintedTree) {
  EXPECT_EQ(str("1 + 2 * 3"), "(1 + (2 * 3))");
  EXPECT_EQ(str("(1 + 2) * 3"), "((1 + 2) * 3)");
  EXPECT_EQ(str("1 - 2 - 3"), "((1 - 2) - 3)");
  EXPECT_EQ(str("8 / 4 / 2"), "((8 / 4) / 2)");
  EXPECT_EQ(str("-q_idx * 2"), "((-q_idx) * 2)");
  EXPECT_EQ(str("!true || false && false"), "((!true) || (false && false))");
  EXPECT_EQ(str("q_idx < kv_idx == true"), "(int((q_idx < kv_idx)) == 1)");
  EXPECT_EQ(str("q_idx + 1 < kv_idx * 2"), "((q_idx + 1) < (kv_idx * 2))");
  EXPECT_EQ(str("q_idx == kv_idx || h != b && b < 1"),
            "((q_idx == kv_idx) || ((h != b) && (b < 1)))");
  EXPECT_EQ(str("true ? 1 : false ? 2 : 3"), "(true ? 1 : (false ? 2 : 3))");
  EXPECT_EQ(str("true ? false ? 1 : 2 : 3"), "(true ? (false ? 1 : 2) : 3)");
  EXPECT_EQ(str("q_idx > 0 ? h : b"), "((q_idx > 0) ? h : b)");
  EXPECT_EQ(str("- - h"), "(-(-h))");
}

TEST(Parser, ArithmeticFollowsCpp) {
  EXPECT_EQ(evi("1 + 2 * 3"), 7);
  EXPECT_EQ(evi("(1 + 2) * 3"), 9);
  EXPECT_EQ(evi("7 / 2"), 3);
  EXPECT_EQ(evi("-7 / 2"), -3);
  EXPECT_EQ(evi("-7 % 3"), -1);
  EXPECT_EQ(evi("7 % 4 % 2"), 1);  // right-assoc would divide by zero
  EXPECT_EQ(evi("2 - 3 - 4"), -5);
  EXPECT_EQ(evi("8 / 4 / 2"), 1);
  EXPECT_DOUBLE_EQ(evf("7.0 / 2"), 3.5);
  EXPECT_DOUBLE_EQ(evf("float(7) / 2"), 3.5);
  EXPECT_TRUE(evb("1 < 2 == 1"));
  EXPECT_TRUE(evb("1 < 2 < 3"));
  EXPECT_FALSE(evb("3 > 2 > 1"));  // (3 > 2) is 1, and 1 > 1 is false, as in C++
  EXPECT_TRUE(evb("true || false && false"));
  EXPECT_FALSE(evb("!(1 == 1)"));
  EXPECT_TRUE(evb("!!2"));
}

TEST(Parser, TernaryNesting) {
  const std::string t = "q_idx < 2 ? 10 : q_idx < 4 ? 20 : 30";
  ir::EvalEnv env;
  for (auto [q, want] : std::vector<std::pair<int, int>>{{1, 10}, {3, 20}, {5, 30}}) {
    env.q_idx = q;
    EXPECT_EQ(eval_at(t, env).i, want) << q;
  }
  EXPECT_EQ(str("where(q_idx < 2, 10, 20)"), str("q_idx < 2 ? 10 : 20"));
  EXPECT_EQ(parse("true ? 1 : 2.5")->type, Type::Float);
  EXPECT_EQ(parse("true ? false : true")->type, Type::Bool);
}

// ---- literals ----

TEST(Parser, Literals) {
  EXPECT_EQ(evi("12"), 12);
  EXPECT_EQ(evi("0"), 0);
  EXPECT_EQ(evi("9223372036854775807"), std::numeric_limits<int64_t>::max());
  EXPECT_DOUBLE_EQ(evf("1.5"), 1.5);
  EXPECT_DOUBLE_EQ(evf(".5"), 0.5);
  EXPECT_DOUBLE_EQ(evf("1e-3"), 1e-3);
  EXPECT_DOUBLE_EQ(evf("1E+2"), 100.0);
  EXPECT_DOUBLE_EQ(evf("1.e2"), 100.0);
  EXPECT_DOUBLE_EQ(evf("2."), 2.0);
  EXPECT_DOUBLE_EQ(evf("2.f"), 2.0);
  EXPECT_DOUBLE_EQ(evf("1.0f"), 1.0);
  EXPECT_DOUBLE_EQ(evf("1e5F"), 1e5);
  EXPECT_DOUBLE_EQ(evf("0.1f"), 0.1);  // kept in float64, like Python
  EXPECT_TRUE(evb("true"));
  EXPECT_FALSE(evb("false"));
  EXPECT_EQ(evf("inf"), std::numeric_limits<double>::infinity());
  EXPECT_EQ(evf("INFINITY"), std::numeric_limits<double>::infinity());
  EXPECT_EQ(evf("-inf"), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(str("-inf"), "(-inf)");
  EXPECT_EQ(str("score > 0 ? score : -inf"), "((score > 0.0) ? score : (-inf))");
}

TEST(Parser, WhitespaceIsFree) {
  EXPECT_EQ(str(" \tscore\n*\r\n2 "), "(score * 2.0)");
  EXPECT_EQ(str("score*2"), "(score * 2.0)");
}

// ---- typing comes from the IR constructors ----

TEST(Parser, PromotionAndCasts) {
  EXPECT_EQ(parse("q_idx + 1")->type, Type::Int);
  EXPECT_EQ(parse("q_idx + 0.5")->type, Type::Float);
  EXPECT_EQ(parse("score + 1")->type, Type::Float);
  EXPECT_EQ(parse("q_idx < 1")->type, Type::Bool);
  EXPECT_EQ(evi("true + 1"), 2);
  EXPECT_EQ(evi("+true"), 1);
  EXPECT_EQ(str("+score"), "score");
  EXPECT_EQ(evi("-true"), -1);
  EXPECT_EQ(evi("int(3.7)"), 3);
  EXPECT_EQ(evi("int(-3.7)"), -3);
  EXPECT_DOUBLE_EQ(evf("float(q_idx) / 2"), 2.5);
  EXPECT_TRUE(evb("bool(2)"));
  EXPECT_FALSE(evb("bool(0.0)"));
  EXPECT_EQ(str("float(q_idx)"), "float(q_idx)");
  EXPECT_EQ(str("int(score)"), "int(score)");
  EXPECT_EQ(str("bool(h)"), "bool(h)");
  EXPECT_EQ(str("score + q_idx"), "(score + float(q_idx))");
}

TEST(Parser, EveryFunction) {
  const double x = 0.5;  // the fixture's score
  EXPECT_DOUBLE_EQ(evf("abs(-score)"), x);
  EXPECT_EQ(evi("abs(-3)"), 3);
  EXPECT_DOUBLE_EQ(evf("exp(score)"), std::exp(x));
  EXPECT_DOUBLE_EQ(evf("exp2(score)"), std::exp2(x));
  EXPECT_DOUBLE_EQ(evf("log(score)"), std::log(x));
  EXPECT_DOUBLE_EQ(evf("log2(score)"), std::log2(x));
  EXPECT_DOUBLE_EQ(evf("tanh(score)"), std::tanh(x));
  EXPECT_DOUBLE_EQ(evf("sin(score)"), std::sin(x));
  EXPECT_DOUBLE_EQ(evf("cos(score)"), std::cos(x));
  EXPECT_DOUBLE_EQ(evf("tan(score)"), std::tan(x));
  EXPECT_DOUBLE_EQ(evf("sqrt(score)"), std::sqrt(x));
  EXPECT_DOUBLE_EQ(evf("rsqrt(score)"), 1 / std::sqrt(x));
  EXPECT_DOUBLE_EQ(evf("sigmoid(score)"), 1 / (1 + std::exp(-x)));
  EXPECT_DOUBLE_EQ(evf("floor(-score)"), -1.0);
  EXPECT_DOUBLE_EQ(evf("ceil(score)"), 1.0);
  EXPECT_DOUBLE_EQ(evf("exp(1)"), std::exp(1.0));  // math functions take float
  EXPECT_EQ(evi("min(q_idx, kv_idx)"), 3);
  EXPECT_EQ(evi("max(q_idx, kv_idx)"), 5);
  EXPECT_DOUBLE_EQ(evf("max(score, 1)"), 1.0);
  EXPECT_EQ(evi("where(q_idx > kv_idx, 1, 2)"), 1);
  EXPECT_DOUBLE_EQ(evf("where(q_idx < kv_idx, 1, score)"), x);
  for (const char* f : {"abs", "exp", "exp2", "log", "log2", "tanh", "sin", "cos", "tan", "sqrt",
                        "rsqrt", "sigmoid", "floor", "ceil"}) {
    EXPECT_EQ(str(std::string(f) + "(score)"), std::string(f) + "(score)");
  }
  EXPECT_EQ(str("min(score, cap)"), "min(score, cap)");
  EXPECT_EQ(str("max(h, b)"), "max(h, b)");
}

// ---- buffers and params ----

TEST(Parser, BuffersAndParams) {
  EXPECT_DOUBLE_EQ(evf("slopes[h]"), 0.125);
  EXPECT_DOUBLE_EQ(evf("slopes(h)"), 0.125);
  EXPECT_EQ(evi("doc[q_idx]"), 2);
  EXPECT_EQ(parse("doc[0]")->type, Type::Int);
  EXPECT_DOUBLE_EQ(evf("bias2(1, 2)"), 12.0);
  EXPECT_DOUBLE_EQ(evf("bias2(b, kv_idx - 1)"), 2.0);
  EXPECT_DOUBLE_EQ(evf("bias2(int(score * 2), 0)"), 10.0);
  EXPECT_DOUBLE_EQ(evf("slopes[doc[q_idx] + 1]"), 0.0625);
  EXPECT_DOUBLE_EQ(evf("cap"), 30.0);
  EXPECT_DOUBLE_EQ(evf("score * scale"), 0.0625);
  EXPECT_EQ(parse("cap")->type, Type::Float);
  EXPECT_EQ(ir::buffers_used(parse("slopes[h] + bias2(b, h)")),
            (std::vector<std::string>{"bias2", "slopes"}));
  EXPECT_EQ(ir::params_used(parse("cap * tanh(score / cap) + scale")),
            (std::vector<std::string>{"cap", "scale"}));
  EXPECT_EQ(str("bias2(q_idx, kv_idx)"), "bias2(q_idx, kv_idx)");
}

// ---- mods as users write them ----

TEST(Parser, Alibi) {
  ir::Expr e = parse("score + slopes[h] * (kv_idx - q_idx)");
  EXPECT_EQ(ir::to_string(e), "(score + (slopes[h] * float((kv_idx - q_idx))))");
  Fixture f;
  EXPECT_DOUBLE_EQ(ir::eval(e, f.env).f, 0.5 + 0.125 * (3 - 5));
}

TEST(Parser, Softcap) {
  ir::Expr e = parse("cap * tanh(score / cap)");
  Fixture f;
  f.env.score = 45;
  EXPECT_DOUBLE_EQ(ir::eval(e, f.env).f, 30 * std::tanh(1.5));
}

TEST(Parser, MaskMods) {
  auto mask = [](const std::string& t) { return parse_expr(t, mask_scope(), "mask_mod"); };
  Fixture f;
  auto at = [&](const ir::Expr& e, int64_t q, int64_t kv) {
    f.env.q_idx = q;
    f.env.kv_idx = kv;
    ir::Value v = ir::eval(e, f.env);
    EXPECT_EQ(v.type, Type::Bool);
    return v.i != 0;
  };
  ir::Expr causal = mask("q_idx >= kv_idx");
  EXPECT_TRUE(at(causal, 4, 4));
  EXPECT_FALSE(at(causal, 3, 4));

  ir::Expr window = mask("q_idx >= kv_idx && q_idx - kv_idx < 256");
  EXPECT_EQ(ir::to_string(window), "((q_idx >= kv_idx) && ((q_idx - kv_idx) < 256))");
  EXPECT_TRUE(at(window, 300, 100));
  EXPECT_FALSE(at(window, 300, 10));
  EXPECT_FALSE(at(window, 10, 300));

  ir::Expr document = mask("doc[q_idx] == doc[kv_idx]");
  EXPECT_TRUE(at(document, 2, 4));
  EXPECT_FALSE(at(document, 1, 2));

  ir::Expr both = mask("doc[q_idx] == doc[kv_idx] && q_idx >= kv_idx");
  EXPECT_TRUE(at(both, 4, 2));
  EXPECT_FALSE(at(both, 2, 4));
  EXPECT_FALSE(ir::uses_var(both, ir::Var::Score));
}

TEST(Parser, LimitsAcceptWhatIsInside) {
  std::string deep = std::string(150, '(') + "score" + std::string(150, ')');
  EXPECT_EQ(str(deep), "score");
  std::string chain = "1";
  for (int i = 0; i < 900; ++i) chain += "+1";
  EXPECT_EQ(evi(chain), 901);
  std::string padded = "score" + std::string(64 * 1024 - 5, ' ');
  EXPECT_EQ(str(padded), "score");
}

// ---- rejected input: message substring AND column ----

struct Rejected {
  std::string text;
  std::string message;  // substring of what()
  int column;
  bool mask = false;  // parse as a mask_mod
};

void PrintTo(const Rejected& r, std::ostream* os) { *os << "\"" << r.text.substr(0, 60) << "\""; }

std::string repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

std::vector<Rejected> rejected_cases() {
  std::string long_chain = "1" + repeat("+1", 1100);
  return {
      // empty
      {"", "score_mod: empty expression at column 1", 1},
      {"  \n ", "empty expression", 1},
      // names
      {"kv_ix", "unknown name 'kv_ix'", 1},
      {"kv_ix", "did you mean 'kv_idx'?", 1},
      {"score + q_id", "did you mean 'q_idx'?", 9},
      {"sigmod(score)", "did you mean 'sigmoid'?", 1},
      {"True", "did you mean 'true'?", 1},
      {"x",
       "names valid here: score, b, h, q_idx, kv_idx; params: cap, scale; "
       "buffers: slopes[i], doc[i], bias2(i, j); functions: where, min",
       1},
      {"x", "names valid here: b, h, q_idx, kv_idx;", 1, true},
      {"return score", "without 'return'", 1},
      {"score and true", "unexpected 'and' after the end of the expression", 7},
      {"score and true", "use '&&'", 7},
      {"score if true else 0", "write 'cond ? a : b'", 7},
      {"pow(score, 2)", "pow is not supported", 1},
      {"nan", "'nan' is not allowed", 1},
      {"-NAN", "'NAN' is not allowed", 2},
      // score in a mask_mod
      {"score > 0", "mask_mod cannot read score", 1, true},
      {"q_idx >= kv_idx && score > 0", "mask_mod cannot read score", 20, true},
      // functions, params, variables, buffers used wrongly
      {"exp(score, 1)", "exp takes 1 argument, got 2", 1},
      {"exp()", "exp takes 1 argument, got 0", 1},
      {"where(true, 1)", "where takes 3 arguments, got 2", 1},
      {"1 + min(1)", "min takes 2 arguments, got 1", 5},
      {"exp + 1", "'exp' is a function and must be called", 1},
      {"cap(2)", "'cap' is a param (a float scalar), not a function or buffer", 4},
      {"cap[0]", "'cap' is a param (a float scalar), not a buffer", 4},
      {"q_idx(1)", "'q_idx' is a mod variable, not a function or buffer", 6},
      {"h[0]", "'h' is a mod variable, not a buffer", 2},
      {"score + slopes", "buffer 'slopes' is used without an index", 9},
      {"bias2[h]", "'[]' indexes rank-1 buffers only, and 'bias2' has rank 2", 6},
      {"bias2(h)", "buffer 'bias2' has rank 2 but got 1 index", 6},
      {"slopes(h, 1)", "buffer 'slopes' has rank 1 but got 2 indices", 7},
      {"slopes[h, 1]", "buffer 'slopes' has rank 1 but got 2 indices", 7},
      {"slopes[]", "has rank 1 but got 0 indices", 7},
      {"slopes[h][0]", "'[' cannot follow this operand", 10},
      {"2(3)", "'(' cannot follow this operand", 2},
      {"exp(score)(1)", "'(' cannot follow this operand", 11},
      // structure
      {"1 + * 2", "expected an operand, found '*'", 5},
      {")", "expected an operand, found ')'", 1},
      {"score +", "expected an operand, found end of text", 8},
      {"min(1,)", "expected an operand, found ')'", 7},
      {"(1 + 2", "expected ')' to close the '(' at column 1, found end of text", 7},
      {"((score)", "expected ')' to close the '(' at column 1", 9},
      {"exp(score", "expected ',' or ')' in the call to exp opened at column 4", 10},
      {"slopes[h", "expected ',' or ']' in the index of slopes opened at column 7", 9},
      {"exp(score]", "found ']'", 10},
      {"score)", "unexpected ')' after the end of the expression", 6},
      {"score score", "unexpected 'score' after the end of the expression", 7},
      {"score ? 1", "expected ':' to complete the '?' at column 7, found end of text", 10},
      {"score : 1", "unexpected ':' after the end of the expression", 7},
      {"score, 1", "unexpected ',' after the end of the expression", 6},
      {"score // comment", "expected an operand, found '/'", 8},
      // numbers
      {"99999999999999999999", "integer literal '99999999999999999999' does not fit in int64", 1},
      {"-9223372036854775808", "does not fit in int64", 2},
      {"score + 1.2.3", "malformed number '1.2.3'", 9},
      {"0x10", "hexadecimal", 1},
      {"2f", "malformed number '2f'", 1},
      {"score * 12abc", "malformed number '12abc'", 9},
      {"1e", "malformed number '1e'", 1},
      {"1e+", "malformed number '1e'", 1},
      {"1e999", "float literal '1e999' is out of range", 1},
      {"1e39f", "overflows float32", 1},
      {"012", "leading zero", 1},
      // characters outside the language
      {"score;", "character ';' is not part of the language", 6},
      {"score; system(\"rm -rf /\")", "character ';'", 6},
      {"{score}", "character '{'", 1},
      {"#include <x>", "character '#'", 1},
      {"score + \"a\"", "character '\"'", 9},
      {"score + 'a'", "character '''", 9},
      {"score \\\n+ 1", "character '\\'", 7},
      {"torch.where(true, score, 0.0)", "no member access", 6},
      {"score ^ 2", "character '^'", 7},
      {"~h", "character '~'", 1},
      {"score @ 2", "character '@'", 7},
      {"score = 1", "'=' is not an operator", 7},
      {"q_idx & 1", "bitwise '&' is not supported", 7},
      {"q_idx | 1", "did you mean '||'?", 7},
      {"score ** 2", "'**' (power) is not supported", 7},
      {"h << 1", "shift operators are not supported", 3},
      {"score + \xC3\xA9", "byte 0xC3 is not part of the language", 9},
      {std::string("score\x01"), "byte 0x01", 6},
      {std::string("score\0+1", 8), "byte 0x00", 6},
      // type errors from the IR constructors, at the operator's column
      {"score % 2", "'%' needs int operands", 7},
      {"q_idx + score % 2", "'%' needs int operands", 15},
      {"slopes[score]", "indexed with a float expression", 8},
      {"bias2(h, score * 2)", "indexed with a float expression", 10},
      // limits
      {std::string(250, '(') + "1" + std::string(250, ')'), "nests deeper than 200 levels", 201},
      {std::string(250, '-') + "1", "nests deeper than 200 levels", 200},
      {long_chain, "deeper than 1000 nested operations", 2000},
      {"score" + std::string(70000, ' '), "more than the 65536 allowed", 65537},
  };
}

class RejectedTest : public ::testing::TestWithParam<Rejected> {};

// The echoed text and caret lines of a ParseError message must point at `column`.
void expect_caret_at(const std::string& msg, const std::string& text, int column) {
  size_t l1 = msg.find('\n');
  ASSERT_NE(l1, std::string::npos);
  size_t l2 = msg.find('\n', l1 + 1);
  ASSERT_NE(l2, std::string::npos);
  std::string shown = msg.substr(l1 + 1, l2 - l1 - 1);
  std::string caret = msg.substr(l2 + 1, msg.find('\n', l2 + 1) - l2 - 1);
  ASSERT_EQ(caret.find_first_not_of(' '), caret.size() - 1) << caret;
  ASSERT_EQ(caret.back(), '^');
  size_t at = caret.size() - 1;
  if (size_t(column) > text.size()) {
    EXPECT_TRUE(at == shown.size() || shown.compare(at, 3, "...") == 0);
    return;
  }
  unsigned char c = static_cast<unsigned char>(text[column - 1]);
  char want = (c == '\n' || c == '\t' || c == '\r') ? ' '
              : (c < 0x20 || c > 0x7e)              ? '?'
                                                    : static_cast<char>(c);
  ASSERT_LT(at, shown.size());
  EXPECT_EQ(shown[at], want);
}

TEST_P(RejectedTest, MessageAndColumn) {
  const Rejected& r = GetParam();
  ParseScope scope = r.mask ? mask_scope() : score_scope();
  try {
    ir::Expr e = parse_expr(r.text, scope, r.mask ? "mask_mod" : "score_mod");
    FAIL() << "accepted: " << ir::to_string(e);
  } catch (const ParseError& err) {
    std::string msg = err.what();
    EXPECT_NE(msg.find(r.message), std::string::npos) << msg;
    EXPECT_EQ(err.column(), r.column) << msg;
    EXPECT_NE(msg.find(" at column " + std::to_string(r.column) + "\n"), std::string::npos) << msg;
    EXPECT_EQ(msg.rfind(r.mask ? "mask_mod: " : "score_mod: ", 0), 0u) << msg;
    expect_caret_at(msg, r.text, r.column);
  }
}

INSTANTIATE_TEST_SUITE_P(Parser, RejectedTest, ::testing::ValuesIn(rejected_cases()));

TEST(Parser, MessageLayout) {
  try {
    parse("score)");
    FAIL();
  } catch (const ParseError& e) {
    EXPECT_STREQ(e.what(),
                 "score_mod: unexpected ')' after the end of the expression at column 6\n"
                 "  score)\n"
                 "       ^\n"
                 "  there are more ')' than '('");
  }
  try {
    parse_expr("h +", ParseScope{}, "expression");
    FAIL();
  } catch (const ParseError& e) {
    EXPECT_STREQ(e.what(),
                 "expression: expected an operand, found end of text at column 4\n"
                 "  h +\n"
                 "     ^");
  }
}

TEST(Parser, LongTextIsShownAsAWindow) {
  std::string text = repeat("score + ", 100) + "oops + " + repeat("score + ", 100) + "1";
  try {
    parse(text);
    FAIL();
  } catch (const ParseError& e) {
    std::string msg = e.what();
    EXPECT_EQ(e.column(), 801);
    EXPECT_NE(msg.find("  ...score + "), std::string::npos) << msg;
    EXPECT_LT(msg.size(), 1200u);  // not the whole 1.6 KB text, not the whole scope twice
    expect_caret_at(msg, text, 801);
  }
}

TEST(Parser, BadScopeIsAnErrorButNotAParseError) {
  auto reject = [](const ParseScope& s, const std::string& want) {
    try {
      parse_expr("score", s, "score_mod");
      ADD_FAILURE() << "accepted a bad scope, wanted: " << want;
    } catch (const ParseError& e) {
      ADD_FAILURE() << "bad scope reported as a ParseError: " << e.what();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  ParseScope s;
  s.buffers = {{"exp", DType::F32, 1}};
  reject(s, "buffer name 'exp' is reserved (it is a function)");
  s = {};
  s.params = {{"h"}};
  reject(s, "param name 'h' is reserved (it is a mod variable)");
  s = {};
  s.params = {{"inf"}};
  reject(s, "is reserved (it is a constant)");
  s = {};
  s.params = {{"a;b"}};
  reject(s, "is not an identifier");
  s = {};
  s.params = {{""}};
  reject(s, "is not an identifier");
  s = {};
  s.buffers = {{"t", DType::F32, 1}};
  s.params = {{"t"}};
  reject(s, "param name 't' is declared twice");
  s = {};
  s.buffers = {{"t", DType::F32, 5}};
  reject(s, "buffer 't' has rank 5");
}

TEST(Parser, ErrorsLeaveTheParserUsable) {
  EXPECT_THROW(parse("score +"), ParseError);
  EXPECT_EQ(str("score + 1"), "(score + 1.0)");
}

}  // namespace
}  // namespace flexjit

// LABELS: unit numerics
// The inline math that generated mods use (exp, exp2, tanh, sigmoid, int helpers), compiled
// through the real codegen + Clang path and compared with float64 libm over wide ranges,
// including inf, -inf, NaN and the overflow/underflow edges.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "jit/codegen.h"
#include "jit/compile.h"
#include "jit/parser.h"

namespace flexjit {
namespace {

using ScoreFn = float (*)(float);

// Compiles `text` as a score_mod, followed by `entry` (C++ defining the extern "C" function
// `name`, which may use `m`, a FlexModArgs without buffers or params), and returns `name`.
void* compile_with_entry(const std::string& text, const std::string& entry, const std::string& name) {
  ModSet mods;
  mods.score_mod = ir::cast(parse_expr(text, ParseScope{}), ir::Type::Float);
  std::string src = "typedef long long fj_i64;\n"
                    "struct FlexBuffer { const void* data; fj_i64 sizes[4]; fj_i64 strides[4]; };\n"
                    "struct FlexModArgs { const struct FlexBuffer* buffers; const float* params; int* error_flag; };\n" +
                    jit::emit_mod_body(mods) +
                    "static int flag;\nstatic struct FlexModArgs m = {0, 0, &flag};\n" + entry;
  jit::CompileResult r = jit::compile_cpp_to_object(src, name + ".cpp");
  return jit::load_object(r.object, name);
}

// Compiles `text` as a score_mod and returns a scalar entry point score -> score_mod(score).
ScoreFn compile_score_mod(const std::string& text) {
  return reinterpret_cast<ScoreFn>(compile_with_entry(
      text, "extern \"C\" float mod_math_entry(float s) { return flexjit_score_mod(s, 0, 0, 0, 0, &m); }\n",
      "mod_math_entry"));
}

std::vector<float> sweep(float lo, float hi, int n) {
  std::vector<float> xs;
  for (int i = 0; i <= n; ++i) xs.push_back(lo + (hi - lo) * float(i) / float(n));
  for (float x : {0.0f, -0.0f, 1e-8f, -1e-8f, 1e-30f, 0.624f, 0.626f, -0.625f})
    xs.push_back(x);
  return xs;
}

// Relative error bound of about 4 ulp, with an absolute floor near denormals.
void expect_close(ScoreFn f, double (*ref)(double), const std::vector<float>& xs, const char* what) {
  for (float x : xs) {
    double want = ref(double(x));
    float got = f(x);
    if (std::isinf(want) || std::isnan(want)) {
      EXPECT_EQ(std::isinf(got), std::isinf(want)) << what << "(" << x << ")";
      continue;
    }
    double tol = 4.8e-7 * std::fabs(want) + 1e-37;
    EXPECT_NEAR(double(got), want, tol) << what << "(" << x << ")";
  }
}

TEST(ModMath, ExpMatchesLibm) {
  ScoreFn f = compile_score_mod("exp(score)");
  expect_close(f, [](double x) { return std::exp(x); }, sweep(-87.0f, 88.0f, 20000), "exp");
  EXPECT_EQ(f(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_TRUE(std::isinf(f(std::numeric_limits<float>::infinity())));
  EXPECT_TRUE(std::isinf(f(89.0f)));
  EXPECT_EQ(f(-104.0f), 0.0f);
  EXPECT_TRUE(std::isnan(f(std::numeric_limits<float>::quiet_NaN())));
}

TEST(ModMath, Exp2MatchesLibm) {
  ScoreFn f = compile_score_mod("exp2(score)");
  expect_close(f, [](double x) { return std::exp2(x); }, sweep(-125.0f, 127.0f, 20000), "exp2");
  EXPECT_EQ(f(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_TRUE(std::isinf(f(128.0f)));
}

TEST(ModMath, TanhMatchesLibm) {
  ScoreFn f = compile_score_mod("tanh(score)");
  expect_close(f, [](double x) { return std::tanh(x); }, sweep(-20.0f, 20.0f, 40000), "tanh");
  EXPECT_EQ(f(std::numeric_limits<float>::infinity()), 1.0f);
  EXPECT_EQ(f(-std::numeric_limits<float>::infinity()), -1.0f);
  EXPECT_EQ(f(100.0f), 1.0f);
  EXPECT_TRUE(std::isnan(f(std::numeric_limits<float>::quiet_NaN())));
  // Where the rational form's fp32 error peaks (just below |x| = 9), where it hands over to +-1
  // (9), and near 0 (relative error of tiny results).
  expect_close(f, [](double x) { return std::tanh(x); }, sweep(8.0f, 10.0f, 40000), "tanh near 9");
  expect_close(f, [](double x) { return std::tanh(x); }, sweep(-10.0f, -8.0f, 40000), "tanh near -9");
  expect_close(f, [](double x) { return std::tanh(x); }, sweep(-1e-3f, 1e-3f, 20000), "tanh near 0");
  EXPECT_EQ(f(9.0f), 1.0f);
  EXPECT_EQ(f(-9.0f), -1.0f);
  EXPECT_TRUE(std::signbit(f(-0.0f)));
}

TEST(ModMath, SoftcapAndSigmoid) {
  ScoreFn cap = compile_score_mod("30.0 * tanh(score / 30.0)");
  expect_close(cap, [](double x) { return 30.0 * std::tanh(x / 30.0); }, sweep(-500.0f, 500.0f, 20000),
               "softcap");
  EXPECT_EQ(cap(-std::numeric_limits<float>::infinity()), -30.0f);
  ScoreFn sig = compile_score_mod("sigmoid(score)");
  expect_close(sig, [](double x) { return 1.0 / (1.0 + std::exp(-x)); }, sweep(-80.0f, 80.0f, 20000), "sigmoid");
}

// Positive arguments spread over every binade, subnormals included, plus the range near 1
// where ln x is small and relative error is hardest to keep.
std::vector<float> log_args() {
  std::vector<float> xs;
  for (int e = -149; e <= 127; ++e)
    for (float m : {1.0f, 1.0001f, 1.25f, 1.4142135f, 1.5f, 1.75f, 1.9999f})
      xs.push_back(std::ldexp(m, e));
  for (int i = 1; i <= 20000; ++i) xs.push_back(0.5f + 1.5f * float(i) / 20000.0f);
  for (int i = 1; i <= 2000; ++i) xs.push_back(float(i));  // integer distances (T5 buckets)
  xs.push_back(std::numeric_limits<float>::max());
  xs.push_back(std::numeric_limits<float>::denorm_min());
  return xs;
}

// log is compared with an absolute floor scaled to ln 2 (near x = 1 the result tends to 0 and a
// relative bound would demand more than any float log gives); everywhere else ~4 ulp relative.
void expect_log_close(ScoreFn f, double (*ref)(double), const std::vector<float>& xs, double unit,
                      const char* what) {
  for (float x : xs) {
    double want = ref(double(x));
    double tol = 4.8e-7 * std::fabs(want) + 6e-8 * unit;
    EXPECT_NEAR(double(f(x)), want, tol) << what << "(" << x << ")";
  }
}

void expect_log_specials(ScoreFn f, const char* what) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f(0.0f), -inf) << what;
  EXPECT_EQ(f(-0.0f), -inf) << what;
  EXPECT_EQ(f(inf), inf) << what;
  EXPECT_TRUE(std::isnan(f(-1.0f))) << what;
  EXPECT_TRUE(std::isnan(f(-inf))) << what;
  EXPECT_TRUE(std::isnan(f(std::numeric_limits<float>::quiet_NaN()))) << what;
  EXPECT_EQ(f(1.0f), 0.0f) << what;
}

TEST(ModMath, LogMatchesLibm) {
  ScoreFn f = compile_score_mod("log(score)");
  expect_log_close(f, [](double x) { return std::log(x); }, log_args(), std::log(2.0), "log");
  expect_log_specials(f, "log");
}

TEST(ModMath, Log2MatchesLibmAndIsExactOnPowersOfTwo) {
  ScoreFn f = compile_score_mod("log2(score)");
  expect_log_close(f, [](double x) { return std::log2(x); }, log_args(), 1.0, "log2");
  expect_log_specials(f, "log2");
  for (int e = -149; e <= 127; ++e) EXPECT_EQ(f(std::ldexp(1.0f, e)), float(e)) << "log2(2^" << e << ")";
}

// float -> int64 (`int(x)`): truncation toward zero, INT64_MIN for |x| >= 2^63, inf and NaN (as
// x86 and the reference evaluator do), exactly, in the vectorised loop a mod runs in (below
// AVX-512DQ the conversion is spelled in integer arithmetic: jit/codegen.cpp fj_f2i).
TEST(ModMath, FloatToInt64IsExactInVectorLoops) {
  // Clamped to +-2^24 (exact in float): below that the value itself is checked; above, its sign;
  // INT64_MIN (out of range, inf, NaN) reads -2^24 where a saturating conversion would give +2^24.
  // (A loop LLVM vectorises: no int64 division, whose absence keeps x86 loops scalar.)
  auto f = reinterpret_cast<void (*)(const float*, float*, int)>(compile_with_entry(
      "float(max(min(int(score), 16777216), -16777216))",
      "extern \"C\" void f2i_entry(const float* __restrict x, float* __restrict y, int n) {\n"
      "  for (int i = 0; i < n; ++i) y[i] = flexjit_score_mod(x[i], 0, 0, 0, 0, &m);\n}\n",
      "f2i_entry"));
  std::vector<float> xs = {0.0f, -0.0f, 0.5f, -0.5f, 0.99999994f, -0.99999994f, 1.0f, -1.0f, 1e-45f, -1e-45f,
                           1e-38f, 8388607.5f, -8388607.5f, 16777216.0f, 9.2233715e18f, -9.2233715e18f,
                           9.2233720e18f, -9.2233720e18f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (int e = -30; e <= 70; ++e)
    for (int k = 0; k < 16; ++k)
      for (float sign : {1.0f, -1.0f}) xs.push_back(sign * std::ldexp(1.0f + float(k) / 16.0f + 1e-7f * float(k), e));
  while (xs.size() % 16) xs.push_back(3.75f);  // whole vectors, and a scalar tail checked too
  xs.push_back(-7.25f);
  std::vector<float> got(xs.size());
  f(xs.data(), got.data(), int(xs.size()));
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    const int64_t want_i = (x > -9.2233720368547758e18f && x < 9.2233720368547758e18f) ? int64_t(x) : INT64_MIN;
    const float want = float(std::max<int64_t>(std::min<int64_t>(want_i, 16777216), -16777216));
    EXPECT_EQ(got[i], want) << "int(" << x << ")";
  }
}

// Int / and % of an int32 dividend by a divisor codegen cannot bound go through doubles on CPU
// (fj_idiv_a32 / fj_imod_a32: an int64 division per lane, scalarised in a vector loop, was 10x
// slower). They must give C's truncating quotient and remainder exactly, 0 (and the error flag)
// for a divisor of 0, and -a / 0 for -1, in a vector loop and its scalar tail.
TEST(ModMath, Int32DividendDivisionThroughDoublesIsExact) {
  using Fn = void (*)(const float*, const long long*, const long long*, float*, int);
  const std::string entry =
      "extern \"C\" void NAME(const float* __restrict s, const long long* __restrict q, "
      "const long long* __restrict kv, float* __restrict y, int n) {\n"
      "  for (int i = 0; i < n; ++i) y[i] = flexjit_score_mod(s[i], 0, 0, q[i], kv[i], &m);\n}\n";
  auto build = [&](const std::string& text, const std::string& name) {
    ModSet mods;
    mods.score_mod = ir::cast(parse_expr(text, ParseScope{}), ir::Type::Float);
    EXPECT_NE(jit::emit_mod_body(mods).find(name == "div_entry" ? "fj_idiv_a32(" : "fj_imod_a32("), std::string::npos)
        << text;
    std::string e = entry;
    e.replace(e.find("NAME"), 4, name);
    return reinterpret_cast<Fn>(compile_with_entry(text, e, name));
  };
  Fn div = build("float((q_idx - kv_idx) / int(score))", "div_entry");
  Fn mod = build("float((q_idx - kv_idx) % int(score))", "mod_entry");
  const long long big = 2147483647LL;
  const std::vector<long long> idx = {0, 1, 2, 5, 7, 1000, 65536, 123456789, big / 2, big - 2, big - 1, big};
  const std::vector<float> divisors = {0.0f, 1.0f, -1.0f, 2.0f, -2.0f, 3.0f, 7.0f, -7.0f, 255.0f, 256.0f, 1000.0f,
                                       -1000.0f, 65537.0f, 1048576.0f, 16777216.0f, 2147483648.0f, -2147483648.0f,
                                       1099511627776.0f, -1099511627776.0f, 4.6116860e18f, 1e19f,
                                       -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  std::vector<float> s;
  std::vector<long long> q, kv;
  for (long long a : idx)
    for (long long c : idx)
      for (float d : divisors) {
        if (a > big - 1 || c > big - 1) continue;  // the index contract: q_idx, kv_idx < 2^31 - 1
        s.push_back(d);
        q.push_back(a);
        kv.push_back(c);
      }
  std::vector<float> got_div(s.size()), got_mod(s.size());
  div(s.data(), q.data(), kv.data(), got_div.data(), int(s.size()));
  mod(s.data(), q.data(), kv.data(), got_mod.data(), int(s.size()));
  for (size_t i = 0; i < s.size(); ++i) {
    const long long a = q[i] - kv[i];
    const float x = s[i];
    const long long b = (x > -9.2233720368547758e18f && x < 9.2233720368547758e18f) ? (long long)x : INT64_MIN;
    const long long want_div = b == 0 ? 0 : b == -1 ? -a : a / b;
    const long long want_mod = b == 0 || b == -1 ? 0 : a % b;
    EXPECT_EQ(got_div[i], float(want_div)) << a << " / " << b;
    EXPECT_EQ(got_mod[i], float(want_mod)) << a << " % " << b;
  }
}

}  // namespace
}  // namespace flexjit

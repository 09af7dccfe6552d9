#include "jit/codegen.h"

#include "jit/grad.h"
#include "jit/interval.h"

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <sstream>

namespace flexjit::jit {
namespace {

using ir::Expr;
using ir::Op;
using ir::Type;

// Helpers every mod body may use. Integer arithmetic goes through unsigned math (signed
// overflow is UB in C++ and the optimiser exploits it); division by zero and INT64_MIN / -1
// would trap (SIGFPE) and take the user's process down, so they set the error flag and give 0;
// float -> int of an out-of-range value is UB, so it is clamped to INT64_MIN like x86 does.
// Errors are recorded branch-free (`*error_flag |= bad`, a safe value selected instead) so a
// mod applied across a row of scores still vectorises: the kernels hand the mods a per-tile
// copy of FlexModArgs whose error_flag is a local, and raise the shared flag once per tile.
constexpr const char* kPortableHelpers = R"(
FJ_FN fj_i64 fj_iadd(fj_i64 a, fj_i64 b) { return (fj_i64)((unsigned long long)a + (unsigned long long)b); }
FJ_FN fj_i64 fj_isub(fj_i64 a, fj_i64 b) { return (fj_i64)((unsigned long long)a - (unsigned long long)b); }
FJ_FN fj_i64 fj_imul(fj_i64 a, fj_i64 b) { return (fj_i64)((unsigned long long)a * (unsigned long long)b); }
FJ_FN fj_i64 fj_ineg(fj_i64 a) { return (fj_i64)(0ull - (unsigned long long)a); }
FJ_FN fj_i64 fj_iabs(fj_i64 a) { return a < 0 ? fj_ineg(a) : a; }
FJ_FN fj_i64 fj_imin(fj_i64 a, fj_i64 b) { return b < a ? b : a; }
FJ_FN fj_i64 fj_imax(fj_i64 a, fj_i64 b) { return a < b ? b : a; }
FJ_FN float fj_fmin(float a, float b) { return b < a ? b : a; }
FJ_FN float fj_fmax(float a, float b) { return a < b ? b : a; }
FJ_FN fj_i64 fj_idiv(fj_i64 a, fj_i64 b, const struct FlexModArgs* m) {
  fj_flag_if(b == 0, m);
  const fj_i64 d = b == 0 || b == -1 ? 1 : b;
  return b == 0 ? 0 : b == -1 ? fj_ineg(a) : a / d;
}
FJ_FN fj_i64 fj_imod(fj_i64 a, fj_i64 b, const struct FlexModArgs* m) {
  fj_flag_if(b == 0, m);
  const fj_i64 d = b == 0 || b == -1 ? 1 : b;
  return b == 0 || b == -1 ? 0 : a % d;
}
FJ_FN int fj_f2i32(float x, float lo, float hi) { return (int)(x > lo ? (x < hi ? x : hi) : lo); }
FJ_FN int fj_iabs32(int a) { return a < 0 ? -a : a; }
FJ_FN int fj_imin32(int a, int b) { return b < a ? b : a; }
FJ_FN int fj_imax32(int a, int b) { return a < b ? b : a; }
)";

// What each backend defines before the portable helpers: FJ_FN, the error flag, bit casts and
// float -> int64 (fj_f2i: out of range gives INT64_MIN).
// CPU: the flag is a per-tile local, so `|=` keeps the loop branch-free. CUDA: the flag is
// shared by many threads, and a read-modify-write that stores 0 could erase another thread's 1,
// so only a bad index stores (always 1).
constexpr const char* kCpuPrelude = R"(
#define FJ_FN static inline
static inline void fj_flag_if(bool bad, const struct FlexModArgs* m) { *m->error_flag |= bad ? 1 : 0; }
static inline float fj_bf16_to_f32(unsigned short x) { return __builtin_bit_cast(float, (unsigned)x << 16); }
#if defined(__x86_64__) && !defined(__AVX512DQ__)
// Below AVX-512DQ x86 has no vector float -> int64 convert (LLVM scalarises one per lane), so the
// conversion is spelled in integer arithmetic that vectorises (variable 64-bit shifts are AVX2):
// x = m 2^e with m the 24-bit significand; |x| >= 2^63, inf and NaN (e > 39) give INT64_MIN.
FJ_FN fj_i64 fj_f2i(float x) {
  const unsigned u = __builtin_bit_cast(unsigned, x);
  const int e = (int)((u >> 23) & 255u) - 150;
  const fj_i64 m = (fj_i64)((u & 0x7fffffu) | 0x800000u);
  const fj_i64 mag = e >= 0 ? m << (e < 63 ? e : 63) : m >> (-e < 63 ? -e : 63);
  return e > 39 ? (fj_i64)(1ull << 63) : ((int)u < 0 ? -mag : mag);
}
#else
FJ_FN fj_i64 fj_f2i(float x) {
  return (x > -9.2233720368547758e18f && x < 9.2233720368547758e18f) ? (fj_i64)x : (fj_i64)(1ull << 63);
}
#endif
// Int / and % of a dividend codegen proved to lie in (-2^31, 2^31) by a divisor it could not bound
// (an int64 division per lane, scalarised inside a vector loop, runs ~10x slower than vdivpd):
// through doubles. The quotient of |a| < 2^53 rounds by less than its distance to the next
// integer, so truncation gives exactly C's quotient; |q| <= |a| and |q b| <= |a| fit int32 and a
// double. A divisor of 0 flags and gives 0, as fj_idiv / fj_imod do; -1 needs no special case.
FJ_FN fj_i64 fj_idiv_a32(int a, fj_i64 b, const struct FlexModArgs* m) {
  fj_flag_if(b == 0, m);
  const double q = (double)a / (double)(b == 0 ? 1 : b);
  return b == 0 ? 0 : (fj_i64)(int)q;
}
FJ_FN fj_i64 fj_imod_a32(int a, fj_i64 b, const struct FlexModArgs* m) {
  fj_flag_if(b == 0, m);
  const double d = (double)(b == 0 ? 1 : b);
  const double q = (double)(int)((double)a / d);
  return b == 0 ? 0 : (fj_i64)(int)((double)a - q * d);
}
)";
constexpr const char* kCudaPrelude = R"(
#define FJ_FN static __device__ __forceinline__
FJ_FN void fj_flag_if(bool bad, const struct FlexModArgs* m) { if (bad) *m->error_flag = 1; }
FJ_FN float fj_bf16_to_f32(unsigned short x) { return __uint_as_float((unsigned)x << 16); }
FJ_FN fj_i64 fj_f2i(float x) {
  return (x > -9.2233720368547758e18f && x < 9.2233720368547758e18f) ? (fj_i64)x : (fj_i64)(1ull << 63);
}
#ifdef FLEXJIT_CUDA_EMULATION
FJ_FN float fj_f16_to_f32(unsigned short x) { return fjemu_f16_to_f32(x); }
#else
FJ_FN float fj_f16_to_f32(unsigned short x) {
  float f;
  asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x));
  return f;
}
#endif
)";
// CUDA's math: CUDA's own accurate functions (expf, logf, tanhf ~1-2 ulp; not the __expf-style
// intrinsics, whose error grows with the argument).
constexpr const char* kCudaMath = R"(
FJ_FN float fj_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
)";

// CPU-only: the vectorisable math below.
constexpr const char* kCpuHelpers =
// exp, exp2, tanh and sigmoid are inline and branch-free so a mod applied across a row of
// scores vectorises; libm's expf/tanhf are scalar calls (a softcap mod ran ~6x slower with
// them). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial
// for e^r (~1 ulp); 2^n is applied as two factors so n in [-150, 128] never overflows the
// exponent field. inf, -inf and NaN come out as libm gives them.
R"(
// e^r for |r| <= ln2/2.
static inline float fj_exp_poly(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}
// Cody-Waite: x = n ln2 + r; returns r, n in *n.
static inline float fj_exp_reduce(float x, float* n) {
  *n = __builtin_rintf(x * 1.44269504088896341f);
  const float r = x - *n * 0.693359375f;
  return r - *n * -2.12194440e-4f;
}
static inline float fj_exp_core(float r, float n) {
  int ni = (int)n, n1 = ni >> 1, n2 = ni - n1;
  return fj_exp_poly(r) * __builtin_bit_cast(float, (n1 + 127) << 23) * __builtin_bit_cast(float, (n2 + 127) << 23);
}
static inline float fj_expf(float x) {
  float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  float n;
  const float r = fj_exp_reduce(xc, &n);
  float y = fj_exp_core(r, n);
  y = x > 88.72283905f ? __builtin_inff() : y;
  y = x < -103.972077f ? 0.0f : y;
  return x != x ? x : y;
}
static inline float fj_exp2f(float x) {
  float xc = x < -150.0f ? -150.0f : (x > 128.0f ? 128.0f : x);
  float n = __builtin_rintf(xc);
  float y = fj_exp_core((xc - n) * 0.693147180559945309f, n);
  y = x >= 128.0f ? __builtin_inff() : y;
  y = x < -149.0f ? 0.0f : y;
  return x != x ? x : y;
}
// tanh: x P(x^2) / Q(x^2) on |x| < 9, degrees 6 and 3 in x^2, fitted for minimax relative error
// (6.6e-9 in exact arithmetic; <= 2.7e-7, ~4.6 ulp, as evaluated in fp32, worst between 8 and 9;
// tools/fit_tanh_rational.py reproduces both), and +-1 from |x| = 9 on (tanh(9) is 1 - 3e-8). One
// division and ten FMAs, no exp: a softcap mod's tanh costs about half what the exp form's did
// (Cephes' polynomial near 0 and 1 - 2 / (e^2|x| + 1) above, both evaluated per score). NaN is
// passed through.
static inline float fj_tanhf(float x) {
  const float a = __builtin_fabsf(x);
  const float xc = a < 9.0f ? x : 0.0f;  // keeps the polynomials finite for inf and NaN
  const float t = xc * xc;
  float p = -8.488682982e-14f;
  p = p * t + 5.277936421e-11f;
  p = p * t - 2.022519929e-08f;
  p = p * t + 1.115430132e-05f;
  p = p * t + 3.103955416e-03f;
  p = p * t + 1.308400929e-01f;
  p = p * t + 1.0f;
  float q = 2.546144242e-04f;
  q = q * t + 2.449517511e-02f;
  q = q * t + 4.641733766e-01f;
  q = q * t + 1.0f;
  const float y = xc * p / q;
  const float one = x < 0 ? -1.0f : 1.0f;
  return x != x ? x : (a < 9.0f ? y : one);
}
static inline float fj_sigmoidf(float x) { return 1.0f / (1.0f + fj_expf(-x)); }
)"
// log and log2, inline and branch-free for the same reason (libm's logf is a scalar call: a T5
// bucketed-bias mod ran ~4x slower with it). x = 2^e m with m in [sqrt(1/2), sqrt(2)), so
// ln x = e ln2 + ln(1 + f), f = m - 1, and ln(1 + f) = f - f^2/2 + f^3 P(f) with Cephes'
// degree-8 P (~1 ulp). Subnormals are scaled by 2^23 first. e ln2 is added in two parts
// (0.693359375 is exact in a few bits), and log2 adds e exactly, so powers of two come out
// exact. 0 gives -inf, negatives and NaN give NaN, inf gives inf, as libm does.
R"(
static inline float fj_log1p_core(float x, float* e_out) {
  const bool sub = x < 1.17549435e-38f;
  const float xs = sub ? x * 8388608.0f : x;
  const int bits = __builtin_bit_cast(int, xs);
  int e = ((bits >> 23) & 0xff) - 126;  // xs = 2^e m, m in [0.5, 1)
  const float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);
  const bool lo = m < 0.707106781186547524f;
  e = (lo ? e - 1 : e) - (sub ? 23 : 0);
  const float f = lo ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  *e_out = (float)e;
  return p * f * z - 0.5f * z + f;  // ln(1 + f)
}
static inline float fj_log_special(float x, float r) {
  r = x == __builtin_inff() ? x : r;
  r = x == 0.0f ? -__builtin_inff() : r;
  return (x < 0.0f || x != x) ? __builtin_nanf("") : r;
}
static inline float fj_logf(float x) {
  float e;
  const float l = fj_log1p_core(x, &e);
  return fj_log_special(x, (l + e * -2.12194440e-4f) + e * 0.693359375f);
}
static inline float fj_log2f(float x) {
  float e;
  const float l = fj_log1p_core(x, &e);
  return fj_log_special(x, l * 1.44269504088896341f + e);
}
)";

std::string float_literal(double v, Backend backend) {
  if (backend == Backend::Cuda) {  // no INFINITY / __builtin_inff under NVRTC's headers-free mode
    if (std::isnan(v)) return "__int_as_float(0x7fffffff)";
    if (std::isinf(v)) return v > 0 ? "__int_as_float(0x7f800000)" : "__int_as_float(0xff800000)";
  }
  if (std::isnan(v)) return "__builtin_nanf(\"\")";
  if (std::isinf(v)) return v > 0 ? "__builtin_inff()" : "(-__builtin_inff())";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  std::string s = buf;
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  s += "f";
  return std::signbit(v) ? "(" + s + ")" : s;  // -0.0 too, or negating it emits "--0.0f"
}

// The one visitor; where the backends spell an operation differently, `cuda_` picks.
class Emitter {
 public:
  Emitter(const ModSet& mods, Backend backend) : mods_(mods), cuda_(backend == Backend::Cuda) {}

  // From now on `e` (the node itself, by address) is spelled as the local `name` holding its
  // value: an int32 one when `int32`, else the node's own type (jit/codegen.cpp DiagPlan).
  void substitute(const ir::Node* e, const std::string& name, bool int32) { subs_[e] = {name, int32}; }
  // Whether this int expression is computed in int32 (so a table of it can hold int).
  bool int32_valued(const Expr& e) { return all_int32(e); }

  std::string emit(const Expr& e) {
    if (auto it = subs_.find(e.get()); it != subs_.end())
      return it->second.second ? "((fj_i64)" + it->second.first + ")" : it->second.first;
    // An int computation that provably stays in int32 is done in int32 (see all_int32).
    if (e->type == Type::Int && !is_leaf(e->op) && all_int32(e)) return "((fj_i64)" + emit32(e) + ")";
    switch (e->op) {
      case Op::ConstFloat: return float_literal(e->fval, cuda_ ? Backend::Cuda : Backend::Cpu);
      case Op::ConstInt: return e->ival < 0 ? "(" + std::to_string(e->ival) + "LL)" : std::to_string(e->ival) + "LL";
      case Op::ConstBool: return e->ival ? "true" : "false";
      case Op::Variable: return ir::var_name(e->var);
      case Op::Param: return "fj_mod->params[" + std::to_string(slot_of_param(e->name)) + "]";
      case Op::Load: {
        // Indices all computed in int32 go to the reader with an int32 bounds check.
        bool index32 = true;
        for (const auto& i : e->args) index32 = index32 && all_int32(i);
        std::string s = "fj_buf" + std::to_string(slot_of_buffer(e->name)) + (index32 ? "_32(" : "(");
        for (const auto& i : e->args) s += (index32 ? emit32(i) : emit(i)) + ", ";
        return s + "fj_mod)";
      }
      case Op::Select: {
        // C's ?: evaluates only the branch taken, so each branch may use what its side of the
        // condition implies (a narrower int range); the vectorised select computes both but
        // keeps only the taken lane (poison in the other is harmless).
        const std::string c = emit(e->args[0]);
        const std::string t = in_branch(e->args[0], true, [&] { return emit(e->args[1]); });
        const std::string f = in_branch(e->args[0], false, [&] { return emit(e->args[2]); });
        return "(" + c + " ? " + t + " : " + f + ")";
      }
      default: break;
    }
    if (ir::is_unary(e->op)) return emit_unary(e);
    return emit_binary(e);
  }

 private:
  std::string emit_unary(const Expr& e) {
    const Expr& a = e->args[0];
    std::string x = emit(a);
    bool is_int = e->type == Type::Int;
    switch (e->op) {
      case Op::Neg: return is_int ? "fj_ineg(" + x + ")" : "(-" + x + ")";
      case Op::Not: return "(!" + x + ")";
      case Op::Abs: return is_int ? "fj_iabs(" + x + ")" : fn("__builtin_fabsf", "fabsf", x);
      case Op::Exp: return fn("fj_expf", "expf", x);
      case Op::Exp2: return fn("fj_exp2f", "exp2f", x);
      case Op::Log: return fn("fj_logf", "logf", x);
      case Op::Log2: return fn("fj_log2f", "log2f", x);
      case Op::Tanh: return fn("fj_tanhf", "tanhf", x);
      case Op::Sin: return fn("__builtin_sinf", "sinf", x);
      case Op::Cos: return fn("__builtin_cosf", "cosf", x);
      case Op::Tan: return fn("__builtin_tanf", "tanf", x);
      case Op::Sqrt: return fn("__builtin_sqrtf", "sqrtf", x);
      case Op::Rsqrt: return cuda_ ? "rsqrtf(" + x + ")" : "(1.0f / __builtin_sqrtf(" + x + "))";
      case Op::Sigmoid: return "fj_sigmoidf(" + x + ")";
      case Op::Floor: return fn("__builtin_floorf", "floorf", x);
      case Op::Ceil: return fn("__builtin_ceilf", "ceilf", x);
      // An int64 -> float conversion has no vector instruction below AVX-512DQ (LLVM emits one
      // scalar convert per lane on AVX2, ~20% of an ALiBi kernel there); a value that provably
      // fits int32 converts through int32 instead, which every vector ISA (and CUDA) has. The
      // result is the same: the integer is the same.
      case Op::ToFloat:
        if (a->type == Type::Int && all_int32(a)) return "((float)" + emit32(a) + ")";
        return a->type == Type::Int && fits_int32(a) ? "((float)(int)" + x + ")" : "((float)" + x + ")";
      case Op::ToInt: return a->type == Type::Float ? "fj_f2i(" + x + ")" : "((fj_i64)" + x + ")";
      case Op::ToBool: return "(" + x + " != 0)";
      default: break;
    }
    internal_error(__FILE__, __LINE__, std::string("codegen: unary op ") + ir::op_name(e->op));
  }

  std::string fn(const char* cpu, const char* cuda, const std::string& x) const {
    return std::string(cuda_ ? cuda : cpu) + "(" + x + ")";
  }

  std::string emit_binary(const Expr& e) {
    if (is_comparison(e->op) && e->args[0]->type == Type::Int && e->args[1]->type == Type::Int &&
        all_int32(e->args[0]) && all_int32(e->args[1]))
      return "(" + emit32(e->args[0]) + " " + ir::op_name(e->op) + " " + emit32(e->args[1]) + ")";
    if ((e->op == Op::Div || e->op == Op::Mod) && dividend_a32(e->args[0]))
      return std::string(e->op == Op::Div ? "fj_idiv_a32(" : "fj_imod_a32(") + emit32(e->args[0]) + ", " +
             emit(e->args[1]) + ", fj_mod)";
    std::string x = emit(e->args[0]), y = emit(e->args[1]);
    bool int_operands = e->args[0]->type != Type::Float;
    auto call = [&](const char* f) { return std::string(f) + "(" + x + ", " + y + ")"; };
    switch (e->op) {
      case Op::Add: return int_operands ? call("fj_iadd") : "(" + x + " + " + y + ")";
      case Op::Sub: return int_operands ? call("fj_isub") : "(" + x + " - " + y + ")";
      case Op::Mul: return int_operands ? call("fj_imul") : "(" + x + " * " + y + ")";
      case Op::Div: return int_operands ? "fj_idiv(" + x + ", " + y + ", fj_mod)" : "(" + x + " / " + y + ")";
      case Op::Mod: return "fj_imod(" + x + ", " + y + ", fj_mod)";
      case Op::Min: return call(int_operands ? "fj_imin" : "fj_fmin");
      case Op::Max: return call(int_operands ? "fj_imax" : "fj_fmax");
      default: break;
    }
    return "(" + x + " " + ir::op_name(e->op) + " " + y + ")";
  }

  // CPU: an int dividend computed in int32 and above INT32_MIN (so neither |a| nor a / -1 leaves
  // int32) is divided through doubles (fj_idiv_a32). CUDA keeps int64 division.
  bool dividend_a32(const Expr& a) {
    return !cuda_ && a->type == Type::Int && all_int32(a) && range().eval(a).lo > -2147483648.0;
  }

  int slot_of_buffer(const std::string& n) {
    int s = mods_.buffer_slot(n);
    FLEXJIT_CHECK(s >= 0, "validated ModSet declares every buffer it reads");
    return s;
  }
  int slot_of_param(const std::string& n) {
    int s = mods_.param_slot(n);
    FLEXJIT_CHECK(s >= 0, "validated ModSet declares every param it reads");
    return s;
  }

  // Whether an int expression's value lies in int32 for every call, from interval arithmetic
  // over the mods' index contract (b, h, q_idx, kv_idx in [0, 2^31): runtime/bound_mods.h
  // check_mod_index_range) and each int buffer's dtype range.
  bool fits_int32(const Expr& e) {
    const ir::Interval r = range().eval(e);
    return r.lo >= -2147483648.0 && r.hi <= 2147483647.0 && no_int64_overflow(e);
  }
  // Interval arithmetic is over the reals; the int ops wrap at 2^63. A subtree whose int nodes all
  // stay inside int64 computes what the intervals say (else e.g. min(q_idx * huge, 5) could wrap
  // to a large negative value while its interval reads [0, 5]).
  bool no_int64_overflow(const Expr& e) {
    if (e->type == Type::Int) {
      const ir::Interval r = range().eval(e);
      if (!(r.lo > -9.2e18 && r.hi < 9.2e18)) return false;
    }
    for (const auto& a : e->args)
      if (!no_int64_overflow(a)) return false;
    return true;
  }

  // The value ranges codegen reasons with: the mods' index contract (b, h, q_idx, kv_idx in
  // [0, 2^31): runtime/bound_mods.h check_mod_index_range), each int32 buffer's dtype range, and
  // inside a where() what its condition implies.
  ir::IntervalEvaluator& range() {
    if (!range_) {
      range_ = std::make_unique<ir::IntervalEvaluator>(std::vector<std::pair<std::string, double>>{},
                                                       std::vector<ir::BoundBuffer>{});
      for (ir::Var v : {ir::Var::B, ir::Var::H, ir::Var::QIdx, ir::Var::KvIdx}) range_->set_range(v, 0, kModIndexLimit - 1);
      for (const auto& d : mods_.buffers)
        if (d.dtype == DType::I32) range_->set_load_range(d.name, {-2147483648.0, 2147483647.0});
      range_->set_refine_selects(true);
    }
    return *range_;
  }

  template <class F>
  std::string in_branch(const Expr& cond, bool taken, F&& emit_branch) {
    const size_t mark = range().refinement_mark();
    range().push_refinement(cond, taken);
    std::string s = emit_branch();
    range().pop_refinement(mark);
    return s;
  }

  static bool is_leaf(Op op) {
    return op == Op::ConstFloat || op == Op::ConstInt || op == Op::ConstBool || op == Op::Variable || op == Op::Param ||
           op == Op::Load;
  }
  static bool is_comparison(Op op) {
    return op == Op::Lt || op == Op::Le || op == Op::Gt || op == Op::Ge || op == Op::Eq || op == Op::Ne;
  }

  // ---- int32 narrowing ----
  // Mods compute indices in int64 (the IR's int), which vector units handle badly below AVX-512
  // (no 64-bit multiply, min/max or float conversion on AVX2: LLVM scalarises them) and GPUs run
  // at a fraction of int32's rate. An int subtree is computed in int32 instead when every int
  // node in it provably lies in int32, so no int32 operation can overflow and each gives the
  // value int64 would: interval arithmetic over range() (a where()'s branches under its
  // condition); a float -> int conversion only of a finite value well inside int32 (out of range
  // fj_f2i gives INT64_MIN, which int32 cannot), clamped to its proved range (fj_f2i32); / and
  // % only by a divisor >= 1 (fj_idiv and
  // fj_imod's checks are then moot and C's / and % agree with them). Trees past kNarrowMaxNodes
  // skip the analysis (it costs O(nodes^2)).
  static constexpr int kNarrowMaxNodes = 400;
  static bool in_int32(ir::Interval r) { return r.lo >= -2147483648.0 && r.hi <= 2147483647.0; }

  bool all_int32(const Expr& e) {
    if (e->type != Type::Int) return false;
    const auto key = std::make_pair(e.get(), range().refinement_id());
    auto it = int32_memo_.find(key);
    if (it != int32_memo_.end()) return it->second.second;
    const bool ok = count_nodes(e, kNarrowMaxNodes + 1) <= kNarrowMaxNodes && all_int32_uncached(e);
    int32_memo_.emplace(key, std::make_pair(e, ok));  // holds e: its address stays its own
    return ok;
  }
  bool all_int32_uncached(const Expr& e) {
    if (!in_int32(range().eval(e))) return false;
    const auto& a = e->args;
    switch (e->op) {
      case Op::ConstInt: case Op::Variable: case Op::Load: return true;
      case Op::Neg: case Op::Abs: return all_int32(a[0]);
      case Op::Add: case Op::Sub: case Op::Mul: case Op::Min: case Op::Max: return all_int32(a[0]) && all_int32(a[1]);
      case Op::Div: case Op::Mod: return range().eval(a[1]).lo >= 1 && all_int32(a[0]) && all_int32(a[1]);
      case Op::Select: {
        const size_t mark = range().refinement_mark();
        range().push_refinement(a[0], true);
        bool ok = all_int32(a[1]);
        range().pop_refinement(mark);
        if (!ok) return false;
        range().push_refinement(a[0], false);
        ok = all_int32(a[2]);
        range().pop_refinement(mark);
        return ok;
      }
      case Op::ToInt: {
        if (a[0]->type == Type::Bool) return true;
        if (a[0]->type == Type::Int) return all_int32(a[0]);
        const ir::Interval r = range().eval(a[0]);
        return std::isfinite(r.lo) && std::isfinite(r.hi) && r.lo > -1073741824.0 && r.hi < 1073741824.0;
      }
      default: return false;
    }
  }

  // The C `int` expression of an int subtree all_int32 accepted.
  std::string emit32(const Expr& e) {
    if (auto it = subs_.find(e.get()); it != subs_.end()) return "((int)" + it->second.first + ")";
    const auto& a = e->args;
    auto call = [&](const char* f) { return std::string(f) + "(" + emit32(a[0]) + ", " + emit32(a[1]) + ")"; };
    switch (e->op) {
      case Op::ConstInt: return e->ival < 0 ? "((int)(" + std::to_string(e->ival) + "LL))" : std::to_string(e->ival);
      case Op::Variable: return "((int)" + std::string(ir::var_name(e->var)) + ")";
      case Op::Load: return "((int)" + emit(e) + ")";
      case Op::Neg: return "(-" + emit32(a[0]) + ")";
      case Op::Abs: return "fj_iabs32(" + emit32(a[0]) + ")";
      case Op::Add: return "(" + emit32(a[0]) + " + " + emit32(a[1]) + ")";
      case Op::Sub: return "(" + emit32(a[0]) + " - " + emit32(a[1]) + ")";
      case Op::Mul: return "(" + emit32(a[0]) + " * " + emit32(a[1]) + ")";
      case Op::Div: return "(" + emit32(a[0]) + " / " + emit32(a[1]) + ")";
      case Op::Mod: return "(" + emit32(a[0]) + " % " + emit32(a[1]) + ")";
      case Op::Min: return call("fj_imin32");
      case Op::Max: return call("fj_imax32");
      case Op::Select: {
        const std::string c = emit(a[0]);
        const std::string t = in_branch(a[0], true, [&] { return emit32(a[1]); });
        const std::string f = in_branch(a[0], false, [&] { return emit32(a[2]); });
        return "(" + c + " ? " + t + " : " + f + ")";
      }
      case Op::ToInt: {
        if (a[0]->type != Type::Float) return a[0]->type == Type::Int ? emit32(a[0]) : "((int)" + emit(a[0]) + ")";
        // Clamped to the range the analysis proved (with its fp32 rounding slack), as floats
        // inside it, so the int32 arithmetic downstream cannot overflow even if rounding in a
        // pathological float expression strays further; within the range it is plain truncation.
        const ir::Interval r = range().eval(e);
        float lo = float(r.lo), hi = float(r.hi);
        if (double(lo) < r.lo) lo = std::nextafter(lo, std::numeric_limits<float>::infinity());
        if (double(hi) > r.hi) hi = std::nextafter(hi, -std::numeric_limits<float>::infinity());
        return "fj_f2i32(" + emit(a[0]) + ", " + float_literal(lo, cuda_ ? Backend::Cuda : Backend::Cpu) + ", " +
               float_literal(hi, cuda_ ? Backend::Cuda : Backend::Cpu) + ")";
      }
      default: break;
    }
    internal_error(__FILE__, __LINE__, std::string("codegen: int32 op ") + ir::op_name(e->op));
  }

  static int count_nodes(const Expr& e, int limit) {
    int n = 1;
    for (const auto& x : e->args) {
      if (n > limit) break;
      n += count_nodes(x, limit - n);
    }
    return n;
  }

  const ModSet& mods_;
  std::map<const ir::Node*, std::pair<std::string, bool>> subs_;  // substitute()
  std::unique_ptr<ir::IntervalEvaluator> range_;
  std::map<std::pair<const ir::Node*, uint64_t>, std::pair<Expr, bool>> int32_memo_;  // (node, refinement_id())
  const bool cuda_;
};

// A bounds-checked reader for buffer slot `slot`: an index outside the tensor sets the error
// flag (the runtime turns it into an error naming the buffer) and reads index 0 of that dim
// instead (branch-free, see the helpers).
// The head of a function of buffer `slot`'s indices i0.. that computes `off`, with every index
// bounds-checked as above. strided: off is the element's offset at the tensor's strides, in int32
// (runtime::BoundMods admits only buffers whose sizes and extent sum((size - 1) * |stride|) are
// below 2^31, so a checked index and every partial sum fit); index32: the indices are ints (the
// caller computed them in int32) and so is the check. Else (!strided) its row-major offset in a
// dense array of the tensor's sizes (a gradient accumulator), in int64.
void emit_index_head(std::ostringstream& os, const char* ret, const std::string& name, int slot,
                     const ir::BufferDecl& d, bool strided, bool index32 = false) {
  os << "FJ_FN " << ret << " " << name << "(";
  for (int i = 0; i < d.rank; ++i) os << (index32 ? "int i" : "fj_i64 i") << i << ", ";
  os << "const struct FlexModArgs* fj_mod) {\n";
  os << "  const struct FlexBuffer* t = &fj_mod->buffers[" << slot << "];\n";
  os << (strided ? "  int off = 0;\n" : "  fj_i64 off = 0;\n");
  for (int i = 0; i < d.rank; ++i) {
    const std::string n = std::to_string(i);
    if (index32)
      os << "  const bool bad" << n << " = (unsigned)i" << n << " >= (unsigned)t->sizes[" << n << "];\n";
    else
      os << "  const bool bad" << n << " = (unsigned long long)i" << n << " >= (unsigned long long)t->sizes[" << n
         << "];\n";
    os << "  fj_flag_if(bad" << n << ", fj_mod);\n";
    if (strided) os << "  off += (bad" << n << " ? 0 : (int)i" << n << ") * (int)t->strides[" << n << "];\n";
    else os << "  off = off * t->sizes[" << n << "] + (bad" << n << " ? 0 : i" << n << ");\n";
  }
}

// fj_bufN takes int64 indices; fj_bufN_32 int indices (what int32-narrowed index math passes).
std::string emit_buffer_reader(int slot, const ir::BufferDecl& d, Backend backend, bool index32) {
  const bool cuda = backend == Backend::Cuda;
  std::ostringstream os;
  emit_index_head(os, d.elem_type() == Type::Float ? "float" : "fj_i64",
                  "fj_buf" + std::to_string(slot) + (index32 ? "_32" : ""), slot, d, true, index32);
  // CUDA reads through the read-only data cache (the buffers never change during a launch).
  auto load = [&](const char* type) {
    std::string p = std::string("((const ") + type + "*)t->data)";
    return cuda ? "__ldg(&" + p + "[off])" : p + "[off]";
  };
  switch (d.dtype) {
    case DType::F32: os << "  return " << load("float") << ";\n"; break;
    case DType::F64: os << "  return (float)" << load("double") << ";\n"; break;
    case DType::F16:
      if (cuda) os << "  return fj_f16_to_f32(" << load("unsigned short") << ");\n";
      else os << "  return (float)" << load("_Float16") << ";\n";
      break;
    case DType::BF16: os << "  return fj_bf16_to_f32(" << load("unsigned short") << ");\n"; break;
    case DType::I32: os << "  return (fj_i64)" << load("int") << ";\n"; break;
    case DType::I64: os << "  return " << load("fj_i64") << ";\n"; break;
    case DType::Bool: internal_error(__FILE__, __LINE__, "bool buffers are rejected at capture");
  }
  os << "}\n";
  return os.str();
}

// The dense row-major offset of an element of buffer `slot` in its gradient accumulator.
std::string emit_grad_offset(int slot, const ir::BufferDecl& d) {
  std::ostringstream os;
  emit_index_head(os, "fj_i64", "fj_goff" + std::to_string(slot), slot, d, false);
  os << "  return off;\n}\n";
  return os.str();
}

// ---- relative-position tables (CPU) ----
// A score_mod term that depends on q_idx and kv_idx only through their difference (T5's bucketed
// bias[h, bucket(kv_idx - q_idx)], any relative-position table or decay) takes only
// rows + cols - 1 values over a rows x cols tile, where the tile has rows * cols scores. Such
// terms, when they cost more than a table read (a transcendental, an int division, a float -> int
// conversion, or a buffer read indexed by the difference), are evaluated once per difference into
// a table of the tile's diagonals and read back per score (templates/cpu/mods.h). Each table
// entry is computed from a real (q_idx, kv_idx) pair of the tile with that difference, so the
// term sees exactly the arguments it would have seen, and no others.
//
// A term under a where() branch or the right operand of && / || (evaluated only where the
// condition allows) is tabulated only when it cannot raise the error flag (no buffer read, no
// int / or %): computing it for every difference must not report an error the mod would not.
constexpr int kMaxDiagTables = 4;

class DiagPlanner {
 public:
  std::vector<Expr> terms;  // tabulated terms, one table each (structurally distinct)

  void plan(const Expr& score_mod) { visit(score_mod, false); }
  // The table each occurrence of a term uses: occurrence node -> index into `terms`.
  const std::map<const ir::Node*, int>& uses() const { return uses_; }

 private:
  enum Kind { kInvariant = 0, kDiagonal = 1, kOther = 2 };

  Kind kind(const Expr& e) {
    if (auto it = kind_.find(e.get()); it != kind_.end()) return it->second;
    Kind k = kInvariant;
    if (e->op == Op::Variable) {
      k = (e->var == ir::Var::B || e->var == ir::Var::H) ? kInvariant : kOther;
    } else if (e->op == Op::Sub && e->args[0]->op == Op::Variable && e->args[1]->op == Op::Variable &&
               ((e->args[0]->var == ir::Var::KvIdx && e->args[1]->var == ir::Var::QIdx) ||
                (e->args[0]->var == ir::Var::QIdx && e->args[1]->var == ir::Var::KvIdx))) {
      k = kDiagonal;
    } else {
      for (const auto& a : e->args) k = std::max(k, kind(a));
    }
    kind_.emplace(e.get(), k);
    return k;
  }
  // Worth a table read: something per score costlier than a load (memoised: visit asks it of
  // every node on its way down).
  bool costly(const Expr& e) {
    if (auto it = costly_.find(e.get()); it != costly_.end()) return it->second;
    const bool c = costly_uncached(e);
    costly_.emplace(e.get(), c);
    return c;
  }
  bool costly_uncached(const Expr& e) {
    switch (e->op) {
      case Op::Exp: case Op::Exp2: case Op::Log: case Op::Log2: case Op::Tanh: case Op::Sin: case Op::Cos:
      case Op::Tan: case Op::Sqrt: case Op::Rsqrt: case Op::Sigmoid:
        return true;
      case Op::Div: case Op::Mod: return e->type == Type::Int;
      case Op::ToInt: if (e->args[0]->type == Type::Float) return true; break;
      case Op::Load:
        for (const auto& a : e->args)
          if (kind(a) == kDiagonal) return true;
        break;
      default: break;
    }
    for (const auto& a : e->args)
      if (costly(a)) return true;
    return false;
  }
  static bool may_flag(const Expr& e) {
    if (e->op == Op::Load || ((e->op == Op::Div || e->op == Op::Mod) && e->type == Type::Int)) return true;
    for (const auto& a : e->args)
      if (may_flag(a)) return true;
    return false;
  }
  void visit(const Expr& e, bool conditional) {
    if (e->type != Type::Bool && kind(e) == kDiagonal && costly(e) && !(conditional && may_flag(e))) {
      const std::string key = ir::to_string(e);
      auto it = index_.find(key);
      if (it == index_.end()) {
        if (static_cast<int>(terms.size()) >= kMaxDiagTables) return;
        it = index_.emplace(key, static_cast<int>(terms.size())).first;
        terms.push_back(e);
      }
      uses_[e.get()] = it->second;
      return;
    }
    const bool branchy = e->op == Op::Select || e->op == Op::And || e->op == Op::Or;
    for (size_t i = 0; i < e->args.size(); ++i) visit(e->args[i], conditional || (branchy && i > 0));
  }

  std::map<const ir::Node*, Kind> kind_;
  std::map<const ir::Node*, bool> costly_;
  std::map<std::string, int> index_;
  std::map<const ir::Node*, int> uses_;
};

// Whether the tables are wanted (FLEXJIT_MOD_TABLES=0 turns them off, to measure what they buy).
bool diag_tables_enabled() {
  const char* v = std::getenv("FLEXJIT_MOD_TABLES");
  return !(v && std::string(v) == "0");
}

// The tables' part of a CPU mod body (see templates/cpu/mods.h):
//   #define FLEXJIT_SCORE_DIAGS n          (0: the rest is absent)
//   #define FLEXJIT_DIAG_CHUNK c           (tiles are tabulated in chunks of c x c at most)
//   struct FjScoreDiags                    (n tables of 2c - 1 entries)
//   flexjit_score_diags_fill(T, u, b, h, q_idx, kv_idx, fj_mod)    entry u of every table
//   flexjit_score_mod_diags(score, b, h, q_idx, kv_idx, fj_mod, T, u)  score_mod reading entry u
std::string emit_diag_tables(const ModSet& mods) {
  DiagPlanner planner;
  if (mods.score_mod && diag_tables_enabled()) planner.plan(mods.score_mod);
  std::ostringstream os;
  os << "#define FLEXJIT_SCORE_DIAGS " << planner.terms.size() << "\n";
  if (planner.terms.empty()) return os.str();
  Emitter fill(mods, Backend::Cpu), use(mods, Backend::Cpu);
  std::vector<std::string> types;
  for (const auto& t : planner.terms)
    types.push_back(t->type == Type::Float ? "float" : fill.int32_valued(t) ? "int" : "fj_i64");
  os << "#define FLEXJIT_DIAG_CHUNK 256\n";
  os << "struct FjScoreDiags {\n";
  for (size_t k = 0; k < types.size(); ++k) os << "  " << types[k] << " t" << k << "[2 * FLEXJIT_DIAG_CHUNK - 1];\n";
  os << "};\n";
  os << "FJ_FN void flexjit_score_diags_fill(struct FjScoreDiags* fj_t, int fj_u, fj_i64 b, fj_i64 h, fj_i64 q_idx, "
        "fj_i64 kv_idx, const struct FlexModArgs* fj_mod) {\n"
     << "  (void)b; (void)h; (void)q_idx; (void)kv_idx; (void)fj_mod;\n";
  for (size_t k = 0; k < types.size(); ++k)
    os << "  fj_t->t" << k << "[fj_u] = (" << types[k] << ")" << fill.emit(planner.terms[k]) << ";\n";
  os << "}\n";
  for (const auto& [node, k] : planner.uses())  // nodes of mods.score_mod, alive while it is
    use.substitute(node, "fj_dg" + std::to_string(k), types[size_t(k)] == "int");
  os << "FJ_FN float flexjit_score_mod_diags(float score, fj_i64 b, fj_i64 h, fj_i64 q_idx, fj_i64 kv_idx, "
        "const struct FlexModArgs* fj_mod, const struct FjScoreDiags* fj_t, int fj_u) {\n"
     << "  (void)b; (void)h; (void)q_idx; (void)kv_idx; (void)fj_mod;\n";
  for (size_t k = 0; k < types.size(); ++k)
    os << "  const " << types[k] << " fj_dg" << k << " = fj_t->t" << k << "[fj_u];\n";
  os << "  return " << use.emit(mods.score_mod) << ";\n}\n";
  return os.str();
}

}  // namespace

std::string emit_mod_grad_body(const ModSet& mods) {
  std::string body = emit_mod_body(mods, Backend::Cpu);
  std::ostringstream os;
  os << "// == derivatives, generated by flexjit jit/codegen + jit/grad ==\n";
  std::vector<ir::LoadGrad> loads;
  ir::Expr dscore = ir::constant(1.0);
  if (mods.score_mod) {
    dscore = ir::grad_score(mods.score_mod);
    loads = ir::grad_loads(mods.score_mod);
  }
  os << "#define FLEXJIT_NUM_GRAD_LOADS " << loads.size() << "\n";
  for (size_t i = 0; i < mods.buffers.size(); ++i)
    if (mods.buffers[i].elem_type() == Type::Float) os << emit_grad_offset(static_cast<int>(i), mods.buffers[i]);
  Emitter em(mods, Backend::Cpu);
  os << "FJ_FN float flexjit_score_mod_dscore(float score, fj_i64 b, fj_i64 h, fj_i64 q_idx, fj_i64 kv_idx, "
        "const struct FlexModArgs* fj_mod) {\n"
     << "  (void)score; (void)b; (void)h; (void)q_idx; (void)kv_idx; (void)fj_mod;\n"
     << "  return " << em.emit(dscore) << ";\n}\n";
  os << "FJ_FN void flexjit_score_mod_dbuf(float score, float fj_g, fj_i64 b, fj_i64 h, fj_i64 q_idx, "
        "fj_i64 kv_idx, const struct FlexModArgs* fj_mod, const struct FlexGradArgs* fj_grad) {\n"
     << "  (void)score; (void)fj_g; (void)b; (void)h; (void)q_idx; (void)kv_idx; (void)fj_mod; (void)fj_grad;\n";
  for (const auto& lg : loads) {
    const int slot = mods.buffer_slot(lg.load->name);
    FLEXJIT_CHECK(slot >= 0, "validated ModSet declares every buffer it reads");
    os << "  if (fj_grad->grads[" << slot << "] != 0) fj_grad->grads[" << slot << "][fj_goff" << slot << "(";
    for (const auto& i : lg.load->args) os << em.emit(i) << ", ";
    os << "fj_mod)] += fj_g * " << em.emit(lg.partial) << ";\n";
  }
  os << "}\n// == end of derivatives ==\n";
  std::string s = body + os.str();
  if (s.size() > (1u << 21))
    throw Error("the mods and their derivatives expand to " + std::to_string(s.size()) +
                " bytes of code (limit 2 MiB); simplify the expression");
  return s;
}

std::string codegen_identity(Backend backend) {
  if (backend == Backend::Cuda) return "cuda-v2";
  // v3: relative-position tables; v4: int32 dividends divided through doubles; v5: tanh's exp;
  // v6: exp's polynomial and reduction as helpers (same code); v7: tanh as a rational function;
  // v8: the helpers before the mod's macros (a mods TU's precompiled prefix)
  return diag_tables_enabled() ? "cpu-v8" : "cpu-v8;tables=0";
}

std::string mod_helpers(Backend backend) {
  const bool cuda = backend == Backend::Cuda;
  return std::string(cuda ? kCudaPrelude : kCpuPrelude) + kPortableHelpers + (cuda ? kCudaMath : kCpuHelpers);
}

std::string emit_mod_body(const ModSet& mods, Backend backend, bool with_helpers) {
  validate(mods);
  const bool cuda = backend == Backend::Cuda;
  std::ostringstream os;
  os << "// == generated by flexjit jit/codegen (" << (cuda ? "cuda" : "cpu") << ") ==\n";
  os << "#define FLEXJIT_HAS_SCORE_MOD " << (mods.has_score_mod() ? 1 : 0) << "\n";
  os << "#define FLEXJIT_HAS_MASK_MOD " << (mods.has_mask_mod() ? 1 : 0) << "\n";
  os << "#define FLEXJIT_NUM_BUFFERS " << mods.buffers.size() << "\n";
  os << "#define FLEXJIT_NUM_PARAMS " << mods.params.size() << "\n";
  if (with_helpers) os << mod_helpers(backend);
  for (size_t i = 0; i < mods.buffers.size(); ++i)
    for (bool index32 : {false, true}) os << emit_buffer_reader(static_cast<int>(i), mods.buffers[i], backend, index32);
  Emitter em(mods, backend);
  os << "FJ_FN float flexjit_score_mod(float score, fj_i64 b, fj_i64 h, fj_i64 q_idx, "
        "fj_i64 kv_idx, const struct FlexModArgs* fj_mod) {\n"
     << "  (void)b; (void)h; (void)q_idx; (void)kv_idx; (void)fj_mod;\n"
     << "  return " << (mods.score_mod ? em.emit(mods.score_mod) : "score") << ";\n}\n";
  os << "FJ_FN bool flexjit_mask_mod(fj_i64 b, fj_i64 h, fj_i64 q_idx, fj_i64 kv_idx, "
        "const struct FlexModArgs* fj_mod) {\n"
     << "  (void)b; (void)h; (void)q_idx; (void)kv_idx; (void)fj_mod;\n"
     << "  return " << (mods.mask_mod ? em.emit(mods.mask_mod) : "true") << ";\n}\n";
  if (!cuda) os << emit_diag_tables(mods);
  os << "// == end of generated mod ==\n";
  std::string s = os.str();
  if (s.size() > (1u << 20))
    throw Error("the mods expand to " + std::to_string(s.size()) +
                " bytes of code (limit 1 MiB); simplify the expression");
  return s;
}

}  // namespace flexjit::jit

// The mod expression IR: an immutable, typed expression tree (float, int, bool) shared by the
// tracer (C++ functors), the parser (expression text), codegen, block-mask analysis and the
// float64 reference evaluator used by tests.
//
// Typing follows C++: arithmetic on int and float promotes to float; bool in arithmetic is
// int; comparisons give bool; && || ! take their operands as bool; int `/` truncates toward
// zero and `%` takes the sign of the dividend; math functions (exp, tanh, ...) take and give
// float. The node constructors below apply these rules, so every tree is well typed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "jit/types.h"

namespace flexjit::ir {

enum class Type : uint8_t { Float, Int, Bool };
const char* type_name(Type t);

// The mod's own variables, spelled exactly as in PyTorch FlexAttention.
enum class Var : uint8_t { Score, B, H, QIdx, KvIdx };
const char* var_name(Var v);  // "score", "b", "h", "q_idx", "kv_idx"

enum class Op : uint8_t {
  // leaves
  ConstFloat, ConstInt, ConstBool, Variable, Param, Load,
  // unary
  Neg, Not, Abs, Exp, Exp2, Log, Log2, Tanh, Sin, Cos, Tan, Sqrt, Rsqrt, Sigmoid, Floor, Ceil,
  ToFloat, ToInt, ToBool,
  // binary
  Add, Sub, Mul, Div, Mod, Min, Max, Lt, Le, Gt, Ge, Eq, Ne, And, Or,
  // ternary: args = {cond, then, else}
  Select,
};
const char* op_name(Op op);  // spelling used by the printer and parser: "+", "exp", "where", ...
bool is_unary(Op op);
bool is_binary(Op op);

struct Node;
using Expr = std::shared_ptr<const Node>;

struct Node {
  Op op;
  Type type;
  double fval = 0;          // ConstFloat
  int64_t ival = 0;         // ConstInt, ConstBool (0/1)
  Var var = Var::Score;     // Variable
  std::string name;         // Param, Load (buffer name)
  std::vector<Expr> args;   // operands; for Load the indices
};

// A captured tensor as the IR sees it: name, element type and rank. Values never enter the IR
// (or the cache key); they are bound at run time.
struct BufferDecl {
  std::string name;
  DType dtype = DType::F32;  // storage dtype: F32, F16, BF16, F64, I32, I64
  int rank = 1;              // 1..4
  Type elem_type() const { return dtype_is_float(dtype) ? Type::Float : Type::Int; }
};

// A runtime scalar: always float; its value is an argument, so changing it never recompiles.
struct ParamDecl {
  std::string name;
};

// ---- constructors (apply the C++ typing rules above; throw flexjit::Error on misuse) ----
Expr constant(double v);
Expr constant_int(int64_t v);
Expr constant_bool(bool v);
Expr variable(Var v);
Expr param(const std::string& name);
Expr load(const BufferDecl& buf, std::vector<Expr> indices);  // indices converted to int
Expr unary(Op op, Expr a);
Expr binary(Op op, Expr a, Expr b);
Expr select(Expr cond, Expr then_e, Expr else_e);
Expr cast(Expr a, Type to);

// ---- inspection ----
// Canonical, fully parenthesised text, e.g. "(score + (slopes[h] * float((kv_idx - q_idx))))".
// Two trees print the same iff they are structurally equal, so this text is what gets hashed.
std::string to_string(const Expr& e);
// 64-bit FNV-1a of to_string(e); for logs and symbol names. Cache keys hash the full text.
uint64_t hash(const Expr& e);
// Does the tree mention this variable (e.g. does a score_mod read `score`)?
bool uses_var(const Expr& e, Var v);
// Names of params / buffers the tree reads, sorted and unique.
std::vector<std::string> params_used(const Expr& e);
std::vector<std::string> buffers_used(const Expr& e);

// ---- rewriting ----
// `e` with every occurrence of variable v replaced by `with` (which must have v's type: Float
// for score, Int for the indices). Composes mods: user(score := softcap(score)). Shares the
// untouched subtrees.
Expr substitute(const Expr& e, Var v, const Expr& with);

// ---- float64 reference evaluation ----
struct Value {
  Type type = Type::Float;
  double f = 0;   // Float
  int64_t i = 0;  // Int, Bool
  double as_float() const { return type == Type::Float ? f : double(i); }
  int64_t as_int() const { return type == Type::Float ? int64_t(f) : i; }
  bool as_bool() const { return type == Type::Float ? f != 0 : i != 0; }
};

struct BoundBuffer {
  std::string name;
  TensorView view;
};

struct EvalEnv {
  double score = 0;
  int64_t b = 0, h = 0, q_idx = 0, kv_idx = 0;
  std::vector<std::pair<std::string, double>> params;
  std::vector<BoundBuffer> buffers;
};

// Evaluates in float64 / int64. An out-of-range buffer index throws flexjit::Error.
Value eval(const Expr& e, const EvalEnv& env);

}  // namespace flexjit::ir

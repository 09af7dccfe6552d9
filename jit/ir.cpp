#include "jit/ir.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <sstream>

namespace flexjit::ir {
namespace {

bool is_math_fn(Op op) { return op >= Op::Exp && op <= Op::Ceil; }

Expr make(Node n) { return std::make_shared<const Node>(std::move(n)); }

// The usual arithmetic conversions of C++, restricted to our three types.
Type arithmetic_type(Type a, Type b) {
  return (a == Type::Float || b == Type::Float) ? Type::Float : Type::Int;
}

}  // namespace

const char* type_name(Type t) {
  switch (t) {
    case Type::Float: return "float";
    case Type::Int: return "int";
    case Type::Bool: return "bool";
  }
  return "?";
}

const char* var_name(Var v) {
  switch (v) {
    case Var::Score: return "score";
    case Var::B: return "b";
    case Var::H: return "h";
    case Var::QIdx: return "q_idx";
    case Var::KvIdx: return "kv_idx";
  }
  return "?";
}

const char* op_name(Op op) {
  switch (op) {
    case Op::ConstFloat: return "const_float";
    case Op::ConstInt: return "const_int";
    case Op::ConstBool: return "const_bool";
    case Op::Variable: return "var";
    case Op::Param: return "param";
    case Op::Load: return "load";
    case Op::Neg: return "-";
    case Op::Not: return "!";
    case Op::Abs: return "abs";
    case Op::Exp: return "exp";
    case Op::Exp2: return "exp2";
    case Op::Log: return "log";
    case Op::Log2: return "log2";
    case Op::Tanh: return "tanh";
    case Op::Sin: return "sin";
    case Op::Cos: return "cos";
    case Op::Tan: return "tan";
    case Op::Sqrt: return "sqrt";
    case Op::Rsqrt: return "rsqrt";
    case Op::Sigmoid: return "sigmoid";
    case Op::Floor: return "floor";
    case Op::Ceil: return "ceil";
    case Op::ToFloat: return "float";
    case Op::ToInt: return "int";
    case Op::ToBool: return "bool";
    case Op::Add: return "+";
    case Op::Sub: return "-";
    case Op::Mul: return "*";
    case Op::Div: return "/";
    case Op::Mod: return "%";
    case Op::Min: return "min";
    case Op::Max: return "max";
    case Op::Lt: return "<";
    case Op::Le: return "<=";
    case Op::Gt: return ">";
    case Op::Ge: return ">=";
    case Op::Eq: return "==";
    case Op::Ne: return "!=";
    case Op::And: return "&&";
    case Op::Or: return "||";
    case Op::Select: return "where";
  }
  return "?";
}

bool is_unary(Op op) { return op >= Op::Neg && op <= Op::ToBool; }
bool is_binary(Op op) { return op >= Op::Add && op <= Op::Or; }

// ---------------------------------------------------------------- constructors

Expr constant(double v) {
  Node n{Op::ConstFloat, Type::Float};
  n.fval = v;
  return make(std::move(n));
}

Expr constant_int(int64_t v) {
  Node n{Op::ConstInt, Type::Int};
  n.ival = v;
  return make(std::move(n));
}

Expr constant_bool(bool v) {
  Node n{Op::ConstBool, Type::Bool};
  n.ival = v ? 1 : 0;
  return make(std::move(n));
}

Expr variable(Var v) {
  Node n{Op::Variable, v == Var::Score ? Type::Float : Type::Int};
  n.var = v;
  return make(std::move(n));
}

Expr param(const std::string& name) {
  Node n{Op::Param, Type::Float};
  n.name = name;
  return make(std::move(n));
}

Expr load(const BufferDecl& buf, std::vector<Expr> indices) {
  if (buf.rank < 1 || buf.rank > 4)
    throw Error("buffer '" + buf.name + "' has rank " + std::to_string(buf.rank) +
                "; captured buffers must have rank 1 to 4");
  if (static_cast<int>(indices.size()) != buf.rank)
    throw Error("buffer '" + buf.name + "' has rank " + std::to_string(buf.rank) + " but is read with " +
                std::to_string(indices.size()) + " index(es); write " + buf.name +
                (buf.rank == 1 ? "[i]" : "(i, j, ...)") + " with one index per dimension");
  Node n{Op::Load, buf.elem_type()};
  n.name = buf.name;
  for (auto& i : indices) {
    FLEXJIT_CHECK(i != nullptr, "load index is non-null");
    if (i->type == Type::Float)
      throw Error("buffer '" + buf.name + "' is indexed with a float expression (" + to_string(i) +
                  "); indices must be int: wrap it in int(...) if truncation is what you want");
    n.args.push_back(cast(i, Type::Int));
  }
  return make(std::move(n));
}

Expr cast(Expr a, Type to) {
  FLEXJIT_CHECK(a != nullptr, "cast operand is non-null");
  if (a->type == to) return a;
  // Fold casts of literals so printed IR and generated code stay readable.
  if (a->op == Op::ConstInt || a->op == Op::ConstBool) {
    if (to == Type::Float) return constant(static_cast<double>(a->ival));
    if (to == Type::Int) return constant_int(a->ival);
    return constant_bool(a->ival != 0);
  }
  Op op = to == Type::Float ? Op::ToFloat : to == Type::Int ? Op::ToInt : Op::ToBool;
  Node n{op, to};
  n.args = {std::move(a)};
  return make(std::move(n));
}

Expr unary(Op op, Expr a) {
  FLEXJIT_CHECK(a != nullptr, "unary operand is non-null");
  FLEXJIT_CHECK(is_unary(op), "unary() takes a unary op");
  if (op == Op::ToFloat) return cast(a, Type::Float);
  if (op == Op::ToInt) return cast(a, Type::Int);
  if (op == Op::ToBool) return cast(a, Type::Bool);
  Node n{op, Type::Float};
  if (op == Op::Not) {
    n.type = Type::Bool;
    a = cast(a, Type::Bool);
  } else if (op == Op::Neg || op == Op::Abs) {
    if (a->type == Type::Bool) a = cast(a, Type::Int);
    n.type = a->type;
  } else {
    FLEXJIT_CHECK(is_math_fn(op), "remaining unary ops are math functions");
    a = cast(a, Type::Float);
  }
  n.args = {std::move(a)};
  return make(std::move(n));
}

Expr binary(Op op, Expr a, Expr b) {
  FLEXJIT_CHECK(a != nullptr && b != nullptr, "binary operands are non-null");
  FLEXJIT_CHECK(is_binary(op), "binary() takes a binary op");
  Node n{op, Type::Float};
  if (op == Op::And || op == Op::Or) {
    n.type = Type::Bool;
    a = cast(a, Type::Bool);
    b = cast(b, Type::Bool);
  } else {
    Type t = arithmetic_type(a->type, b->type);
    if (op == Op::Mod && t == Type::Float)
      throw Error("'%' needs int operands, got " + std::string(type_name(a->type)) + " % " +
                  type_name(b->type) + " in (" + to_string(a) + " % " + to_string(b) +
                  "); convert with int(...) first");
    a = cast(a, t);
    b = cast(b, t);
    bool compare = op >= Op::Lt && op <= Op::Ne;
    n.type = compare ? Type::Bool : t;
  }
  n.args = {std::move(a), std::move(b)};
  return make(std::move(n));
}

Expr select(Expr c, Expr a, Expr b) {
  FLEXJIT_CHECK(c && a && b, "select operands are non-null");
  Type t = (a->type == Type::Bool && b->type == Type::Bool) ? Type::Bool
                                                            : arithmetic_type(a->type, b->type);
  Node n{Op::Select, t};
  n.args = {cast(c, Type::Bool), cast(a, t), cast(b, t)};
  return make(std::move(n));
}

// ---------------------------------------------------------------- printing

namespace {

std::string float_literal(double v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "(-inf)";
  if (std::isnan(v)) return "nan";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string s = buf;
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  if (std::signbit(v)) s = "(" + s + ")";  // -0.0 too: "-" + "-0.0" would read as "--"
  return s;
}

void print(const Expr& e, std::string& out) {
  switch (e->op) {
    case Op::ConstFloat: out += float_literal(e->fval); return;
    case Op::ConstInt:
      out += e->ival < 0 ? "(" + std::to_string(e->ival) + ")" : std::to_string(e->ival);
      return;
    case Op::ConstBool: out += e->ival ? "true" : "false"; return;
    case Op::Variable: out += var_name(e->var); return;
    case Op::Param: out += e->name; return;
    case Op::Load: {
      out += e->name;
      bool bracket = e->args.size() == 1;
      out += bracket ? "[" : "(";
      for (size_t i = 0; i < e->args.size(); ++i) {
        if (i) out += ", ";
        print(e->args[i], out);
      }
      out += bracket ? "]" : ")";
      return;
    }
    case Op::Neg:
    case Op::Not:
      out += "(";
      out += op_name(e->op);
      print(e->args[0], out);
      out += ")";
      return;
    case Op::Select:
      out += "(";
      print(e->args[0], out);
      out += " ? ";
      print(e->args[1], out);
      out += " : ";
      print(e->args[2], out);
      out += ")";
      return;
    case Op::Min:
    case Op::Max:
      out += op_name(e->op);
      out += "(";
      print(e->args[0], out);
      out += ", ";
      print(e->args[1], out);
      out += ")";
      return;
    default: break;
  }
  if (is_unary(e->op)) {
    out += op_name(e->op);
    out += "(";
    print(e->args[0], out);
    out += ")";
    return;
  }
  FLEXJIT_CHECK(is_binary(e->op), "printer handles every op");
  out += "(";
  print(e->args[0], out);
  out += " ";
  out += op_name(e->op);
  out += " ";
  print(e->args[1], out);
  out += ")";
}

void walk(const Expr& e, const std::function<void(const Node&)>& f) {
  f(*e);
  for (const auto& a : e->args) walk(a, f);
}

}  // namespace

std::string to_string(const Expr& e) {
  if (!e) return "<none>";
  std::string out;
  print(e, out);
  return out;
}

uint64_t hash(const Expr& e) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : to_string(e)) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

bool uses_var(const Expr& e, Var v) {
  bool found = false;
  if (e) walk(e, [&](const Node& n) { found |= n.op == Op::Variable && n.var == v; });
  return found;
}

Expr substitute(const Expr& e, Var v, const Expr& with) {
  if (!e) return e;
  if (e->op == Op::Variable) {
    if (e->var != v) return e;
    if (!with || with->type != e->type)
      throw Error(std::string("substitute: ") + var_name(v) + " is " + type_name(e->type) + ", the replacement " +
                  (with ? type_name(with->type) : "null"));
    return with;
  }
  bool changed = false;
  std::vector<Expr> args;
  args.reserve(e->args.size());
  for (const Expr& a : e->args) {
    args.push_back(substitute(a, v, with));
    changed |= args.back() != a;
  }
  if (!changed) return e;
  Node n = *e;  // same op and type: the operands' types are unchanged
  n.args = std::move(args);
  return make(std::move(n));
}

std::vector<std::string> params_used(const Expr& e) {
  std::set<std::string> s;
  if (e) walk(e, [&](const Node& n) { if (n.op == Op::Param) s.insert(n.name); });
  return {s.begin(), s.end()};
}

std::vector<std::string> buffers_used(const Expr& e) {
  std::set<std::string> s;
  if (e) walk(e, [&](const Node& n) { if (n.op == Op::Load) s.insert(n.name); });
  return {s.begin(), s.end()};
}

// ---------------------------------------------------------------- evaluation

namespace {

// Ints are read exactly (int64 does not fit a double); floats go through the shared reader.
Value read_element(const TensorView& t, int64_t off) {
  Value v;
  if (t.dtype == DType::I32 || t.dtype == DType::I64 || t.dtype == DType::Bool) {
    const char* p = static_cast<const char*>(t.data) + off * dtype_size(t.dtype);
    v.type = Type::Int;
    if (t.dtype == DType::I64) std::memcpy(&v.i, p, 8);
    else if (t.dtype == DType::I32) { int32_t x; std::memcpy(&x, p, 4); v.i = x; }
    else v.i = *p != 0;
    return v;
  }
  v.f = read_element_f64(t, off);
  return v;
}

Value fval(double f) { Value v; v.type = Type::Float; v.f = f; return v; }
Value ival(int64_t i) { Value v; v.type = Type::Int; v.i = i; return v; }
Value bval(bool b) { Value v; v.type = Type::Bool; v.i = b; return v; }

// C++ float -> int64 conversion is UB out of range; x86 yields INT64_MIN, and so do we.
int64_t to_int64(double f) {
  if (!(f > -9.2233720368547758e18 && f < 9.2233720368547758e18))
    return std::numeric_limits<int64_t>::min();
  return static_cast<int64_t>(f);
}

}  // namespace

Value eval(const Expr& e, const EvalEnv& env) {
  switch (e->op) {
    case Op::ConstFloat: return fval(e->fval);
    case Op::ConstInt: return ival(e->ival);
    case Op::ConstBool: return bval(e->ival != 0);
    case Op::Variable:
      switch (e->var) {
        case Var::Score: return fval(env.score);
        case Var::B: return ival(env.b);
        case Var::H: return ival(env.h);
        case Var::QIdx: return ival(env.q_idx);
        case Var::KvIdx: return ival(env.kv_idx);
      }
      break;
    case Op::Param:
      for (const auto& [n, v] : env.params)
        if (n == e->name) return fval(v);
      throw Error("eval: no value bound for param '" + e->name + "'");
    case Op::Load: {
      for (const auto& bb : env.buffers) {
        if (bb.name != e->name) continue;
        const TensorView& t = bb.view;
        if (t.rank != static_cast<int>(e->args.size()))
          throw Error("eval: buffer '" + e->name + "' bound with rank " + std::to_string(t.rank));
        int64_t off = 0;
        for (int d = 0; d < t.rank; ++d) {
          int64_t i = eval(e->args[d], env).i;
          if (i < 0 || i >= t.sizes[d])
            throw Error("buffer '" + e->name + "' index " + std::to_string(i) + " out of range for dim " +
                        std::to_string(d) + " of size " + std::to_string(t.sizes[d]));
          off += i * t.strides[d];
        }
        Value v = read_element(t, off);
        return e->type == Type::Float ? fval(v.as_float()) : ival(v.as_int());
      }
      throw Error("eval: no tensor bound for buffer '" + e->name + "'");
    }
    case Op::Select:
      return eval(e->args[0], env).as_bool() ? eval(e->args[1], env) : eval(e->args[2], env);
    default: break;
  }
  if (is_unary(e->op)) {
    Value a = eval(e->args[0], env);
    double x = a.as_float();
    switch (e->op) {
      case Op::Neg: return a.type == Type::Float ? fval(-a.f) : ival(-a.i);
      case Op::Not: return bval(!a.as_bool());
      case Op::Abs: return a.type == Type::Float ? fval(std::fabs(a.f)) : ival(a.i < 0 ? -a.i : a.i);
      case Op::Exp: return fval(std::exp(x));
      case Op::Exp2: return fval(std::exp2(x));
      case Op::Log: return fval(std::log(x));
      case Op::Log2: return fval(std::log2(x));
      case Op::Tanh: return fval(std::tanh(x));
      case Op::Sin: return fval(std::sin(x));
      case Op::Cos: return fval(std::cos(x));
      case Op::Tan: return fval(std::tan(x));
      case Op::Sqrt: return fval(std::sqrt(x));
      case Op::Rsqrt: return fval(1.0 / std::sqrt(x));
      case Op::Sigmoid: return fval(1.0 / (1.0 + std::exp(-x)));
      case Op::Floor: return fval(std::floor(x));
      case Op::Ceil: return fval(std::ceil(x));
      case Op::ToFloat: return fval(x);
      case Op::ToInt: return ival(a.type == Type::Float ? to_int64(a.f) : a.i);
      case Op::ToBool: return bval(a.as_bool());
      default: break;
    }
  }
  FLEXJIT_CHECK(is_binary(e->op), "eval handles every op");
  Value a = eval(e->args[0], env), b = eval(e->args[1], env);
  if (e->op == Op::And) return bval(a.as_bool() && b.as_bool());
  if (e->op == Op::Or) return bval(a.as_bool() || b.as_bool());
  bool is_f = e->args[0]->type == Type::Float;
  if (is_f) {
    double x = a.f, y = b.f;
    switch (e->op) {
      case Op::Add: return fval(x + y);
      case Op::Sub: return fval(x - y);
      case Op::Mul: return fval(x * y);
      case Op::Div: return fval(x / y);
      case Op::Min: return fval(y < x ? y : x);
      case Op::Max: return fval(x < y ? y : x);
      case Op::Lt: return bval(x < y);
      case Op::Le: return bval(x <= y);
      case Op::Gt: return bval(x > y);
      case Op::Ge: return bval(x >= y);
      case Op::Eq: return bval(x == y);
      case Op::Ne: return bval(x != y);
      default: break;
    }
  } else {
    int64_t x = a.i, y = b.i;
    switch (e->op) {
      case Op::Add: return ival(int64_t(uint64_t(x) + uint64_t(y)));
      case Op::Sub: return ival(int64_t(uint64_t(x) - uint64_t(y)));
      case Op::Mul: return ival(int64_t(uint64_t(x) * uint64_t(y)));
      case Op::Div:
      case Op::Mod:
        if (y == 0) throw Error("integer division by zero in " + to_string(e));
        // INT64_MIN / -1 traps (SIGFPE) on x86; generated code wraps, and so does the reference.
        if (y == -1) return ival(e->op == Op::Div ? int64_t(0ull - uint64_t(x)) : 0);
        return ival(e->op == Op::Div ? x / y : x % y);
      case Op::Min: return ival(y < x ? y : x);
      case Op::Max: return ival(x < y ? y : x);
      case Op::Lt: return bval(x < y);
      case Op::Le: return bval(x <= y);
      case Op::Gt: return bval(x > y);
      case Op::Ge: return bval(x >= y);
      case Op::Eq: return bval(x == y);
      case Op::Ne: return bval(x != y);
      default: break;
    }
  }
  internal_error(__FILE__, __LINE__, std::string("eval: unhandled op ") + op_name(e->op));
}

}  // namespace flexjit::ir

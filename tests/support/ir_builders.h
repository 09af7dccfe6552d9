// Short builders for IR trees in the jit tests (ir_test, grad_test).
#pragma once

#include <cstdint>
#include <utility>

#include "jit/ir.h"

namespace flexjit::testing {

inline ir::Expr score() { return ir::variable(ir::Var::Score); }
inline ir::Expr bv() { return ir::variable(ir::Var::B); }
inline ir::Expr hv() { return ir::variable(ir::Var::H); }
inline ir::Expr q() { return ir::variable(ir::Var::QIdx); }
inline ir::Expr kv() { return ir::variable(ir::Var::KvIdx); }
inline ir::Expr i(int64_t v) { return ir::constant_int(v); }
inline ir::Expr f(double v) { return ir::constant(v); }
inline ir::Expr bin(ir::Op op, ir::Expr a, ir::Expr b) { return ir::binary(op, std::move(a), std::move(b)); }
inline ir::Expr un(ir::Op op, ir::Expr a) { return ir::unary(op, std::move(a)); }

}  // namespace flexjit::testing

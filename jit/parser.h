// The expression-text front end: turns score_mod / mask_mod text such as
// "score + slopes[h] * (kv_idx - q_idx)" into the typed IR of jit/ir.h.
//
// The language is a small, strict C-like subset: literals, the mod variables, declared params
// and buffers, + - * / % < <= > >= == != && || ! ?: and a fixed set of functions (where, min,
// max, abs, exp, exp2, log, log2, tanh, sin, cos, tan, sqrt, rsqrt, sigmoid, floor, ceil and
// the casts float, int, bool). Anything else is rejected with a column, because mod text is
// user input and must never reach generated C++ as text.
#pragma once

#include <string>
#include <vector>

#include "jit/ir.h"

namespace flexjit {

struct ParseScope {
  bool allow_score = true;              // false for a mask_mod: `score` is then an unknown name
  std::vector<ir::BufferDecl> buffers;  // names usable as name[i] or name(i, j, ...)
  std::vector<ir::ParamDecl> params;    // names usable as float scalars
};

// Thrown for any rejected input. what() is a multi-line message:
//   "<what>: <problem> at column N\n  <the text>\n  <caret under column N>"  (+ optional hint line)
// Columns count bytes from the start of the text (a newline counts as one column).
class ParseError : public Error {
 public:
  ParseError(const std::string& msg, int column) : Error(msg), column_(column) {}
  int column() const { return column_; }  // 1-based
 private:
  int column_;
};

// Parses one expression. `what` names it in errors ("score_mod", "mask_mod").
// Throws ParseError for bad text, and flexjit::Error for a malformed scope (a buffer or param
// name that is not an identifier, is reserved, or is declared twice).
ir::Expr parse_expr(const std::string& text, const ParseScope& scope,
                    const std::string& what = "expression");

}  // namespace flexjit

#include "jit/parser.h"

#include <algorithm>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <set>
#include <string_view>
#include <utility>

namespace flexjit {
namespace {

constexpr size_t kMaxTextBytes = size_t{64} * 1024;
// Parser recursion: one level per parenthesis, call argument, index, prefix operator or nested
// ?:. Each level is ~10 C++ frames, so this keeps the stack small on any thread.
constexpr int kMaxNesting = 200;
// Left-associative chains (a + a + ... + a) deepen the tree without deepening the parser; every
// later pass (printer, codegen, eval) recurses over the tree, so bound it too.
constexpr int kMaxTreeDepth = 1000;
constexpr size_t kShownBytes = 80;  // window of a long text echoed in an error

const char* const kLanguageHint =
    "the language has names, numbers, ( ) [ ] , and the operators "
    "+ - * / % < <= > >= == != && || ! ? :";

// ---------------------------------------------------------------------------------------------
// Error reporting

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_alnum(char c) { return is_alpha(c) || is_digit(c); }
char to_lower(char c) { return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c; }

// One output byte per input byte, so the caret under the echoed text lines up with the column.
std::string printable(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    unsigned char u = static_cast<unsigned char>(c);
    if (is_space(c)) {
      c = ' ';
    } else if (u < 0x20 || u > 0x7e) {
      c = '?';
    }
  }
  return out;
}

class Reporter {
 public:
  Reporter(const std::string& text, const std::string& what) : text_(text), what_(what) {}

  [[noreturn]] void fail(int column, const std::string& problem,
                         const std::string& hint = "") const {
    std::string msg =
        what_ + ": " + problem + " at column " + std::to_string(column) + "\n" + excerpt(column);
    if (!hint.empty()) msg += "\n  " + hint;
    throw ParseError(msg, column);
  }

 private:
  // The text (or a window of it around the column) and a caret line under the column.
  std::string excerpt(int column) const {
    size_t pos = size_t(std::max(column, 1) - 1);  // may be text.size(): the end of the text
    size_t begin = 0, end = text_.size();
    if (text_.size() > kShownBytes) {
      begin = pos > kShownBytes / 2 ? pos - kShownBytes / 2 : 0;
      end = std::min(text_.size(), begin + kShownBytes);
    }
    std::string lead = begin > 0 ? "..." : "";
    std::string shown = lead + printable(std::string_view(text_).substr(begin, end - begin)) +
                        (end < text_.size() ? "..." : "");
    return "  " + shown + "\n  " + std::string(lead.size() + pos - begin, ' ') + "^";
  }

  const std::string& text_;
  const std::string& what_;
};

// ---------------------------------------------------------------------------------------------
// Tokens

enum class TokKind { Int, Float, Name, Punct, End };

struct Token {
  TokKind kind = TokKind::End;
  std::string text;  // spelling as written
  int column = 0;    // 1-based
  int64_t ival = 0;  // Int
  double fval = 0;   // Float
};

std::string describe(const Token& t) {
  return t.kind == TokKind::End ? "end of text" : "'" + t.text + "'";
}

class Lexer {
 public:
  Lexer(const std::string& text, const Reporter& rep) : text_(text), rep_(rep) {}

  std::vector<Token> run() {
    std::vector<Token> out;
    size_t i = 0;
    while (true) {
      while (i < text_.size() && is_space(text_[i])) ++i;
      if (i == text_.size()) break;
      char c = text_[i];
      if (is_digit(c) || (c == '.' && i + 1 < text_.size() && is_digit(text_[i + 1]))) {
        out.push_back(lex_number(i));
      } else if (is_alpha(c)) {
        out.push_back(lex_name(i));
      } else {
        out.push_back(lex_punct(i));
      }
    }
    Token end;
    end.column = int(text_.size()) + 1;
    out.push_back(end);
    return out;
  }

 private:
  Token make(TokKind kind, size_t start, size_t end) const {
    Token t;
    t.kind = kind;
    t.text = text_.substr(start, end - start);
    t.column = int(start) + 1;
    return t;
  }

  Token lex_name(size_t& i) const {
    size_t start = i;
    while (i < text_.size() && is_alnum(text_[i])) ++i;
    return make(TokKind::Name, start, i);
  }

  void skip_digits(size_t& i) const {
    while (i < text_.size() && is_digit(text_[i])) ++i;
  }

  // digits [. digits] [e [+-] digits] [f]; or . digits ... A number runs on through any
  // letters, digits, '_' and '.', so "1.2.3", "0x10" and "12abc" are one bad token.
  Token lex_number(size_t& i) const {
    size_t start = i;
    bool is_float = false;
    skip_digits(i);
    if (i < text_.size() && text_[i] == '.') {
      is_float = true;
      skip_digits(++i);
    }
    if (i < text_.size() && (text_[i] == 'e' || text_[i] == 'E')) {
      size_t j = i + 1;
      if (j < text_.size() && (text_[j] == '+' || text_[j] == '-')) ++j;
      if (j < text_.size() && is_digit(text_[j])) {
        is_float = true;
        skip_digits(i = j);
      }
    }
    size_t body_end = i;
    while (i < text_.size() && (is_alnum(text_[i]) || text_[i] == '.')) ++i;
    Token t = make(is_float ? TokKind::Float : TokKind::Int, start, i);
    std::string_view suffix = std::string_view(text_).substr(body_end, i - body_end);
    std::string_view body = std::string_view(text_).substr(start, body_end - start);
    bool f_suffix = suffix == "f" || suffix == "F";
    if (!suffix.empty() && !(is_float && f_suffix)) malformed_number(t, f_suffix);
    if (is_float) {
      t.fval = parse_float(t, body, f_suffix);
    } else {
      t.ival = parse_int(t, body);
    }
    return t;
  }

  [[noreturn]] void malformed_number(const Token& t, bool int_with_f) const {
    std::string hint =
        "a number is digits with an optional '.', exponent and 'f' suffix: "
        "12, 1.5, .5, 1e-3, 2.0f";
    if (t.text.size() > 1 && t.text[0] == '0' && to_lower(t.text[1]) == 'x') {
      hint = "hexadecimal literals are not supported; write the decimal value";
    } else if (int_with_f) {
      std::string digits = t.text.substr(0, t.text.size() - 1);
      hint = "an integer cannot take an 'f' suffix; write " + digits + ".0f or " + digits + ".0";
    }
    rep_.fail(t.column, "malformed number '" + t.text + "'", hint);
  }

  int64_t parse_int(const Token& t, std::string_view body) const {
    if (body.size() > 1 && body[0] == '0') {
      rep_.fail(t.column, "integer literal '" + t.text + "' has a leading zero",
                "C++ would read it as octal; write the decimal value without leading zeros");
    }
    int64_t v = 0;
    auto r = std::from_chars(body.data(), body.data() + body.size(), v);
    if (r.ec == std::errc::result_out_of_range) {
      rep_.fail(t.column, "integer literal '" + t.text + "' does not fit in int64");
    }
    if (r.ec != std::errc() || r.ptr != body.data() + body.size()) {
      rep_.fail(t.column, "malformed number '" + t.text + "'");
    }
    return v;
  }

  // The value is kept in float64 even with an 'f' suffix (as Python would), so "0.1f" and "0.1"
  // are the same constant; the suffix only promises the value fits in float32.
  double parse_float(const Token& t, std::string_view body, bool f_suffix) const {
    double v = 0;
    auto r = std::from_chars(body.data(), body.data() + body.size(), v);
    if (r.ec == std::errc::result_out_of_range || !std::isfinite(v)) {
      rep_.fail(t.column, "float literal '" + t.text + "' is out of range for float64",
                "write inf for infinity");
    }
    if (r.ec != std::errc() || r.ptr != body.data() + body.size()) {
      rep_.fail(t.column, "malformed number '" + t.text + "'");
    }
    if (f_suffix && std::fabs(v) > FLT_MAX) {
      rep_.fail(t.column, "float literal '" + t.text + "' overflows float32",
                "write inf for infinity, or drop the 'f' suffix");
    }
    return v;
  }

  Token lex_punct(size_t& i) const {
    size_t start = i;
    std::string_view rest = std::string_view(text_).substr(i);
    for (const char* two : {"<=", ">=", "==", "!=", "&&", "||"}) {
      if (rest.substr(0, 2) == two) {
        i += 2;
        return make(TokKind::Punct, start, i);
      }
    }
    int col = int(i) + 1;
    if (rest.substr(0, 2) == "**") {
      rep_.fail(col, "'**' (power) is not supported", "multiply, or use exp(y * log(x))");
    }
    if (rest.substr(0, 2) == "<<" || rest.substr(0, 2) == ">>") {
      rep_.fail(col, "shift operators are not supported");
    }
    switch (text_[i]) {
      case '=': rep_.fail(col, "'=' is not an operator", "did you mean '=='?");
      case '&': rep_.fail(col, "bitwise '&' is not supported", "did you mean '&&'?");
      case '|': rep_.fail(col, "bitwise '|' is not supported", "did you mean '||'?");
      default: break;
    }
    if (std::string_view("+-*/%<>!?:()[],").find(text_[i]) != std::string_view::npos) {
      return make(TokKind::Punct, start, ++i);
    }
    bad_char(i);
  }

  // Anything outside the language is refused here, before parsing: the text must never be able
  // to smuggle C++ (statements, strings, comments, preprocessor lines) into generated code.
  [[noreturn]] void bad_char(size_t i) const {
    unsigned char c = static_cast<unsigned char>(text_[i]);
    int col = int(i) + 1;
    std::string hint = kLanguageHint;
    switch (c) {
      case ';': hint = "a mod is a single expression: no statements and no ';'"; break;
      case '"':
      case '\'': hint = "there are no strings or character literals"; break;
      case '{':
      case '}': hint = "there are no blocks; write a single expression"; break;
      case '#': hint = "there is no preprocessor and there are no comments"; break;
      case '\\': hint = "there are no escapes or line continuations"; break;
      case '.':
        if (i > 0 && is_alnum(text_[i - 1])) {
          hint = "there is no member access: write where(...), not torch.where(...)";
        }
        break;
      default: break;
    }
    if (c >= 0x20 && c < 0x7f) {
      rep_.fail(col, std::string("character '") + char(c) + "' is not part of the language", hint);
    }
    char buf[8];
    std::snprintf(buf, sizeof buf, "0x%02X", unsigned(c));
    rep_.fail(col, std::string("byte ") + buf + " is not part of the language",
              "only printable ASCII and whitespace are allowed");
  }

  const std::string& text_;
  const Reporter& rep_;
};

// ---------------------------------------------------------------------------------------------
// Names

enum class FnKind { Unary, Binary, Select, Cast };

struct Function {
  const char* name;
  FnKind kind;
  int arity;
  ir::Op op;                      // Unary, Binary
  ir::Type to = ir::Type::Float;  // Cast
};

constexpr Function kFunctions[] = {
    {"where", FnKind::Select, 3, ir::Op::Select},
    {"min", FnKind::Binary, 2, ir::Op::Min},
    {"max", FnKind::Binary, 2, ir::Op::Max},
    {"abs", FnKind::Unary, 1, ir::Op::Abs},
    {"exp", FnKind::Unary, 1, ir::Op::Exp},
    {"exp2", FnKind::Unary, 1, ir::Op::Exp2},
    {"log", FnKind::Unary, 1, ir::Op::Log},
    {"log2", FnKind::Unary, 1, ir::Op::Log2},
    {"tanh", FnKind::Unary, 1, ir::Op::Tanh},
    {"sin", FnKind::Unary, 1, ir::Op::Sin},
    {"cos", FnKind::Unary, 1, ir::Op::Cos},
    {"tan", FnKind::Unary, 1, ir::Op::Tan},
    {"sqrt", FnKind::Unary, 1, ir::Op::Sqrt},
    {"rsqrt", FnKind::Unary, 1, ir::Op::Rsqrt},
    {"sigmoid", FnKind::Unary, 1, ir::Op::Sigmoid},
    {"floor", FnKind::Unary, 1, ir::Op::Floor},
    {"ceil", FnKind::Unary, 1, ir::Op::Ceil},
    {"float", FnKind::Cast, 1, ir::Op::ToFloat, ir::Type::Float},
    {"int", FnKind::Cast, 1, ir::Op::ToInt, ir::Type::Int},
    {"bool", FnKind::Cast, 1, ir::Op::ToBool, ir::Type::Bool},
};

constexpr ir::Var kVars[] = {ir::Var::Score, ir::Var::B, ir::Var::H, ir::Var::QIdx, ir::Var::KvIdx};
constexpr const char* kConstants[] = {"true", "false", "inf", "INFINITY"};

const Function* find_function(const std::string& name) {
  for (const Function& f : kFunctions) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

const ir::Var* find_var(const std::string& name) {
  for (const ir::Var& v : kVars) {
    if (name == ir::var_name(v)) return &v;
  }
  return nullptr;
}

bool is_nan_name(const std::string& name) {
  return name.size() == 3 && to_lower(name[0]) == 'n' && to_lower(name[1]) == 'a' &&
         to_lower(name[2]) == 'n';
}

// What a declared name would collide with, or null if it is free.
const char* reserved_as(const std::string& name) {
  if (find_var(name)) return "a mod variable";
  if (find_function(name)) return "a function";
  for (const char* c : kConstants) {
    if (name == c) return "a constant";
  }
  if (is_nan_name(name)) return "a rejected constant";
  return nullptr;
}

bool is_identifier(const std::string& s) {
  if (s.empty() || !is_alpha(s[0])) return false;
  return std::all_of(s.begin(), s.end(), is_alnum);
}

void check_scope(const ParseScope& scope, const std::string& what) {
  std::set<std::string> seen;
  auto check = [&](const std::string& name, const char* kind) {
    std::string prefix = what + ": " + kind + " name '" + printable(name) + "'";
    if (!is_identifier(name)) {
      throw Error(prefix + " is not an identifier (letters, digits and '_', not first a digit)");
    }
    if (const char* r = reserved_as(name)) {
      throw Error(prefix + " is reserved (it is " + r + "); rename the " + kind);
    }
    if (!seen.insert(name).second) {
      throw Error(prefix + " is declared twice (buffers and params share one namespace)");
    }
  };
  for (const ir::BufferDecl& b : scope.buffers) {
    check(b.name, "buffer");
    if (b.rank < 1 || b.rank > 4) {
      throw Error(what + ": buffer '" + b.name + "' has rank " + std::to_string(b.rank) +
                  "; buffers have rank 1 to 4");
    }
  }
  for (const ir::ParamDecl& p : scope.params) check(p.name, "param");
}

// Optimal-string-alignment distance, case-insensitive (so "True" is close to "true").
int edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<int>> d(a.size() + 1, std::vector<int>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = int(i);
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = int(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      int cost = to_lower(a[i - 1]) == to_lower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && to_lower(a[i - 1]) == to_lower(b[j - 2]) &&
          to_lower(a[i - 2]) == to_lower(b[j - 1])) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

// The closest candidate if it is plausibly a typo of `name`, else "".
std::string closest_name(const std::string& name, const std::vector<std::string>& candidates) {
  std::string best;
  int best_d = 3;
  for (const std::string& c : candidates) {
    size_t longer = std::max(name.size(), c.size());
    if (longer - std::min(name.size(), c.size()) > 2) continue;
    int d = edit_distance(name, c);
    if (d < best_d && 3 * size_t(d) <= longer) {
      best = c;
      best_d = d;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Parser

// A parsed subtree with where it starts in the text and how deep it is.
struct Term {
  ir::Expr expr;
  int column = 0;
  int depth = 1;
};

struct BinaryOp {
  const char* spelling;
  ir::Op op;
};

// Lowest precedence first; every level is left-associative.
const std::vector<std::vector<BinaryOp>>& binary_levels() {
  static const std::vector<std::vector<BinaryOp>> levels = {
      {{"||", ir::Op::Or}},
      {{"&&", ir::Op::And}},
      {{"==", ir::Op::Eq}, {"!=", ir::Op::Ne}},
      {{"<", ir::Op::Lt}, {"<=", ir::Op::Le}, {">", ir::Op::Gt}, {">=", ir::Op::Ge}},
      {{"+", ir::Op::Add}, {"-", ir::Op::Sub}},
      {{"*", ir::Op::Mul}, {"/", ir::Op::Div}, {"%", ir::Op::Mod}},
  };
  return levels;
}

std::string plural(size_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

class Parser {
 public:
  Parser(std::vector<Token> tokens, const ParseScope& scope, const std::string& what,
         const Reporter& rep)
      : tokens_(std::move(tokens)), scope_(scope), what_(what), rep_(rep) {}

  ir::Expr parse() {
    if (peek().kind == TokKind::End) {
      rep_.fail(1, "empty expression",
                "write e.g. 'score * 2' (score_mod) or 'q_idx >= kv_idx' (mask_mod)");
    }
    Term t = parse_ternary();
    if (peek().kind != TokKind::End) trailing_garbage();
    return t.expr;
  }

 private:
  // Bounds parser recursion; see kMaxNesting.
  class Nest {
   public:
    explicit Nest(Parser* p) : p_(p) {
      if (++p_->nesting_ > kMaxNesting) {
        p_->rep_.fail(p_->peek().column,
                      "expression nests deeper than " + std::to_string(kMaxNesting) + " levels");
      }
    }
    ~Nest() { --p_->nesting_; }
    Nest(const Nest&) = delete;
    Nest& operator=(const Nest&) = delete;

   private:
    Parser* p_;
  };

  const Token& peek() const { return tokens_[pos_]; }
  const Token& next() {
    const Token& t = tokens_[pos_];
    if (t.kind != TokKind::End) ++pos_;
    return t;
  }
  bool at(const char* punct) const { return peek().kind == TokKind::Punct && peek().text == punct; }

  // Runs an ir constructor; its type errors become ParseErrors at the operator's column.
  template <typename F>
  Term build(int column, std::initializer_list<const Term*> args, F&& construct) {
    int depth = 0, start = column;
    for (const Term* a : args) {
      depth = std::max(depth, a->depth);
      start = std::min(start, a->column);
    }
    if (depth + 1 > kMaxTreeDepth) {
      rep_.fail(column, "expression is deeper than " + std::to_string(kMaxTreeDepth) +
                            " nested operations");
    }
    Term t;
    try {
      t.expr = construct();
    } catch (const ParseError&) {
      throw;
    } catch (const Error& e) {
      rep_.fail(column, e.what());
    }
    t.column = start;
    t.depth = depth + 1;
    return t;
  }

  Term leaf(const Token& t, ir::Expr e) { return Term{std::move(e), t.column, 1}; }

  // ternary: or-expr [ '?' ternary ':' ternary ]   (right-associative)
  Term parse_ternary() {
    Nest nest(this);
    Term cond = parse_binary(0);
    if (!at("?")) return cond;
    const Token& q = next();
    Term a = parse_ternary();
    if (!at(":")) {
      rep_.fail(peek().column, "expected ':' to complete the '?' at column " +
                                   std::to_string(q.column) + ", found " + describe(peek()));
    }
    next();
    Term b = parse_ternary();
    return build(q.column, {&cond, &a, &b}, [&] { return ir::select(cond.expr, a.expr, b.expr); });
  }

  const BinaryOp* match_binary(size_t level) const {
    if (peek().kind != TokKind::Punct) return nullptr;
    for (const BinaryOp& op : binary_levels()[level]) {
      if (peek().text == op.spelling) return &op;
    }
    return nullptr;
  }

  Term parse_binary(size_t level) {
    if (level == binary_levels().size()) return parse_unary();
    Term lhs = parse_binary(level + 1);
    while (const BinaryOp* op = match_binary(level)) {
      int column = next().column;
      Term rhs = parse_binary(level + 1);
      lhs = build(column, {&lhs, &rhs}, [&] { return ir::binary(op->op, lhs.expr, rhs.expr); });
    }
    return lhs;
  }

  Term parse_unary() {
    if (!at("-") && !at("+") && !at("!")) return parse_postfix();
    Nest nest(this);
    const Token& op = next();
    Term a = parse_unary();
    if (op.text == "+") {
      // The IR has no unary plus; C++'s +x only promotes bool to int.
      if (a.expr->type != ir::Type::Bool) {
        a.column = op.column;
        return a;
      }
      return build(op.column, {&a}, [&] { return ir::cast(a.expr, ir::Type::Int); });
    }
    ir::Op code = op.text == "-" ? ir::Op::Neg : ir::Op::Not;
    return build(op.column, {&a}, [&] { return ir::unary(code, a.expr); });
  }

  // Calls and indexing are parsed with the name they apply to; anything else is refused here.
  Term parse_postfix() {
    Term t = parse_primary();
    if (at("(")) {
      rep_.fail(peek().column, "'(' cannot follow this operand: only functions and buffers take (",
                "is an operator missing before '('?");
    }
    if (at("[")) {
      rep_.fail(peek().column, "'[' cannot follow this operand: only rank-1 buffers take [");
    }
    return t;
  }

  Term parse_primary() {
    const Token& t = peek();
    switch (t.kind) {
      case TokKind::Int: return leaf(next(), ir::constant_int(t.ival));
      case TokKind::Float: return leaf(next(), ir::constant(t.fval));
      case TokKind::Name: return parse_name();
      case TokKind::Punct:
        if (t.text == "(") return parse_parens();
        break;
      case TokKind::End: break;
    }
    rep_.fail(t.column, "expected an operand, found " + describe(t));
  }

  Term parse_parens() {
    const Token& open = next();
    Term e = parse_ternary();
    if (!at(")")) {
      rep_.fail(peek().column, "expected ')' to close the '(' at column " +
                                   std::to_string(open.column) + ", found " + describe(peek()));
    }
    next();
    e.column = open.column;
    return e;
  }

  // A comma-separated list between the current '(' or '[' and `close`.
  std::vector<Term> parse_list(const char* close, const std::string& context) {
    const Token& open = next();
    std::vector<Term> items;
    if (at(close)) {
      next();
      return items;
    }
    while (true) {
      items.push_back(parse_ternary());
      if (at(",")) {
        next();
        continue;
      }
      if (at(close)) {
        next();
        return items;
      }
      rep_.fail(peek().column, std::string("expected ',' or '") + close + "' in " + context +
                                   " opened at column " + std::to_string(open.column) + ", found " +
                                   describe(peek()));
    }
  }

  void refuse_postfix(const Token& name, const std::string& kind) {
    if (at("(")) {
      rep_.fail(peek().column, "'" + name.text + "' is " + kind + ", not a function or buffer",
                "it cannot be called");
    }
    if (at("[")) {
      rep_.fail(peek().column, "'" + name.text + "' is " + kind + ", not a buffer",
                "it cannot be indexed");
    }
  }

  const ir::BufferDecl* find_buffer(const std::string& name) const {
    for (const ir::BufferDecl& b : scope_.buffers) {
      if (b.name == name) return &b;
    }
    return nullptr;
  }

  bool is_param(const std::string& name) const {
    for (const ir::ParamDecl& p : scope_.params) {
      if (p.name == name) return true;
    }
    return false;
  }

  Term parse_name() {
    const Token& t = next();
    const std::string& n = t.text;
    if (n == "true" || n == "false") return leaf(t, ir::constant_bool(n == "true"));
    if (n == "inf" || n == "INFINITY") {
      return leaf(t, ir::constant(std::numeric_limits<double>::infinity()));
    }
    if (is_nan_name(n)) {
      rep_.fail(t.column, "'" + n + "' is not allowed",
                "a NaN score poisons the softmax; to drop a position use -inf in a score_mod "
                "or false in a mask_mod");
    }
    if (const ir::Var* v = find_var(n)) {
      if (*v == ir::Var::Score && !scope_.allow_score) {
        rep_.fail(t.column, what_ + " cannot read score",
                  "a mask_mod sees only b, h, q_idx and kv_idx; put score-dependent logic in "
                  "the score_mod");
      }
      refuse_postfix(t, "a mod variable");
      return leaf(t, ir::variable(*v));
    }
    if (const Function* f = find_function(n)) {
      if (!at("(")) {
        rep_.fail(t.column, "'" + n + "' is a function and must be called", usage(*f));
      }
      return parse_call(t, *f);
    }
    if (is_param(n)) {
      refuse_postfix(t, "a param (a float scalar)");
      return leaf(t, ir::param(n));
    }
    if (const ir::BufferDecl* b = find_buffer(n)) {
      if (!at("[") && !at("(")) {
        rep_.fail(t.column, "buffer '" + n + "' is used without an index", "write " + indexing(*b));
      }
      return parse_load(t, *b);
    }
    unknown_name(t);
  }

  static std::string usage(const Function& f) {
    const char* args[] = {"", "x", "a, b", "cond, a, b"};
    return std::string("write ") + f.name + "(" + args[f.arity] + ")";
  }

  static std::string indexing(const ir::BufferDecl& b) {
    if (b.rank == 1) return b.name + "[i]";
    const char* idx[] = {"", "i", "i, j", "i, j, k", "i, j, k, l"};
    return b.name + "(" + idx[b.rank] + ")";
  }

  Term parse_call(const Token& name, const Function& f) {
    std::vector<Term> args = parse_list(")", "the call to " + name.text);
    if (int(args.size()) != f.arity) {
      rep_.fail(name.column,
                name.text + " takes " + plural(f.arity, "argument", "arguments") + ", got " +
                    std::to_string(args.size()),
                usage(f));
    }
    int col = name.column;
    switch (f.kind) {
      case FnKind::Unary:
        return build(col, {&args[0]}, [&] { return ir::unary(f.op, args[0].expr); });
      case FnKind::Binary:
        return build(col, {&args[0], &args[1]},
                     [&] { return ir::binary(f.op, args[0].expr, args[1].expr); });
      case FnKind::Select:
        return build(col, {&args[0], &args[1], &args[2]},
                     [&] { return ir::select(args[0].expr, args[1].expr, args[2].expr); });
      case FnKind::Cast:
        return build(col, {&args[0]}, [&] { return ir::cast(args[0].expr, f.to); });
    }
    rep_.fail(col, "internal: unhandled function kind");
  }

  Term parse_load(const Token& name, const ir::BufferDecl& buf) {
    const Token& open = peek();
    bool square = open.text == "[";
    std::vector<Term> idx = parse_list(square ? "]" : ")", "the index of " + name.text);
    if (square && buf.rank != 1) {
      rep_.fail(open.column,
                "'[]' indexes rank-1 buffers only, and '" + name.text + "' has rank " +
                    std::to_string(buf.rank),
                "write " + indexing(buf));
    }
    if (int(idx.size()) != buf.rank) {
      rep_.fail(open.column,
                "buffer '" + name.text + "' has rank " + std::to_string(buf.rank) + " but got " +
                    plural(idx.size(), "index", "indices"),
                "write " + indexing(buf));
    }
    // ir::load decides which index types are legal; point its complaint at a float index.
    int column = open.column;
    for (const Term& i : idx) {
      if (i.expr->type == ir::Type::Float) {
        column = i.column;
        break;
      }
    }
    int depth = 0;
    std::vector<ir::Expr> exprs;
    for (const Term& i : idx) {
      depth = std::max(depth, i.depth);
      exprs.push_back(i.expr);
    }
    Term indices{nullptr, name.column, depth};
    return build(column, {&indices}, [&] { return ir::load(buf, std::move(exprs)); });
  }

  std::vector<std::string> names_in_scope() const {
    std::vector<std::string> names;
    for (ir::Var v : kVars) {
      if (v != ir::Var::Score || scope_.allow_score) names.push_back(ir::var_name(v));
    }
    for (const ir::ParamDecl& p : scope_.params) names.push_back(p.name);
    for (const ir::BufferDecl& b : scope_.buffers) names.push_back(b.name);
    for (const Function& f : kFunctions) names.push_back(f.name);
    for (const char* c : kConstants) names.push_back(c);
    return names;
  }

  std::string scope_listing() const {
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
      return s;
    };
    std::vector<std::string> vars, params, buffers, fns;
    for (ir::Var v : kVars) {
      if (v != ir::Var::Score || scope_.allow_score) vars.push_back(ir::var_name(v));
    }
    for (const ir::ParamDecl& p : scope_.params) params.push_back(p.name);
    for (const ir::BufferDecl& b : scope_.buffers) buffers.push_back(indexing(b));
    for (const Function& f : kFunctions) fns.push_back(f.name);
    std::string s = "names valid here: " + join(vars);
    if (!params.empty()) s += "; params: " + join(params);
    if (!buffers.empty()) s += "; buffers: " + join(buffers);
    return s + "; functions: " + join(fns) + "; constants: true, false, inf";
  }

  static std::string special_hint(const std::string& n) {
    if (n == "return") return "write only the expression, without 'return' and ';'";
    if (n == "and" || n == "or" || n == "not") {
      return std::string("use '") + (n == "and" ? "&&" : n == "or" ? "||" : "!") + "'";
    }
    if (n == "if" || n == "else") return "write 'cond ? a : b' or where(cond, a, b)";
    if (n == "lambda") return "pass only the body, e.g. 'score * 2', not a lambda";
    if (n == "pow") return "pow is not supported; multiply, or use exp(y * log(x))";
    return "";
  }

  [[noreturn]] void unknown_name(const Token& t) {
    std::string hint = special_hint(t.text);
    if (hint.empty()) {
      std::string near = closest_name(t.text, names_in_scope());
      if (!near.empty()) hint = "did you mean '" + near + "'? ";
    } else {
      hint += ". ";
    }
    rep_.fail(t.column, "unknown name '" + t.text + "'", hint + scope_listing());
  }

  [[noreturn]] void trailing_garbage() {
    const Token& t = peek();
    std::string hint = "is an operator missing before it?";
    if (t.text == ")") hint = "there are more ')' than '('";
    if (t.text == "]") hint = "there are more ']' than '['";
    if (t.text == ":") hint = "':' without a matching '?'";
    if (t.text == ",") hint = "',' separates arguments inside a call only";
    if (t.kind == TokKind::Name && !special_hint(t.text).empty()) hint = special_hint(t.text);
    rep_.fail(t.column, "unexpected " + describe(t) + " after the end of the expression", hint);
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int nesting_ = 0;
  const ParseScope& scope_;
  const std::string& what_;
  const Reporter& rep_;
};

}  // namespace

ir::Expr parse_expr(const std::string& text, const ParseScope& scope, const std::string& what) {
  check_scope(scope, what);
  Reporter rep(text, what);
  if (text.size() > kMaxTextBytes) {
    rep.fail(int(kMaxTextBytes) + 1, "the text is " + std::to_string(text.size()) +
                                         " bytes, more than the " + std::to_string(kMaxTextBytes) +
                                         " allowed");
  }
  std::vector<Token> tokens = Lexer(text, rep).run();
  return Parser(std::move(tokens), scope, what, rep).parse();
}

}  // namespace flexjit

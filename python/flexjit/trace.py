"""Turns the Python score_mod / mask_mod functions written for PyTorch's flex_attention into
flexjit expression text, by running them once on proxy values.

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)      # slopes: a tensor from the closure

    score_text, mask_text, buffers, params = bind(score_mod, None)
    # score_text "score + slopes[h] * (kv_idx - q_idx)", buffers {"slopes": <the live tensor>}

What the function captures (closure cells, default arguments, the globals it names, attributes
of `self` for methods and callable objects, recursively through the Python functions, tuples,
lists and dicts among them) is replaced for the trace by stand-ins: tensors become buffers,
Python ints and floats runtime params, bools and other immutable values constants. Each stand-in
remembers the path it was read from (e.g. closure cell 0, then item 2), and bind() reads every
path again on each call, so a changed float or tensor takes effect without a new trace or a
recompile. A trace is memoised by the function's code object and guarded by the metadata of
everything it captured (tensor dtype / shape, number type, the code of nested functions, ...),
so a second call, or a new closure from the same factory, re-traces nothing.

Semantics are PyTorch's, not C++'s: `/` is true division, `//` floors and `%` takes the divisor's
sign (exact for all signs), `**` needs a literal exponent or a positive base, casts follow
`.to(dtype)`. Anything that cannot be one expression of (score, b, h, q_idx, kv_idx) -- a Python
`if` or loop on a traced value, `.item()`, an unsupported torch function -- raises TraceError
naming the construct and the mod's source line; a captured number used for Python control flow
(`range(n)`, `math.log(n)`, `if window > 0`) is instead baked into the text as a constant and
guarded by its value.
"""

import enum
import functools
import linecache
import math
import numbers
import re
import sys
import threading
import types

import torch

__all__ = ["TraceError", "Traced", "trace", "bind", "stats", "clear"]


class TraceError(TypeError):
    """A mod uses something flexjit cannot turn into an expression; the message names it and the
    source line."""


F, I, B = "float", "int", "bool"
# Precedence levels of the text language (jit/parser.cpp), loosest first; where() is an atom.
_OR, _AND, _EQ, _REL, _ADD, _MUL, _UNARY, _ATOM = range(1, 9)
_RESERVED = {"score", "b", "h", "q_idx", "kv_idx", "where", "min", "max", "abs", "exp", "exp2", "log",
             "log2", "tanh", "sin", "cos", "tan", "sqrt", "rsqrt", "sigmoid", "floor", "ceil", "float",
             "int", "bool", "true", "false", "inf", "INFINITY"}
_MOD_ARGS = {"score": ("score", "b", "h", "q_idx", "kv_idx"), "mask": ("b", "h", "q_idx", "kv_idx")}
_KIND_NAME = {"score": "score_mod", "mask": "mask_mod"}
# Params are float32 at run time: ints beyond 2^24 would round, so they become constants.
_MAX_INT_PARAM = 1 << 24
_MAX_TEXT = 60000  # the parser takes 64 KiB
_MAX_ENTRIES = 32  # traces kept per code object (differently specialised constants)
_MAX_RETRACES = 64
_BUFFER_DTYPES = {torch.float32: F, torch.float64: F, torch.float16: F, torch.bfloat16: F,
                  torch.int32: I, torch.int64: I, torch.bool: B}
_WIDENED_DTYPES = (torch.int8, torch.int16, torch.uint8)  # passed to the op as int32

_tls = threading.local()
_lock = threading.RLock()
_memo = {}
_stats = {"traces": 0, "hits": 0, "misses": 0}


def stats():
    """Counters: traces (times a mod function ran on proxies, retraces included), hits (calls
    served by a memoised trace), misses (calls that had to trace)."""
    return dict(_stats)


def clear():
    """Forgets every memoised trace (and resets the counters)."""
    with _lock:
        _memo.clear()
        for k in _stats:
            _stats[k] = 0


# ---------------------------------------------------------------------------------------------
# Errors with the mod's source line


def _ctx():
    return getattr(_tls, "ctx", None)


def _location(frame=None, tb=None):
    """file:line: `source` of the innermost frame running the traced mod's code (or a function
    it called that was traced with it)."""
    ctx = _ctx()
    codes = ctx.codes if ctx else ()
    found = None
    if tb is not None:
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
            tb = tb.tb_next
    else:
        f = frame or sys._getframe(1)
        while f is not None:
            if f.f_code in codes:
                found = (f.f_code.co_filename, f.f_lineno)
                break
            f = f.f_back
    if found is None:
        return None
    line = linecache.getline(found[0], found[1]).strip()
    return f"{found[0]}:{found[1]}" + (f": `{line}`" if line else "")


def _fail(what, hint=""):
    ctx = _ctx()
    mod = f"{_KIND_NAME[ctx.kind]} {ctx.fn_name}" if ctx else "mod"
    loc = _location(sys._getframe(1))
    msg = f"flexjit cannot trace the {mod}: {what}" + (f" at {loc}" if loc else "")
    if hint:
        msg += f"\n  {hint}"
    raise TraceError(msg)


class _Specialize(BaseException):
    """Internal: a captured value was needed as a real Python value; retrace with these paths as
    constants. A BaseException so that a mod's own `except Exception` cannot swallow it."""

    def __init__(self, paths):
        super().__init__()
        self.paths = paths


# ---------------------------------------------------------------------------------------------
# Traced values


def _wrap(v, prec):
    return v.text if v.prec >= prec else f"({v.text})"


class _V:
    """A traced scalar: its text, type (float / int / bool), the precedence of its outermost
    operator, whether it is known >= 0 / > 0, what it depends on (mod arguments by name, captures),
    and its value if it is a literal."""

    __slots__ = ("text", "ty", "prec", "nn", "pos", "deps", "const")
    __hash__ = None

    def __init__(self, text, ty, prec=_ATOM, nn=False, pos=False, deps=frozenset(), const=None):
        self.text, self.ty, self.prec, self.nn, self.pos, self.deps, self.const = (
            text, ty, prec, nn or pos, pos, deps, const)

    def __repr__(self):
        return f"<flexjit traced {self.ty}: {self.text}>"

    __str__ = __format__ = lambda self, *a: repr(self)

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return _torch_call(func, args, kwargs or {})

    # -- conversions to Python values: only captured numbers can become constants
    def _concrete(self, what, hint):
        if self.deps and all(isinstance(d, _Capture) and d.kind == "param" for d in self.deps):
            raise _Specialize({d.path for d in self.deps})
        _fail(what, hint)

    def __bool__(self):
        self._concrete("a Python `if`, `while`, `and`, `or`, `not`, `assert` or chained comparison "
                       f"(a < b < c) on a traced value ({self.text})",
                       "the mod must be one expression of its arguments: write torch.where(cond, a, b) "
                       "for if/else, & | ~ for and/or/not, and (a < b) & (b < c) for a < b < c")

    def __index__(self):
        self._concrete(f"a traced value ({self.text}) used as a Python int (range(), a data-dependent loop, "
                       "indexing or slicing a Python list or tuple)",
                       "loops and Python containers cannot depend on the mod's arguments; index a captured "
                       "tensor instead (it becomes a buffer)")

    def __int__(self):
        self._concrete(f"int() or a math.* function on a traced value ({self.text})",
                       "use .to(torch.int64) or .long() to cast, and torch.* functions instead of math.*")

    def __float__(self):
        self._concrete(f"float() or a math.* function on a traced value ({self.text})",
                       "use .float() to cast, and torch.exp / torch.log / ... instead of math.*")

    __complex__ = __float__

    def __iter__(self):
        _fail(f"iterating over a traced value ({self.text})", "mod arguments are scalars")

    def __len__(self):
        _fail(f"len() of a traced value ({self.text})", "mod arguments are scalars")

    def __getitem__(self, idx):
        _fail(f"indexing a traced value ({self.text}[...])",
              "mod arguments are scalars; index captured tensors with them instead")

    def __array__(self, *a, **k):
        _fail(f"converting a traced value ({self.text}) to a numpy array")

    def item(self):
        _fail(f"`.item()` on a traced value ({self.text})",
              "its value is not known while tracing; keep it as a tensor expression")

    def tolist(self):
        _fail(f"`.tolist()` on a traced value ({self.text})",
              "its value is not known while tracing; keep it as a tensor expression")

    def numpy(self):
        _fail(f"`.numpy()` on a traced value ({self.text})")

    # -- tensor-like metadata, as PyTorch's 0-d tensors have
    @property
    def dtype(self):
        return {F: torch.float32, I: torch.int64, B: torch.bool}[self.ty]

    shape = property(lambda self: torch.Size([]))
    ndim = property(lambda self: 0)
    device = property(lambda self: torch.device("cpu"))
    requires_grad = property(lambda self: False)
    is_cuda = property(lambda self: False)

    def dim(self):
        return 0

    def size(self, dim=None):
        if dim is not None:
            _fail(f"size({dim}) of a 0-d traced value")
        return torch.Size([])

    def numel(self):
        return 1

    def is_floating_point(self):
        return self.ty == F

    def __getattr__(self, name):
        handler = _HANDLERS.get(name)
        if handler is not None:
            return lambda *args, **kwargs: handler(True, (self, *args), kwargs)
        if hasattr(torch.Tensor, name):
            _fail(f"Tensor.{name} is not supported on a traced value ({self.text})", _SUPPORTED_HINT)
        raise AttributeError(name)

    # -- operators
    def __add__(a, b): return _binary("+", a, b)
    def __radd__(a, b): return _binary("+", b, a)
    def __sub__(a, b): return _binary("-", a, b)
    def __rsub__(a, b): return _binary("-", b, a)
    def __mul__(a, b): return _binary("*", a, b)
    def __rmul__(a, b): return _binary("*", b, a)
    def __truediv__(a, b): return _binary("/", a, b)
    def __rtruediv__(a, b): return _binary("/", b, a)
    def __floordiv__(a, b): return _binary("//", a, b)
    def __rfloordiv__(a, b): return _binary("//", b, a)
    def __mod__(a, b): return _binary("%", a, b)
    def __rmod__(a, b): return _binary("%", b, a)
    def __pow__(a, b): return _binary("**", a, b)
    def __rpow__(a, b): return _binary("**", b, a)
    def __lt__(a, b): return _binary("<", a, b)
    def __le__(a, b): return _binary("<=", a, b)
    def __gt__(a, b): return _binary(">", a, b)
    def __ge__(a, b): return _binary(">=", a, b)
    def __eq__(a, b): return _binary("==", a, b)
    def __ne__(a, b): return _binary("!=", a, b)
    def __and__(a, b): return _binary("&", a, b)
    def __rand__(a, b): return _binary("&", b, a)
    def __or__(a, b): return _binary("|", a, b)
    def __ror__(a, b): return _binary("|", b, a)
    def __xor__(a, b): return _binary("^", a, b)
    def __rxor__(a, b): return _binary("^", b, a)
    def __neg__(a): return _neg(a)
    def __pos__(a): return a
    def __abs__(a): return _abs(a)
    def __invert__(a): return _invert(a)

    def __round__(self, *a):
        _fail(f"round() on a traced value ({self.text})", "use torch.floor(x + 0.5) if that is what you mean")

    __trunc__ = __floor__ = __ceil__ = lambda self: _fail(
        f"math.trunc / math.floor / math.ceil on a traced value ({self.text})", "use torch.floor / torch.ceil")


def _lit(v):
    """A Python (or numpy) scalar as a literal."""
    if hasattr(v, "item") and not isinstance(v, (torch.Tensor, _V)):
        v = v.item()  # numpy scalars
    if isinstance(v, bool):
        return _V("true" if v else "false", B, nn=True, const=v)
    if isinstance(v, numbers.Integral):
        v = int(v)
        if not -(1 << 63) <= v < (1 << 63):
            _fail(f"the integer {v} does not fit in int64")
        return _V(str(v) if v >= 0 else f"({v})", I, pos=v > 0, nn=v >= 0, const=v)
    if isinstance(v, numbers.Real):
        v = float(v)
        if math.isnan(v):
            _fail("a NaN constant", "to drop a position use -inf in a score_mod or False in a mask_mod")
        if math.isinf(v):
            return _V("inf" if v > 0 else "(-inf)", F, pos=v > 0, const=v)
        return _V(repr(v) if not math.copysign(1.0, v) < 0 else f"({v!r})", F, pos=v > 0, nn=v >= 0, const=v)
    return None


def _typed_lit(v, ty):
    return _lit(bool(v) if ty == B else int(v) if ty == I else float(v))


def _as_v(x, what="an operand"):
    """A traced value, literal or 0-d constant tensor as a _V; None for what Python should try
    another way (NotImplemented)."""
    if isinstance(x, _V):
        return x
    if isinstance(x, _Buffer):
        x._whole(what)
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and not x.requires_grad:
            ty = _dtype_type(x.dtype, f"a {x.dtype} constant tensor")
            return _typed_lit(x.item(), ty)
        _fail(f"a tensor flexjit did not capture (shape {list(x.shape)}, {x.dtype}) meets a traced value",
              "flexjit captures tensors the mod reads from its closure, default arguments, globals or "
              "`self` attributes; one made inside the mod, or reached through a helper it cannot see "
              "(functools.partial, a builtin), is not supported: capture it in a variable the mod reads")
    if isinstance(x, _Obj):
        return None
    if isinstance(x, (bool, numbers.Real)) or (hasattr(x, "dtype") and hasattr(x, "item")):
        return _lit(x)  # Python and numpy scalars
    return None


def _dtype_type(dtype, what):
    if dtype in (torch.float32, torch.float64):
        return F
    if dtype in (torch.int32, torch.int64):
        return I
    if dtype == torch.bool:
        return B
    if dtype in (torch.float16, torch.bfloat16):
        _fail(f"{what} in {dtype}", "flexjit computes mods in float32 and would not round to "
              f"{dtype} as PyTorch does; drop the cast (or cast to torch.float32)")
    if dtype in _WIDENED_DTYPES:
        _fail(f"{what} in {dtype}", "flexjit computes with int64 and would not wrap around as "
              f"{dtype} does; cast to torch.int32 or torch.int64")
    _fail(f"{what} in {dtype}, which flexjit does not support")


def _cast(v, ty):
    if v.ty == ty:
        return v
    if v.const is not None:
        return _typed_lit(v.const, ty)
    return _V(f"{ty}({v.text})", ty, nn=v.nn or ty == B, pos=v.pos, deps=v.deps)


def _call(name, ty, *args, **flags):
    return _V(f"{name}({', '.join(a.text for a in args)})", ty,
              deps=frozenset().union(*(a.deps for a in args)), **flags)


def _op(sym, prec, a, b, ty, **flags):
    return _V(f"{_wrap(a, prec)} {sym} {_wrap(b, prec + 1)}", ty, prec, deps=a.deps | b.deps, **flags)


def _num(a, b):
    return F if F in (a.ty, b.ty) else I


def _pymod_int(a, b):
    """Python's a % b on ints (the divisor's sign) from C's (the dividend's): exact for all signs."""
    if a.nn and b.pos:
        return _op("%", _MUL, a, b, I, nn=True)
    r = _op("%", _MUL, a, b, I)
    return _op("%", _MUL, _op("+", _ADD, r, b, I), b, I, nn=b.pos)


def _floordiv_int(a, b):
    if a.nn and b.pos:
        return _op("/", _MUL, a, b, I, nn=True)
    return _op("/", _MUL, _op("-", _ADD, a, _pymod_int(a, b), I), b, I, nn=a.nn and b.pos)


def _binary(sym, a, b):
    va, vb = _as_v(a), _as_v(b)
    if va is None or vb is None:
        return NotImplemented
    a, b = va, vb
    if a.const is not None and b.const is not None and sym not in ("&", "|", "^"):
        return _fold(sym, a.const, b.const)
    if sym in ("+", "-", "*"):
        ty = _num(a, b)
        # sum() starts from 0, products from 1: drop the identity so the text stays short.
        unit = 1 if sym == "*" else 0
        if sym != "-" and a.const is not None and not isinstance(a.const, bool) and a.const == unit and b.ty != B:
            return _cast(b, ty)
        if b.const is not None and not isinstance(b.const, bool) and b.const == unit and a.ty != B:
            return _cast(a, ty)
        prec = _ADD if sym != "*" else _MUL
        nn = sym != "-" and a.nn and b.nn
        return _op(sym, prec, a, b, ty, nn=nn, pos=sym != "-" and nn and (
            (a.pos and b.pos) if sym == "*" else (a.pos or b.pos)))
    if sym == "/":
        if a.ty != F and b.ty != F:
            a = _cast(a, F)
        return _op("/", _MUL, a, b, F, nn=a.nn and b.nn)
    if sym == "//":
        if _num(a, b) == I:
            return _floordiv_int(a, b)
        return _call("floor", F, _op("/", _MUL, a, b, F))
    if sym == "%":
        if _num(a, b) == I:
            return _pymod_int(a, b)
        # torch.remainder on floats: a - floor(a / b) * b
        return _op("-", _ADD, a, _op("*", _MUL, _call("floor", F, _op("/", _MUL, a, b, F)), b, F), F)
    if sym == "**":
        return _pow(a, b)
    if sym in ("<", "<=", ">", ">="):
        return _op(sym, _REL, a, b, B)
    if sym in ("==", "!="):
        return _op(sym, _EQ, a, b, B)
    if sym in ("&", "|", "^"):
        if a.ty != B or b.ty != B:
            _fail(f"bitwise `{sym}` on {a.ty} and {b.ty} values ({a.text} {sym} {b.text})",
                  f"flexjit supports `{sym}` on masks (bool values) only")
        for x, y in ((a, b), (b, a)):  # and_masks / or_masks start from a constant
            if x.const is not None and sym != "^":
                return y if bool(x.const) == (sym == "&") else x
        if sym == "&":
            return _op("&&", _AND, a, b, B)
        if sym == "|":
            return _op("||", _OR, a, b, B)
        return _op("!=", _EQ, a, b, B)
    raise AssertionError(sym)


def _fold(sym, x, y):
    """Both operands are literals: compute in Python with PyTorch's semantics."""
    try:
        import operator
        fn = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
              "//": operator.floordiv, "%": operator.mod, "**": operator.pow, "<": operator.lt,
              "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}[sym]
        if sym == "/":
            x = float(x)
        return _lit(fn(x, y))
    except ZeroDivisionError:
        _fail(f"a constant division by zero ({x} {sym} {y})")


def _pow(a, b):
    if b.const is not None and float(b.const).is_integer() and abs(b.const) <= 16:
        n = int(b.const)
        ty = a.ty if b.ty != F else F
        if ty == B:
            ty = I
        if n == 0:
            return _typed_lit(1, ty)
        if n < 0 and ty != F:
            _fail(f"an int raised to a negative power ({a.text} ** {n})", "PyTorch refuses it too")
        base = _cast(a, ty)
        r = base
        for _ in range(abs(n) - 1):
            r = _op("*", _MUL, r, base, ty)
        return r if n > 0 else _op("/", _MUL, _lit(1.0), r, F)
    if b.const == 0.5:
        return _call("sqrt", F, a)
    if b.const == -0.5:
        return _call("rsqrt", F, a)
    if a.const is not None:
        if a.const == 2 and a.ty == I and b.ty != F:
            return _call("int", I, _call("exp2", F, b))
        if a.ty == F or b.ty == F:
            if a.const <= 0:
                _fail(f"a power of the non-positive constant {a.const} ({a.text} ** {b.text})")
            return _call("exp2", F, b if a.const == 2 else _op("*", _MUL, b, _lit(math.log2(a.const)), F))
    if a.ty == F or b.ty == F:
        # x ** y = 2^(y log2 x) for x > 0; x = 0 gives 0 (y > 0) or inf, x < 0 NaN, as pow.
        return _call("exp2", F, _op("*", _MUL, b, _call("log2", F, a), F))
    _fail(f"`**` on ints with a traced exponent ({a.text} ** {b.text})",
          "use a literal exponent, a float operand, or 2 ** x")


def _neg(a):
    a = _as_v(a)
    if a.ty == B:
        _fail(f"unary minus on a bool value (-{a.text})", "PyTorch refuses it too; use ~ for not")
    if a.const is not None:
        return _lit(-a.const)
    return _V(f"-{_wrap(a, _ATOM)}", a.ty, _UNARY, deps=a.deps)


def _abs(a):
    a = _as_v(a)
    if a.const is not None:
        return _lit(abs(a.const))
    return _call("abs", I if a.ty == B else a.ty, a, nn=True, pos=a.pos)


def _invert(a):
    a = _as_v(a)
    if a.ty == B:
        return _V(f"!{_wrap(a, _ATOM)}", B, _UNARY, deps=a.deps)
    if a.ty == I:  # ~x == -x - 1 on two's complement ints
        return _op("-", _ADD, _neg(a), _lit(1), I)
    _fail(f"`~` on a float value (~{a.text})")


def _math(name):
    def fn(a):
        a = _as_v(a)
        if name in ("floor", "ceil") and a.ty != F:
            return a  # PyTorch keeps ints as they are
        return _call(name, F, a, nn=name in ("exp", "exp2", "sqrt", "rsqrt", "sigmoid"))
    return fn


def _minmax(name, a, b):
    a, b = _as_v(a), _as_v(b)
    if a.ty == B and b.ty == B:  # min / max of masks are and / or
        return _op("&&", _AND, a, b, B) if name == "min" else _op("||", _OR, a, b, B)
    ty = _num(a, b)
    nn = (a.nn and b.nn) if name == "min" else (a.nn or b.nn)
    return _call(name, ty, a, b, nn=nn)


def _where(cond, x, y):
    cond, x, y = _as_v(cond), _as_v(x), _as_v(y)
    if cond.const is not None:
        return x if cond.const else y
    ty = B if (x.ty == B and y.ty == B) else _num(x, y)
    return _call("where", ty, cond, x, y, nn=x.nn and y.nn)


# ---------------------------------------------------------------------------------------------
# torch functions and Tensor methods on traced values


_SUPPORTED_HINT = ("supported: arithmetic, comparisons, & | ~ on masks, // % **, torch.where, "
                   "tanh, exp, exp2, log, log2, abs, sqrt, rsqrt, sigmoid, sin, cos, tan, floor, ceil, "
                   "minimum, maximum, clamp, square, relu, sign, and .to(dtype) / .float() / .long() / "
                   ".bool() casts")


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _dtype_cast(x, dtype):
    x = _as_v(x)
    return _cast(x, _dtype_type(dtype, "a cast"))


def _to(method, args, kwargs):
    x, rest = args[0], list(args[1:])
    dtype = kwargs.get("dtype")
    for r in rest:
        if isinstance(r, torch.dtype):
            dtype = r
        elif isinstance(r, (_V, torch.Tensor)):
            dtype = r.dtype
    return _as_v(x) if dtype is None else _dtype_cast(x, dtype)


def _like(value):
    def fn(method, args, kwargs):
        x = _as_v(args[0])
        v = value if value is not None else _arg(args, kwargs, 1, "fill_value")
        dtype = kwargs.get("dtype")
        ty = _dtype_type(dtype, "a constant") if dtype is not None else x.ty
        return _cast(v, ty) if isinstance(v, _V) else _typed_lit(v, ty)
    return fn


def _new(value):
    def fn(method, args, kwargs):
        x = _as_v(args[0])
        size = _arg(args, kwargs, 1, "size", ())
        v = _arg(args, kwargs, 2, "fill_value") if value is None else value  # new_full
        if tuple(size) not in ((), (1,)):
            _fail(f"a new tensor of size {tuple(size)} inside the mod", "mods compute scalars")
        dtype = kwargs.get("dtype")
        ty = _dtype_type(dtype, "a constant") if dtype is not None else x.ty
        return _typed_lit(v, ty)
    return fn


def _new_tensor(method, args, kwargs):
    x, data = _as_v(args[0]), _arg(args, kwargs, 1, "data")
    dtype = kwargs.get("dtype")
    v = _as_v(data)
    if v is None:
        _fail(f"new_tensor({data!r}) inside the mod", "mods compute scalars")
    return _cast(v, _dtype_type(dtype, "a constant")) if dtype is not None else v


def _clamp(method, args, kwargs):
    x = args[0]
    lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    if lo is None and hi is None:
        _fail("clamp() without min or max")
    r = _as_v(x)
    if lo is not None:
        r = _minmax("max", r, lo)
    if hi is not None:
        r = _minmax("min", r, hi)
    return r


def _div(method, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    mode = kwargs.get("rounding_mode")
    if mode is None:
        return _binary("/", a, b)
    if mode == "floor":
        return _binary("//", a, b)
    if mode == "trunc":
        a, b = _as_v(a), _as_v(b)
        if _num(a, b) == I:
            return _op("/", _MUL, a, b, I, nn=a.nn and b.nn)
        q = _op("/", _MUL, a, b, F)
        return _where(_op("<", _REL, q, _lit(0.0), B), _call("ceil", F, q), _call("floor", F, q))
    _fail(f"div(rounding_mode={mode!r})")


def _fmod(method, args, kwargs):
    a, b = _as_v(args[0]), _as_v(_arg(args, kwargs, 1, "other"))
    if _num(a, b) == I:  # C's % takes the dividend's sign, as fmod does
        return _op("%", _MUL, a, b, I, nn=a.nn)
    q = _div(False, (a, b), {"rounding_mode": "trunc"})
    return _op("-", _ADD, a, _op("*", _MUL, q, b, F), F)


def _where_handler(method, args, kwargs):
    if method:  # Tensor.where(self, condition, other)
        return _where(_arg(args, kwargs, 1, "condition"), args[0], _arg(args, kwargs, 2, "other"))
    if len(args) + len(kwargs) < 3:
        _fail("torch.where(cond) with one argument (it returns indices)")
    return _where(_arg(args, kwargs, 0, "condition"), _arg(args, kwargs, 1, "input"),
                  _arg(args, kwargs, 2, "other"))


def _binop_handler(sym, reverse=False):
    def fn(method, args, kwargs):
        a, b = args[0], _arg(args, kwargs, 1, "other")
        if kwargs.get("alpha", 1) != 1:
            b = _binary("*", b, kwargs["alpha"])
        return _binary(sym, b, a) if reverse else _binary(sym, a, b)
    return fn


def _unary_handler(fn):
    return lambda method, args, kwargs: fn(args[0])


def _minmax_handler(name):
    def fn(method, args, kwargs):
        other = _arg(args, kwargs, 1, "other")
        if other is None or not isinstance(other, (_V, torch.Tensor, numbers.Real)) or len(args) > 2:
            _fail(f"torch.{name}() as a reduction", f"use torch.{'minimum' if name == 'min' else 'maximum'}(a, b)")
        return _minmax(name, args[0], other)
    return fn


def _logical(sym):
    def fn(method, args, kwargs):
        a, b = _as_v(args[0]), _as_v(_arg(args, kwargs, 1, "other"))
        return _binary(sym, _cast(a, B), _cast(b, B))
    return fn


def _sign(x):
    x = _as_v(x)
    zero = _typed_lit(0, x.ty)
    return _where(_op(">", _REL, x, zero, B), _typed_lit(1, x.ty),
                  _where(_op("<", _REL, x, zero, B), _typed_lit(-1, x.ty), zero))


def _refuse(what, hint=""):
    def fn(method, args, kwargs):
        x = args[0] if args else None
        _fail(what.format(x.text if isinstance(x, _V) else x), hint)
    return fn


def _real_getitem(method, args, kwargs):
    t = args[0]
    shape = list(t.shape) if isinstance(t, torch.Tensor) else "?"
    _fail(f"indexing a tensor flexjit did not capture (shape {shape}) with a traced value",
          "flexjit captures tensors the mod reads from its closure, default arguments, globals or `self` "
          "attributes; one made inside the mod, or reached through a helper it cannot see, is not supported")


_HANDLERS = {
    "where": _where_handler,
    "to": lambda m, a, k: _to(m, a, k),
    "type": lambda m, a, k: _to(m, a, k) if len(a) > 1 or "dtype" in k else _fail("Tensor.type() without a dtype"),
    "type_as": lambda m, a, k: _dtype_cast(a[0], a[1].dtype),
    "float": lambda m, a, k: _cast(_as_v(a[0]), F),
    "double": lambda m, a, k: _cast(_as_v(a[0]), F),
    "int": lambda m, a, k: _cast(_as_v(a[0]), I),
    "long": lambda m, a, k: _cast(_as_v(a[0]), I),
    "bool": lambda m, a, k: _cast(_as_v(a[0]), B),
    "half": lambda m, a, k: _dtype_cast(a[0], torch.float16),
    "bfloat16": lambda m, a, k: _dtype_cast(a[0], torch.bfloat16),
    "clamp": _clamp, "clip": _clamp,
    "clamp_min": lambda m, a, k: _minmax("max", a[0], _arg(a, k, 1, "min")),
    "clamp_max": lambda m, a, k: _minmax("min", a[0], _arg(a, k, 1, "max")),
    "minimum": lambda m, a, k: _minmax("min", a[0], _arg(a, k, 1, "other")),
    "maximum": lambda m, a, k: _minmax("max", a[0], _arg(a, k, 1, "other")),
    "min": _minmax_handler("min"), "max": _minmax_handler("max"),
    "abs": _unary_handler(_abs), "absolute": _unary_handler(_abs),
    "neg": _unary_handler(_neg), "negative": _unary_handler(_neg),
    "square": lambda m, a, k: _binary("*", a[0], a[0]),
    "reciprocal": lambda m, a, k: _binary("/", 1.0, a[0]),
    "relu": lambda m, a, k: _minmax("max", a[0], _typed_lit(0, _as_v(a[0]).ty)),
    "sign": _unary_handler(_sign), "sgn": _unary_handler(_sign),
    "add": _binop_handler("+"), "__add__": _binop_handler("+"), "__radd__": _binop_handler("+", True),
    "sub": _binop_handler("-"), "subtract": _binop_handler("-"), "__sub__": _binop_handler("-"),
    "__rsub__": _binop_handler("-", True), "rsub": _binop_handler("-", True),
    "mul": _binop_handler("*"), "multiply": _binop_handler("*"), "__mul__": _binop_handler("*"),
    "__rmul__": _binop_handler("*", True),
    "div": _div, "divide": _div, "true_divide": _binop_handler("/"), "__truediv__": _binop_handler("/"),
    "__rtruediv__": _binop_handler("/", True), "__rdiv__": _binop_handler("/", True),
    "floor_divide": _binop_handler("//"), "__floordiv__": _binop_handler("//"),
    "__rfloordiv__": _binop_handler("//", True),
    "remainder": _binop_handler("%"), "__mod__": _binop_handler("%"), "__rmod__": _binop_handler("%", True),
    "fmod": _fmod,
    "pow": _binop_handler("**"), "__pow__": _binop_handler("**"), "__rpow__": _binop_handler("**", True),
    "eq": _binop_handler("=="), "ne": _binop_handler("!="), "lt": _binop_handler("<"),
    "le": _binop_handler("<="), "gt": _binop_handler(">"), "ge": _binop_handler(">="),
    "__eq__": _binop_handler("=="), "__ne__": _binop_handler("!="), "__lt__": _binop_handler("<"),
    "__le__": _binop_handler("<="), "__gt__": _binop_handler(">"), "__ge__": _binop_handler(">="),
    "not_equal": _binop_handler("!="), "less": _binop_handler("<"), "less_equal": _binop_handler("<="),
    "greater": _binop_handler(">"), "greater_equal": _binop_handler(">="),
    "__and__": _binop_handler("&"), "__or__": _binop_handler("|"), "__xor__": _binop_handler("^"),
    "__rand__": _binop_handler("&", True), "__ror__": _binop_handler("|", True),
    "__rxor__": _binop_handler("^", True),
    "bitwise_and": _binop_handler("&"), "bitwise_or": _binop_handler("|"), "bitwise_xor": _binop_handler("^"),
    "logical_and": _logical("&"), "logical_or": _logical("|"), "logical_xor": _logical("^"),
    "logical_not": lambda m, a, k: _invert(_cast(_as_v(a[0]), B)),
    "bitwise_not": _unary_handler(_invert), "__invert__": _unary_handler(_invert),
    "full_like": _like(None), "zeros_like": _like(0), "ones_like": _like(1),
    "new_ones": _new(1), "new_zeros": _new(0), "new_full": _new(None), "new_tensor": _new_tensor,
    "item": _refuse("`.item()` on a traced value ({})", "its value is not known while tracing"),
    "tolist": _refuse("`.tolist()` on a traced value ({})", "its value is not known while tracing"),
    "__getitem__": _real_getitem,
}
for _name in ("tanh", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "sigmoid", "sin", "cos", "tan",
              "floor", "ceil"):
    _HANDLERS[_name] = _unary_handler(_math(_name))


def _fname(func):
    qual = getattr(func, "__qualname__", "") or getattr(func, "__name__", repr(func))
    if qual.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qual.split(".", 1)[1]
    mod = getattr(func, "__module__", None) or "torch"
    if qual.startswith("_VariableFunctionsClass."):
        qual, mod = qual.split(".", 1)[1], "torch"
    return f"{mod}.{qual}" if mod else qual


def _torch_call(func, args, kwargs):
    name = getattr(func, "__name__", None)
    qual = getattr(func, "__qualname__", "") or ""
    is_method = qual.startswith(("TensorBase.", "Tensor."))
    module = getattr(func, "__module__", None) or ""
    known = is_method or qual.startswith("_VariableFunctionsClass.") or module in ("torch", "torch.functional")
    handler = _HANDLERS.get(name) if known or name in ("sigmoid", "tanh", "relu") else None
    if handler is None:
        _fail(f"{_fname(func)} is not supported", _SUPPORTED_HINT)
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, _Buffer):
            a._whole(_fname(func))
    return handler(is_method, tuple(args), kwargs)


# ---------------------------------------------------------------------------------------------
# Captures: what a mod reads from outside its arguments


class _Capture:
    """One value the trace read from outside the mod's arguments: where from (a path of steps
    from the callable), how it was taken (kind) and the metadata later calls must match."""

    __slots__ = ("path", "kind", "meta", "name", "ty", "scalar", "widen")

    def __init__(self, path, kind, meta, name=None):
        self.path, self.kind, self.meta, self.name = path, kind, meta, name
        self.ty = self.scalar = self.widen = None


def _step(obj, step):
    k, a = step
    if k == "cell":
        return obj.__closure__[a].cell_contents
    if k == "default":
        return obj.__defaults__[a]
    if k == "kwdefault":
        return obj.__kwdefaults__[a]
    if k == "global":
        if torch.compiler.is_compiling() and obj.__module__ in sys.modules:
            # torch.compile cannot read __globals__ of a function created inside the compiled
            # code; the same value through the module object it can (and guards on it).
            return getattr(sys.modules[obj.__module__], a)
        return obj.__globals__[a]
    if k == "item":
        return obj[a]
    if k == "attr":
        return getattr(obj, a)
    if k == "tattr":
        return getattr(type(obj), a)
    if k == "func":
        return obj.__func__
    if k == "self":
        return obj.__self__
    raise AssertionError(k)


def _tensor_meta(t):
    return ("T", t.dtype, tuple(t.shape), t.device.type) if isinstance(t, torch.Tensor) else None


def _number_meta(v):
    if isinstance(v, (bool, torch.Tensor)) or not isinstance(v, numbers.Real):
        return None
    if isinstance(v, numbers.Integral):
        v = int(v)
        if abs(v) > _MAX_INT_PARAM:
            return ("big-int",)
        return ("N", I, (v > 0) - (v < 0))
    v = float(v)
    return ("N", F) if math.isfinite(v) else ("non-finite",)


def _meta(kind, obj):
    if kind == "buffer":
        return _tensor_meta(obj)
    if kind == "param":
        return _number_meta(obj)
    if kind == "const":
        return ("C", type(obj), obj)
    if kind == "fn":
        return ("F", obj.__code__) if isinstance(obj, types.FunctionType) else None
    if kind == "seq":
        return ("S", type(obj), len(obj)) if isinstance(obj, (tuple, list)) else None
    if kind == "dict":
        return ("D", type(obj), tuple(obj)) if isinstance(obj, dict) else None
    if kind == "obj":
        return ("O", type(obj))
    if kind == "method":
        return ("M",) if isinstance(obj, types.MethodType) else None
    if kind == "is":
        return obj
    raise AssertionError(kind)


def _code_names(code, seen=None):
    """Global names a code object and the code nested in it (lambdas, comprehensions) read."""
    seen = set() if seen is None else seen
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType) and c not in seen:
            seen.add(c)
            names |= _code_names(c, seen)
    return names


def _nested_codes(code):
    out = {code}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _nested_codes(c)
    return out


# Taken as they are (guarded by identity): modules, classes, builtins, partials.
_STABLE = (types.ModuleType, type, types.BuiltinFunctionType, types.BuiltinMethodType,
           types.WrapperDescriptorType, types.MethodDescriptorType, functools.partial)
_IMMUTABLE = (str, bytes, type(None), torch.dtype, torch.device, complex, enum.Enum, range, frozenset,
              type(Ellipsis), slice)


class _Obj:
    """Stands in for a captured object (`self` of a method, a module, a config object): reading
    an attribute captures it by path; anything else uses the real object, guarded by identity."""

    __slots__ = ("_real", "_path", "_ctx", "_attrs")

    def __init__(self, real, path, ctx):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_attrs", {})

    def __getattr__(self, name):
        attrs = object.__getattribute__(self, "_attrs")
        if name not in attrs:
            real, path, ctx = (object.__getattribute__(self, n) for n in ("_real", "_path", "_ctx"))
            value = getattr(real, name)
            step = path + (("attr", name),)
            if isinstance(value, types.MethodType) and value.__self__ is real and \
                    isinstance(value.__func__, types.FunctionType):
                attrs[name] = types.MethodType(ctx.sub_function(value.__func__, step + (("func", None),)), self)
            else:
                attrs[name] = ctx.sub(value, step, name)
        return attrs[name]

    def _as_real(self):
        raise _Specialize({object.__getattribute__(self, "_path")})

    def __setattr__(self, name, value):
        _fail(f"setting attribute {name!r} inside the mod")


def _obj_special(name):
    def fn(self, *args, **kwargs):
        self._as_real()
    fn.__name__ = name
    return fn


for _name in ("__call__", "__getitem__", "__iter__", "__len__", "__bool__", "__eq__", "__ne__", "__lt__",
              "__le__", "__gt__", "__ge__", "__hash__", "__contains__", "__add__", "__radd__", "__sub__",
              "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__index__", "__int__",
              "__float__"):
    setattr(_Obj, _name, _obj_special(_name))


class _Buffer:
    """A captured tensor of rank >= 1: indexing it by traced values or ints loads from a buffer."""

    __slots__ = ("cap", "full", "dtype", "prefix")

    def __init__(self, cap, shape, dtype, prefix=()):
        self.cap, self.full, self.dtype, self.prefix = cap, torch.Size(shape), dtype, prefix

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, _Buffer):
                a._whole(_fname(func))
        return _torch_call(func, args, kwargs or {})

    def _whole(self, what):
        _fail(f"the captured tensor '{self.cap.name}' (shape {list(self.full)}) is used whole in {what}",
              "a mod reads captured tensors element by element: index it with the mod's arguments, e.g. "
              f"{self.cap.name}[h]")

    def __repr__(self):
        return f"<flexjit buffer {self.cap.name} {list(self.full)} {self.dtype}>"

    # Shapes are part of the trace's guards, so a mod may read them.
    shape = property(lambda self: self.full[len(self.prefix):])
    ndim = property(lambda self: len(self.shape))
    device = property(lambda self: torch.device("cpu"))

    def dim(self):
        return self.ndim

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self):
        return math.prod(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rank = len(self.full)
        if len(self.prefix) + len(idx) > rank:
            _fail(f"the captured tensor '{self.cap.name}' (shape {list(self.full)}) indexed with "
                  f"{len(self.prefix) + len(idx)} indices")
        out = list(self.prefix)
        for i in idx:
            d = len(out)
            v = _as_v(i) if not isinstance(i, (slice, type(None), type(Ellipsis), list, tuple)) else None
            if v is None or v.ty == F or v.ty == B:
                what = type(i).__name__ if v is None else f"a {v.ty} value ({v.text})"
                _fail(f"the captured tensor '{self.cap.name}' indexed with {what}",
                      "index captured tensors with int expressions of the mod's arguments, one per dimension "
                      "(slices, None, ..., masks and float indices are not supported)")
            if v.const is not None:
                n = self.full[d]
                c = v.const + n if v.const < 0 else v.const
                if not 0 <= c < n:
                    _fail(f"index {v.const} is out of range for dimension {d} of the captured tensor "
                          f"'{self.cap.name}' (size {n})")
                v = _lit(c)
            out.append(v)
        if len(out) < rank:
            return _Buffer(self.cap, self.full, self.dtype, tuple(out))
        return self.cap.load(out)

    def __getattr__(self, name):
        if name in _HANDLERS or hasattr(torch.Tensor, name):
            self._whole(f"Tensor.{name}")
        raise AttributeError(name)

    def _no(self, *a, **k):
        self._whole("an operator")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _no
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __abs__ = _no
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __and__ = __or__ = __xor__ = __invert__ = _no
    __bool__ = __index__ = __int__ = __float__ = _no
    __hash__ = None


def _load(cap, indices):
    if cap.widen is None:
        dtype = cap.meta[1]
        if dtype not in _BUFFER_DTYPES and dtype not in _WIDENED_DTYPES:
            _fail(f"the captured tensor '{cap.name}' has dtype {dtype}",
                  "buffers may be float32/64, float16, bfloat16, int8/16/32/64, uint8 or bool")
        if len(cap.meta[2]) > 4:
            _fail(f"the captured tensor '{cap.name}' has {len(cap.meta[2])} dimensions; buffers have at most 4")
        cap.widen = dtype in _WIDENED_DTYPES
        cap.ty = _BUFFER_DTYPES.get(dtype, I)
    deps = frozenset({cap}).union(*(i.deps for i in indices))
    if len(indices) == 1:
        text = f"{cap.name}[{indices[0].text}]"
    else:
        text = f"{cap.name}({', '.join(i.text for i in indices)})"
    if cap.ty == B:  # the op stores bool buffers as int32
        return _V(f"bool({text})", B, nn=True, deps=deps)
    return _V(text, cap.ty, nn=cap.meta[1] == torch.uint8, deps=deps)


_Capture.load = _load


class _Ctx:
    """One run of a mod on proxies."""

    def __init__(self, root, kind, fn_name, specialise):
        self.root, self.kind, self.fn_name, self.specialise = root, kind, fn_name, specialise
        self.captures = []
        self.names = set(_RESERVED)
        self.codes = set()
        self.fn_subs = {}
        self.globals = {}

    def name(self, hint):
        n = re.sub(r"\W", "_", str(hint or "c")) or "c"
        if not (n[0].isalpha() or n[0] == "_"):
            n = "c_" + n
        if n.lower() == "nan":
            n += "_"
        base, k = n, 2
        while n in self.names:
            n, k = f"{base}_{k}", k + 1
        self.names.add(n)
        return n

    def capture(self, path, kind, obj, name=None):
        cap = _Capture(path, kind, _meta(kind, obj), name)
        self.captures.append(cap)
        return cap

    def sub(self, obj, path, hint):
        """The stand-in for a captured value."""
        if path in self.specialise:
            self.capture(path, "const" if isinstance(obj, (numbers.Real, *_IMMUTABLE)) else "is", obj)
            return obj
        if isinstance(obj, torch.Tensor):
            cap = self.capture(path, "buffer", obj, self.name(hint))
            if obj.dim() == 0:
                cap.scalar = True
                return cap.load([_lit(0)])
            return _Buffer(cap, obj.shape, obj.dtype)
        if isinstance(obj, bool) or isinstance(obj, _IMMUTABLE):
            self.capture(path, "const", obj)
            return obj
        if isinstance(obj, numbers.Real) and not isinstance(obj, _Obj):
            meta = _number_meta(obj)
            if meta is None or meta[0] != "N":
                self.capture(path, "const", obj)
                return obj
            cap = self.capture(path, "param", obj, self.name(hint))
            cap.ty = meta[1]
            if cap.ty == I:
                return _V(f"int({cap.name})", I, nn=meta[2] >= 0, pos=meta[2] > 0, deps=frozenset({cap}))
            return _V(cap.name, F, deps=frozenset({cap}))
        if isinstance(obj, types.FunctionType):
            return self.sub_function(obj, path)
        if isinstance(obj, types.MethodType) and isinstance(obj.__func__, types.FunctionType):
            self.capture(path, "method", obj)
            return types.MethodType(self.sub_function(obj.__func__, path + (("func", None),)),
                                    self.sub(obj.__self__, path + (("self", None),), "self"))
        if isinstance(obj, (_V, _Buffer, _Obj)):
            return obj
        if isinstance(obj, _STABLE):
            self.capture(path, "is", obj)
            return obj
        if type(obj) in (tuple, list) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
            if len(obj) > 256:
                self.capture(path, "is", obj)
                return obj
            self.capture(path, "seq", obj)
            items = [self.sub(x, path + (("item", i),), f"{hint}_{i}") for i, x in enumerate(obj)]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if type(obj) is dict and len(obj) <= 256 and all(isinstance(k, (str, int)) for k in obj):
            self.capture(path, "dict", obj)
            return {k: self.sub(v, path + (("item", k),), k if isinstance(k, str) else f"{hint}_{k}")
                    for k, v in obj.items()}
        self.capture(path, "obj", obj)
        return _Obj(obj, path, self)

    def sub_function(self, fn, path):
        """fn re-made over the same code with its captures replaced. A function reached again
        while it is being replaced (recursion) reuses the copy; one reached by two paths gets two
        copies, each reading its own path."""
        if id(fn) in self.fn_subs:
            return self.fn_subs[id(fn)]
        code = fn.__code__
        self.capture(path, "fn", fn)
        self.codes |= _nested_codes(code)
        cells = tuple(types.CellType() for _ in code.co_freevars)
        g = self.globals.get(id(fn.__globals__))
        fresh = g is None
        if fresh:
            g = self.globals[id(fn.__globals__)] = dict(fn.__globals__)
        new = types.FunctionType(code, g, fn.__name__, None, cells or None)
        self.fn_subs[id(fn)] = new
        new.__qualname__ = fn.__qualname__
        for i, (name, cell) in enumerate(zip(code.co_freevars, fn.__closure__ or ())):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: a name the function defines later
                continue
            cells[i].cell_contents = self.sub(value, path + (("cell", i),), name)
        if fn.__defaults__:
            n = len(fn.__defaults__)
            names = code.co_varnames[code.co_argcount - n:code.co_argcount]
            new.__defaults__ = tuple(self.sub(v, path + (("default", i),), names[i])
                                     for i, v in enumerate(fn.__defaults__))
        if fn.__kwdefaults__:
            new.__kwdefaults__ = {k: self.sub(v, path + (("kwdefault", k),), k)
                                  for k, v in fn.__kwdefaults__.items()}
        # Globals are shared by every function of a module: each name is replaced once, by the
        # first function that reads it (its path reaches the same dict).
        for name in sorted(_code_names(code)):
            if name in fn.__globals__ and (fresh or g[name] is fn.__globals__[name]):
                g[name] = self.sub(fn.__globals__[name], path + (("global", name),), name)
        del self.fn_subs[id(fn)]
        return new


def _root(fn, kind):
    """(function, its path, self or None, self's path) for a mod callable."""
    what = _KIND_NAME[kind]
    if isinstance(fn, types.FunctionType):
        return fn, (), None, None
    if isinstance(fn, types.MethodType) and isinstance(fn.__func__, types.FunctionType):
        return fn.__func__, (("func", None),), fn.__self__, (("self", None),)
    if isinstance(fn, functools.partial):
        raise TraceError(f"flexjit cannot trace a functools.partial {what}: write a def or lambda that calls it")
    if isinstance(fn, torch.nn.Module):
        call = type(fn).forward
        if isinstance(call, types.FunctionType):
            return call, (("tattr", "forward"),), fn, ()
    call = getattr(type(fn), "__call__", None)
    if isinstance(call, types.FunctionType):
        return call, (("tattr", "__call__"),), fn, ()
    raise TraceError(f"flexjit cannot trace the {what} {fn!r}: it is not a Python function, method or "
                     "object with a Python __call__")


def _fn_name(fn, func):
    return getattr(fn, "__qualname__", None) or getattr(func, "__qualname__", "?")


# ---------------------------------------------------------------------------------------------
# The memo and the result of a trace


class Traced:
    """A memoised trace: the text, and the paths (from the traced callable) of the buffers and
    params it reads, which bind() reads again on every call."""

    __slots__ = ("kind", "text", "guards", "buffers", "params", "checks")

    def __init__(self, kind, text, guards, buffers, params):
        self.kind, self.text, self.guards = kind, text, guards
        self.buffers = buffers  # [(name, guard index, scalar, widen)]
        self.params = params    # [(name, guard index)]
        # What torch.compile must check of the values (see _read_plan): constants baked into the
        # text, and the captured tensors' dtype and shape.
        self.checks = tuple((path, "const", meta[2]) if kind == "const" else (path, "buffer", meta[1:3])
                            for path, kind, meta in guards
                            if kind == "buffer" or kind == "const" and
                            isinstance(meta[2], (bool, int, float, str, type(None))))

    def __repr__(self):
        return (f"Traced({_KIND_NAME[self.kind]}: {self.text!r}, buffers={[b[0] for b in self.buffers]}, "
                f"params={[p[0] for p in self.params]})")

    def _live(self, root):
        """The current values at the guard paths, or None if any guard fails."""
        cache = {(): root}
        live = []
        for path, kind, meta in self.guards:
            obj = cache.get(path, _MISSING)
            if obj is _MISSING:
                try:
                    obj = cache[path[:-1]] if path[:-1] in cache else _resolve(root, path[:-1])
                    obj = _step(obj, path[-1])
                except Exception:
                    return None
                cache[path] = obj
            if kind == "is":
                if obj is not meta:
                    return None
            elif _meta(kind, obj) != meta:
                return None
            live.append(obj)
        return live


_MISSING = object()


def _resolve(root, path):
    obj = root
    for s in path:
        obj = _step(obj, s)
    return obj


def _run(fn, kind, specialise):
    func, fpath, self_obj, spath = _root(fn, kind)
    ctx = _Ctx(fn, kind, _fn_name(fn, func), specialise)
    prev = getattr(_tls, "ctx", None)
    _tls.ctx = ctx
    try:
        sub = ctx.sub_function(func, fpath)
        args = [_V(a, F if a == "score" else I, nn=a != "score", deps=frozenset({a})) for a in _MOD_ARGS[kind]]
        if self_obj is not None:
            args.insert(0, ctx.sub(self_obj, spath, "self"))
        try:
            out = sub(*args)
        except (TraceError, _Specialize):
            raise
        except Exception as e:
            loc = _location(tb=e.__traceback__)
            hint = ""
            if isinstance(e, TypeError) and "positional argument" in str(e):
                hint = ("\n  a score_mod takes (score, b, h, q_idx, kv_idx), a mask_mod (b, h, q_idx, kv_idx)")
            raise TraceError(f"flexjit cannot trace the {_KIND_NAME[kind]} {ctx.fn_name}: it raised "
                             f"{type(e).__name__}: {e}" + (f" at {loc}" if loc else "") + hint) from e
        v = _as_v(out, "the result")
        if v is None:
            raise TraceError(f"flexjit cannot trace the {_KIND_NAME[kind]} {ctx.fn_name}: it returned "
                             f"{type(out).__name__} ({out!r}), not a scalar expression")
        v = _cast(v, F if kind == "score" else B)
        text = v.text
        if len(text) > _MAX_TEXT:
            raise TraceError(f"flexjit cannot trace the {_KIND_NAME[kind]} {ctx.fn_name}: its expression is "
                             f"{len(text)} characters long (at most {_MAX_TEXT}); values used several times are "
                             "written out each time, so deep chains of // or % grow quickly")
        return ctx, v
    finally:
        _tls.ctx = prev


def _make(fn, kind):
    specialise = set()
    for _ in range(_MAX_RETRACES):
        _stats["traces"] += 1
        try:
            ctx, v = _run(fn, kind, frozenset(specialise))
        except _Specialize as s:
            specialise |= s.paths
            continue
        break
    else:
        raise TraceError(f"flexjit cannot trace the {_KIND_NAME[kind]}: it kept needing captured values as "
                         "Python constants")
    index = {id(c): i for i, c in enumerate(ctx.captures)}
    guards = tuple((c.path, c.kind, c.meta) for c in ctx.captures)
    used = [d for d in v.deps if isinstance(d, _Capture)]
    buffers = sorted((c.name, index[id(c)], bool(c.scalar), bool(c.widen)) for c in used if c.kind == "buffer")
    params = sorted((c.name, index[id(c)]) for c in used if c.kind == "param")
    text = v.text
    if kind == "score" and text == "score" or kind == "mask" and text == "true":
        text = ""  # identity / no mask
    return Traced(kind, text, guards, buffers, params)


def trace(fn, kind):
    """The memoised Traced for callable `fn` as a "score" or "mask" mod, and the live captured
    values: (traced, live)."""
    func = _root(fn, kind)[0]
    key = (func.__code__, kind)
    entries = _memo.get(key)
    if entries:
        for e in entries:
            live = e._live(fn)
            if live is not None:
                _stats["hits"] += 1
                return e, live
    with _lock:
        _stats["misses"] += 1
        e = _make(fn, kind)
        live = e._live(fn)
        if live is None:  # values changed while tracing (another thread); trace again next call
            raise TraceError(f"flexjit: the captured values of the {_KIND_NAME[kind]} changed while it was traced")
        entries = _memo.setdefault(key, [])
        entries.insert(0, e)
        del entries[_MAX_ENTRIES:]
    return e, live


def _plan(score_mod, mask_mod, taken):
    """The plan for a call's mods (constants only, so that torch.compile can take it as one) and
    the values the callables capture now.

    plan: (score text, mask text, buffers, params, checks): buffers ((name, mod, path, scalar,
    widen), ...) and params ((name, mod, path), ...) say where each value is read (mod 0: score_mod,
    1: mask_mod); checks ((mod, path, kind, expected), ...) what the trace assumed of the values
    it baked in or took the shape of. A traced name that the caller's names (`taken`) or the other
    mod already use is renamed in the text."""
    texts, buffers, params, checks, buffer_values, param_values = [], [], [], [], [], []
    taken = set(taken)
    for which, (mod, kind) in enumerate(((score_mod, "score"), (mask_mod, "mask"))):
        if mod is None or isinstance(mod, str):
            texts.append(mod or "")
            continue
        e, live = trace(mod, kind)
        own = [b[0] for b in e.buffers] + [p[0] for p in e.params]
        renames = {}
        for name in own:
            if name in taken:
                new, k = name, 2
                while new in taken or new in own or new in renames.values():
                    new, k = f"{name}_{k}", k + 1
                renames[name] = new
        taken.update(renames.get(n, n) for n in own)
        text = _rename(e.text, renames) if renames else e.text
        for name, gi, scalar, widen in e.buffers:
            buffers.append((renames.get(name, name), which, e.guards[gi][0], scalar, widen))
            t = live[gi].reshape(1) if scalar else live[gi]
            buffer_values.append(t.to(torch.int32) if widen else t)
        for name, gi in e.params:
            params.append((renames.get(name, name), which, e.guards[gi][0]))
            param_values.append(float(live[gi]))
        checks.extend((which, *c) for c in e.checks)
        texts.append(text)
    plan = (texts[0], texts[1], tuple(buffers), tuple(params), tuple(checks))
    return plan, buffer_values, param_values


def _rename(text, renames):
    """Renames identifiers all at once (so that a -> b, b -> c does not turn a into c)."""
    pattern = r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, renames)) + r")(?![A-Za-z0-9_])"
    return re.sub(pattern, lambda m: renames[m.group(1)], text)


def _split_method(fn):
    if isinstance(fn, types.MethodType):
        return fn.__func__, fn.__self__
    return fn, None


def _read_plan(plan, mods):
    """The values at the plan's paths, read by plain Python that torch.compile can follow (it
    guards on what this reads, so a changed captured value recompiles the graph, never reuses a
    stale text)."""
    _, _, buffers, params, checks = plan
    for which, path, kind, expected in checks:
        v = _resolve(mods[which], path)
        if kind == "const":
            # isinstance, not type(): torch.compile cannot guard on the `type` builtin here.
            ok = (isinstance(v, bool) == isinstance(expected, bool) and isinstance(v, str) == isinstance(expected, str)
                  and v == expected)
        else:
            ok = isinstance(v, torch.Tensor) and v.dtype == expected[0] and tuple(v.shape) == expected[1]
        if not ok:
            raise TraceError(f"flexjit: a value captured by the {_KIND_NAME[('score', 'mask')[which]]} changed "
                             "after torch.compile traced it; call torch._dynamo.reset()")
    buffer_values = []
    for name, which, path, scalar, widen in buffers:
        t = _resolve(mods[which], path)
        if scalar:
            t = t.reshape(1)
        if widen:
            t = t.to(torch.int32)
        buffer_values.append(t)
    param_values = [float(_resolve(mods[which], path)) for name, which, path in params]
    return buffer_values, param_values


_STAND_IN_CONSTANTS = (bool, int, float, str, type(None))


def _stand_in_spec(fn):
    """A description of a plain function made of constants only (its code, module, name, and per
    closure cell / default either a constant or a tensor's dtype and shape), or None when a value
    is of another kind. torch.compile cannot pass a function that was created inside the compiled
    code (a score_mod closure defined in forward) to _constant_plan, but it can pass this."""
    if not isinstance(fn, types.FunctionType):
        return None
    cells = []
    for values in (tuple(c.cell_contents for c in fn.__closure__ or ()), tuple(fn.__defaults__ or ())):
        desc = []
        for v in values:
            if isinstance(v, torch.Tensor):
                desc.append(("tensor", v.dtype, tuple(v.shape)))
            elif isinstance(v, float):
                # A captured float is a runtime param: the plan does not depend on its value (and
                # torch.compile may hold it as a symbolic float, which is no constant).
                desc.append(("float",))
            elif isinstance(v, _STAND_IN_CONSTANTS):
                desc.append(("const", v))
            else:
                return None
        cells.append(tuple(desc))
    return (fn.__code__, fn.__module__, fn.__name__, cells[0], cells[1])


def _from_stand_in_spec(spec):
    """A function with the spec's code whose closure and defaults hold stand-ins: the constants
    themselves and zero tensors of the recorded dtype and shape (a trace reads only those of a
    tensor; the plan's paths then read the real values from the real function)."""
    code, module, name, closure, defaults = spec

    def value(d):
        if d[0] == "tensor":
            return torch.zeros(d[2], dtype=d[1])
        return 0.5 if d[0] == "float" else d[1]

    module_globals = sys.modules[module].__dict__ if module in sys.modules else {}
    return types.FunctionType(code, module_globals, name, tuple(value(d) for d in defaults) or None,
                              tuple(types.CellType(value(d)) for d in closure) or None)


@torch._dynamo.assume_constant_result
def _constant_plan(score_fn, score_self, mask_fn, mask_self, taken):
    # torch.compile runs this once, outside its own tracing, and keeps the result as a constant.
    # It cannot pass a bound method as a constant, but it can pass its function and its object;
    # nor a function created inside the compiled code, but it can pass that one's stand-in spec.
    score_mod = _from_stand_in_spec(score_fn) if isinstance(score_fn, tuple) else score_fn
    mask_mod = _from_stand_in_spec(mask_fn) if isinstance(mask_fn, tuple) else mask_fn
    if score_self is not None:
        score_mod = types.MethodType(score_mod, score_self)
    if mask_self is not None:
        mask_mod = types.MethodType(mask_mod, mask_self)
    return _plan(score_mod, mask_mod, taken)[0]


def _plan_args(mod):
    """A mod as _constant_plan takes it: (function or stand-in spec, self or None)."""
    spec = _stand_in_spec(mod)
    return (spec, None) if spec is not None else _split_method(mod)


def bind(score_mod=None, mask_mod=None, taken=()):
    """(score text, mask text, {buffer name: tensor}, {param name: float}) for a call's mods:
    callables are traced (memoised) and bound to the values they capture now; text and None pass
    through. `taken`: names the caller's own buffers / params use (traced ones are renamed)."""
    taken = tuple(sorted(taken))
    if torch.compiler.is_compiling():
        # Plain functions go to the plan as stand-in specs when they capture only tensors and
        # constants (so closures created inside the compiled code work); anything else as itself.
        plan = _constant_plan(*_plan_args(score_mod), *_plan_args(mask_mod), taken)
        buffer_values, param_values = _read_plan(plan, (score_mod, mask_mod))
    else:
        plan, buffer_values, param_values = _plan(score_mod, mask_mod, taken)
    return (plan[0], plan[1], {b[0]: v for b, v in zip(plan[2], buffer_values)},
            {p[0]: v for p, v in zip(plan[3], param_values)})

"""The backward pass (autograd) of flexjit.flex_attention: gradients of query, key, value and of
the float tensors the mods read (captured by a Python score_mod, or passed by name in `buffers`
for text mods), against a float64 PyTorch reference differentiated by torch autograd.

Covers odd shapes (lengths 1, 17, 97, 129, Lq != Lkv, D 80 and 64, GQA groups of 3, MQA, strided
inputs, an explicit scale), every built-in mod by name, Python-callable mods with learnable
tensors (relative-position bias, ALiBi slopes, a softcapped bias, a tensor read twice, a rank-2
bias, one learnable and one frozen tensor), documents and fully masked rows (zero, never NaN),
fp32 / bf16 / fp16, a finite-difference check of the fp32 kernels (flexjit has no float64 kernel
for gradcheck), bitwise determinism across runs and thread counts, torch.compile(fullgraph=True)
and a toy training loop. Skips (visibly) when the op library is not built."""

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest

import torch

import flexjit

if flexjit.library_path() is None:
    pytest.skip(f"libflexjit_torch_ops.so not found (FLEXJIT_TORCH_OPS={os.environ.get('FLEXJIT_TORCH_OPS')!r}, "
                "else build/): cmake --build build --target flexjit_torch_ops", allow_module_level=True)

import torch.nn.attention.flex_attention as torch_fa
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

# ---- tolerances, in one place ----

# flexjit (fp32 arithmetic) against the float64 reference run on the same (dtype-rounded) inputs.
# atol is relative to the largest magnitude of the tensor compared (at least 1): a buffer's
# gradient sums over every (b, h, q, kv) position that reads it, and grows with the shape.
TOL = {torch.float32: dict(atol=2e-4, rtol=1e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}
FD_RTOL, FD_ATOL = 1e-2, 1e-3  # finite differences in fp32 against the analytic directional derivative


def assert_close(got, want, dtype, what):
    tol = TOL[dtype]
    atol = tol["atol"] * max(1.0, want.abs().max().item())
    assert torch.isfinite(got).all(), f"{what}: not finite"
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=tol["rtol"],
                               msg=lambda m: f"{what} ({dtype}): {m}")


# ---- the reference: plain PyTorch in float64, differentiated by autograd ----


def reference(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """PyTorch FlexAttention's semantics, written out: scores (q k^T) * scale (1/sqrt(D) by
    default) with query head h reading KV head h // (Hq // Hkv), score_mod applied elementwise,
    masked positions -inf, softmax, @ v. The mods are called once, on index tensors that
    broadcast to [B, Hq, Lq, Lkv]. Rows with no key kept give 0, and zero gradients (torch.where,
    so no NaN is ever formed)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    b, h, q_idx, kv_idx = indices(B, Hq, Lq, Lkv)
    s = (q @ k.transpose(-1, -2)) * scale
    if score_mod is not None:
        s = score_mod(s, b, h, q_idx, kv_idx).expand(s.shape)
    keep = keep_mask(mask_mod, B, Hq, Lq, Lkv)
    live = keep.any(-1, keepdim=True)
    s = torch.where(keep, s, float("-inf"))
    p = torch.softmax(torch.where(live, s, 0.0), dim=-1)
    return torch.where(live, p, 0.0) @ v


def indices(B, H, Lq, Lkv):
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lkv).view(1, 1, 1, Lkv))


def keep_mask(mask_mod, B, H, Lq, Lkv):
    """The dense bool [B, H, Lq, Lkv] mask (all True without a mask_mod)."""
    if mask_mod is None:
        return torch.ones(B, H, Lq, Lkv, dtype=torch.bool)
    return mask_mod(*indices(B, H, Lq, Lkv)).expand(B, H, Lq, Lkv)


# ---- the mods: each as flexjit takes it, and as the reference computes it ----


@dataclass
class Case:
    """One call's mods, both ways. make(B, Hq, Lq, Lkv, gen) makes the tensors the mods read
    ({name: tensor}, float ones fp32); `learn` names those that require grad. flexjit(t) gives
    flexjit.flex_attention's keyword arguments and torch(t) the reference's (score_mod, mask_mod),
    t being those tensors (for the reference, the float ones in float64)."""
    flexjit: Callable
    torch: Callable
    make: Callable = lambda B, Hq, Lq, Lkv, gen: {}  # noqa: E731
    learn: tuple = field(default_factory=tuple)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def rel_bias_mod(rel, lkv):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel[h, q_idx - kv_idx + lkv]
    return score_mod


def alibi_mod(slopes):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return score_mod


def softcap_bias_mod(bias, cap):
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh((score + bias[h]) / cap)
    return score_mod


def read_twice_mod(scale_t):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scale_t[h] + scale_t[h]
    return score_mod


def bias2d_mod(bias2d):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias2d[q_idx, kv_idx]
    return score_mod


def learned_and_frozen_mod(rel, frozen, lkv):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel[h, q_idx - kv_idx + lkv] + frozen[kv_idx]
    return score_mod


def batch_head_bias_mod(bh):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bh[b, h]
    return score_mod


def document_mask(doc):
    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]
    return mask_mod


def window_mask(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


def doc_ids(n, gen):
    """int32 [n] ascending document ids: packed documents of random lengths (~8 in 129)."""
    return (torch.rand(n, generator=gen) < 0.06).cumsum(0).to(torch.int32)


def slopes_of(H):
    return torch.exp2(-8.0 * torch.arange(1, H + 1) / H)


def randn(*shape, gen, std=0.5):
    return std * torch.randn(*shape, generator=gen)


def kv_lengths(B, Lkv):
    return torch.tensor([max(1, Lkv - 13 * b - (Lkv // 3 if b % 2 else 0)) for b in range(B)], dtype=torch.int32)


# The built-in mods by their registered names (score_mods/builtin.cpp), learnable buffers passed
# by name, and expression text of our own.
TEXT_CASES = {
    "causal": Case(lambda t: dict(mask_mod="causal"), lambda t: (None, causal)),
    "sliding_window": Case(lambda t: dict(mask_mod="sliding_window", params={"window": 16}),
                           lambda t: (None, window_mask(16))),
    "prefix_lm": Case(lambda t: dict(mask_mod="prefix_lm", params={"prefix": 20}),
                      lambda t: (None, lambda b, h, q, kv: (kv < 20) | (q >= kv))),
    "document": Case(lambda t: dict(mask_mod="document", buffers={"doc": t["doc"]}),
                     lambda t: (None, document_mask(t["doc"])),
                     lambda B, Hq, Lq, Lkv, gen: {"doc": doc_ids(max(Lq, Lkv), gen)}),
    "key_padding": Case(lambda t: dict(mask_mod="key_padding", buffers={"kv_len": t["kv_len"]}),
                        lambda t: (None, lambda b, h, q, kv: kv < t["kv_len"][b]),
                        lambda B, Hq, Lq, Lkv, gen: {"kv_len": kv_lengths(B, Lkv)}),
    "alibi": Case(lambda t: dict(score_mod="alibi", buffers={"slopes": t["slopes"]}),
                  lambda t: (alibi_mod(t["slopes"]), None),
                  lambda B, Hq, Lq, Lkv, gen: {"slopes": slopes_of(Hq)}, ("slopes",)),
    "softcap": Case(lambda t: dict(score_mod="softcap", params={"cap": 2.0}),
                    lambda t: (lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0), None)),
    "rel_pos": Case(lambda t: dict(score_mod="rel_pos", buffers={"rel_bias": t["rel_bias"]}),
                    lambda t: (lambda s, b, h, q, kv: s + t["rel_bias"][torch.clamp(kv - q, -128, 128) + 128], None),
                    lambda B, Hq, Lq, Lkv, gen: {"rel_bias": randn(257, gen=gen)}, ("rel_bias",)),
    "alibi+sliding_window": Case(
        lambda t: dict(score_mod="alibi", mask_mod="sliding_window", buffers={"slopes": t["slopes"]},
                       params={"window": 24}),
        lambda t: (alibi_mod(t["slopes"]), window_mask(24)),
        lambda B, Hq, Lq, Lkv, gen: {"slopes": slopes_of(Hq)}, ("slopes",)),
    "rel_pos+document": Case(
        lambda t: dict(score_mod="rel_pos", mask_mod="document", buffers={"rel_bias": t["rel_bias"], "doc": t["doc"]}),
        lambda t: (lambda s, b, h, q, kv: s + t["rel_bias"][torch.clamp(kv - q, -128, 128) + 128],
                   document_mask(t["doc"])),
        lambda B, Hq, Lq, Lkv, gen: {"rel_bias": randn(257, gen=gen), "doc": doc_ids(max(Lq, Lkv), gen)},
        ("rel_bias",)),
    "softcap+prefix_lm": Case(
        lambda t: dict(score_mod="softcap", mask_mod="prefix_lm", params={"cap": 2.0, "prefix": 20}),
        lambda t: (lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0), lambda b, h, q, kv: (kv < 20) | (q >= kv))),
    "text:bias[h]": Case(lambda t: dict(score_mod="score + bias[h]", buffers={"bias": t["bias"]}),
                         lambda t: (lambda s, b, h, q, kv: s + t["bias"][h], None),
                         lambda B, Hq, Lq, Lkv, gen: {"bias": randn(Hq, gen=gen)}, ("bias",)),
    "text:gain[h]*score+bias2d+causal": Case(
        lambda t: dict(score_mod="score * gain[h] + bias2d(q_idx, kv_idx)", mask_mod="causal",
                       buffers={"gain": t["gain"], "bias2d": t["bias2d"]}),
        lambda t: (lambda s, b, h, q, kv: s * t["gain"][h] + t["bias2d"][q, kv], causal),
        lambda B, Hq, Lq, Lkv, gen: {"gain": 1 + randn(Hq, gen=gen, std=0.2), "bias2d": randn(Lq, Lkv, gen=gen)},
        ("gain", "bias2d")),
}

# Python functions, written as for PyTorch's flex_attention, capturing the tensors they read.
CALLABLE_CASES = {
    "rel_bias+causal": Case(
        lambda t: dict(score_mod=rel_bias_mod(t["rel"], t["lkv"]), mask_mod=causal),
        lambda t: (rel_bias_mod(t["rel"], t["lkv"]), causal),
        lambda B, Hq, Lq, Lkv, gen: {"rel": randn(Hq, Lq + Lkv, gen=gen), "lkv": Lkv}, ("rel",)),
    "alibi_slopes": Case(lambda t: dict(score_mod=alibi_mod(t["slopes"])), lambda t: (alibi_mod(t["slopes"]), None),
                         lambda B, Hq, Lq, Lkv, gen: {"slopes": slopes_of(Hq)}, ("slopes",)),
    "softcap_bias+window": Case(
        lambda t: dict(score_mod=softcap_bias_mod(t["bias"], 3.0), mask_mod=window_mask(40)),
        lambda t: (softcap_bias_mod(t["bias"], 3.0), window_mask(40)),
        lambda B, Hq, Lq, Lkv, gen: {"bias": randn(Hq, gen=gen)}, ("bias",)),
    "read_twice": Case(lambda t: dict(score_mod=read_twice_mod(t["scale_t"])),
                       lambda t: (read_twice_mod(t["scale_t"]), None),
                       lambda B, Hq, Lq, Lkv, gen: {"scale_t": 1 + randn(Hq, gen=gen, std=0.3)}, ("scale_t",)),
    "bias2d": Case(lambda t: dict(score_mod=bias2d_mod(t["bias2d"])), lambda t: (bias2d_mod(t["bias2d"]), None),
                   lambda B, Hq, Lq, Lkv, gen: {"bias2d": randn(Lq, Lkv, gen=gen)}, ("bias2d",)),
    "learned_and_frozen": Case(
        lambda t: dict(score_mod=learned_and_frozen_mod(t["rel"], t["frozen"], t["lkv"])),
        lambda t: (learned_and_frozen_mod(t["rel"], t["frozen"], t["lkv"]), None),
        lambda B, Hq, Lq, Lkv, gen: {"rel": randn(Hq, Lq + Lkv, gen=gen), "frozen": randn(Lkv, gen=gen), "lkv": Lkv},
        ("rel",)),
    "batch_head_bias+document": Case(
        lambda t: dict(score_mod=batch_head_bias_mod(t["bh"]), mask_mod=document_mask(t["doc"])),
        lambda t: (batch_head_bias_mod(t["bh"]), document_mask(t["doc"])),
        lambda B, Hq, Lq, Lkv, gen: {"bh": randn(B, Hq, gen=gen), "doc": doc_ids(max(Lq, Lkv), gen)}, ("bh",)),
}


def _dead_rows_cases():
    """Masks with some rows that keep no key (scattered rows, whole heads' tails, a whole q
    block, a whole batch, everything), under a learnable relative-position bias."""
    def with_rel(mask):
        return Case(lambda t: dict(score_mod=rel_bias_mod(t["rel"], t["lkv"]), mask_mod=mask),
                    lambda t: (rel_bias_mod(t["rel"], t["lkv"]), mask),
                    lambda B, Hq, Lq, Lkv, gen: {"rel": randn(Hq, Lq + Lkv, gen=gen), "lkv": Lkv}, ("rel",))

    def every_fifth_row(b, h, q_idx, kv_idx):
        return (q_idx % 5 != 2) & (kv_idx <= q_idx)

    def heads_tails(b, h, q_idx, kv_idx):
        return (h == 0) | (q_idx < 40)

    def first_q_block(b, h, q_idx, kv_idx):
        return (q_idx >= 130) & (kv_idx <= q_idx)

    def nothing(b, h, q_idx, kv_idx):
        return kv_idx < 0

    key_padding = Case(
        lambda t: dict(score_mod=rel_bias_mod(t["rel"], t["lkv"]), mask_mod="key_padding",
                       buffers={"kv_len": t["kv_len"]}),
        lambda t: (rel_bias_mod(t["rel"], t["lkv"]), lambda b, h, q, kv: kv < t["kv_len"][b]),
        lambda B, Hq, Lq, Lkv, gen: {"rel": randn(Hq, Lq + Lkv, gen=gen), "lkv": Lkv,
                                     "kv_len": torch.tensor([9, 0], dtype=torch.int32)}, ("rel",))
    # name: (case, (B, Hq, Hkv, Lq, Lkv, D))
    return {"every_fifth_row": (with_rel(every_fifth_row), (2, 6, 2, 97, 97, 80)),
            "heads_tails": (with_rel(heads_tails), (1, 4, 2, 97, 129, 80)),
            "first_q_block": (with_rel(first_q_block), (1, 2, 1, 160, 160, 64)),
            "everything": (with_rel(nothing), (1, 2, 2, 17, 33, 80)),
            "key_padding_empty_batch": (key_padding, (2, 6, 2, 97, 97, 80))}


DEAD_ROWS_CASES = _dead_rows_cases()

# (B, Hq, Hkv, Lq, Lkv, D)
MAIN_SHAPE = (2, 6, 2, 97, 129, 80)  # GQA group 3, Lq != Lkv
SHAPES = {
    "B2_H6_Hkv2_L97_D80": (2, 6, 2, 97, 97, 80),
    "B1_H4_MQA_Lq17_Lkv97_D80": (1, 4, 1, 17, 97, 80),
    "B1_H2_L129_D64": (1, 2, 2, 129, 129, 64),
    "B2_H3_Lq1_Lkv17_D80": (2, 3, 3, 1, 17, 80),
    "B1_H6_Hkv2_Lq129_Lkv1_D80": (1, 6, 2, 129, 1, 80),
    "B1_H2_MQA_Lq97_Lkv17_D80": (1, 2, 1, 97, 17, 80),
}
SHAPE_CASES = {"no_mod": Case(lambda t: {}, lambda t: (None, None)),
               "rel_bias+causal": CALLABLE_CASES["rel_bias+causal"]}


# ---- running a case both ways ----


def inputs(shape, seed, dtype=torch.float32):
    """fp32 q, k, v and upstream gradient g (rounded to dtype), and the generator for the mods."""
    B, Hq, Hkv, Lq, Lkv, D = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen)
    k = torch.randn(B, Hkv, Lkv, D, generator=gen)
    v = torch.randn(B, Hkv, Lkv, D, generator=gen)
    g = torch.randn(B, Hq, Lq, D, generator=gen)
    return [t.to(dtype) for t in (q, k, v, g)], gen


def leaves(tensors, learn, double=False):
    """Copies of the mods' tensors: float ones in float64 for the reference, the learnable ones
    requiring grad; ints and Python numbers as they are."""
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().clone().to(torch.float64 if double else t.dtype)
            t.requires_grad_(name in learn)
        out[name] = t
    return out


@dataclass
class Result:
    out: torch.Tensor
    grads: dict  # "q", "k", "v" and the learnable tensors' names -> gradient
    tensors: dict  # the mods' tensors the call used


def run_flexjit(case, q, k, v, g, tensors, **kw):
    qkv = {n: t.detach().clone().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    t = leaves(tensors, case.learn)
    out = flexjit.flex_attention(qkv["q"], qkv["k"], qkv["v"], enable_gqa=True, **case.flexjit(t), **kw)
    assert out.requires_grad
    out.backward(g)
    grads = {n: x.grad for n, x in qkv.items()}
    grads.update({n: t[n].grad for n in case.learn})
    return Result(out.detach(), grads, t)


def run_reference(case, q, k, v, g, tensors, scale=None):
    """The reference on flexjit's inputs as they are (bf16 ones rounded already), in float64."""
    qkv = {n: x.detach().double().requires_grad_() for n, x in zip("qkv", (q, k, v))}
    t = leaves(tensors, case.learn, double=True)
    out = reference(qkv["q"], qkv["k"], qkv["v"], *case.torch(t), scale=scale)
    out.backward(g.double())
    grads = {n: x.grad for n, x in qkv.items()}
    grads.update({n: t[n].grad for n in case.learn})
    return Result(out.detach(), grads, t)


def check_case(case, shape, dtype=torch.float32, seed=0, **kw):
    (q, k, v, g), gen = inputs(shape, seed, dtype)
    B, Hq, Hkv, Lq, Lkv, D = shape
    tensors = case.make(B, Hq, Lq, Lkv, gen)
    got = run_flexjit(case, q, k, v, g, tensors, **kw)
    want = run_reference(case, q, k, v, g, tensors, **kw)
    assert got.out.dtype == dtype and got.out.shape == (B, Hq, Lq, D)
    assert_close(got.out, want.out, dtype, "out")
    for name, x in (("q", q), ("k", k), ("v", v)):
        grad = got.grads[name]
        assert grad is not None and grad.dtype == dtype and grad.shape == x.shape, name
        assert_close(grad, want.grads[name], dtype, f"d{name}")
    for name in case.learn:
        grad = got.grads[name]
        assert grad is not None, f"no gradient for the learnable tensor '{name}'"
        assert grad.dtype == torch.float32 and grad.shape == tensors[name].shape, name
        assert_close(grad, want.grads[name], dtype, f"d{name}")
    for name, t in got.tensors.items():  # tensors that do not require grad get none
        if isinstance(t, torch.Tensor) and name not in case.learn:
            assert t.grad is None, name
    return got, want


# ---- the reference itself, against PyTorch's flex_attention (forward; PyTorch has no CPU backward) ----


@pytest.fixture
def torch_eager_flex():
    # Run PyTorch's eager flex_attention's mods truly eagerly (vmap), as test_callables.py does.
    old = torch_fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    torch_fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    yield
    torch_fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = old


@pytest.mark.parametrize("name", ["alibi+sliding_window", "rel_pos+document", "key_padding", "softcap+prefix_lm",
                                  "rel_bias+causal", "bias2d", "every_fifth_row"])
def test_reference_matches_torch_flex_attention(name, torch_eager_flex):
    case, shape = DEAD_ROWS_CASES.get(name) or ({**TEXT_CASES, **CALLABLE_CASES}[name], MAIN_SHAPE)
    B, Hq, Hkv, Lq, Lkv, D = shape
    (q, k, v, _), gen = inputs(shape, seed=1)
    q, k, v = q.double(), k.double(), v.double()
    t = leaves(case.make(B, Hq, Lq, Lkv, gen), (), double=True)
    score_mod, mask_mod = case.torch(t)
    bm = torch_create_block_mask(mask_mod, B, Hq, Lq, Lkv, device="cpu") if mask_mod else None
    want = torch_flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)
    torch.testing.assert_close(reference(q, k, v, score_mod, mask_mod), want, atol=1e-12, rtol=1e-12)


# ---- gradients against the reference ----


@pytest.mark.parametrize("mods", list(SHAPE_CASES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(shape, mods):
    check_case(SHAPE_CASES[mods], SHAPES[shape])


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_builtin_and_text_mods(name):
    check_case(TEXT_CASES[name], MAIN_SHAPE, seed=2)


@pytest.mark.parametrize("name", list(CALLABLE_CASES))
def test_callable_mods_with_learnable_tensors(name):
    check_case(CALLABLE_CASES[name], MAIN_SHAPE, seed=3)


@pytest.mark.parametrize("name", list(DEAD_ROWS_CASES))
def test_fully_masked_rows_give_zero_output_and_zero_gradients(name):
    case, shape = DEAD_ROWS_CASES[name]
    got, want = check_case(case, shape, seed=4)
    B, Hq, Hkv, Lq, Lkv, D = shape
    dead = ~keep_mask(case.torch(want.tensors)[1], B, Hq, Lq, Lkv).any(-1)  # [B, Hq, Lq]
    assert dead.any() and (name == "everything" or not dead.all())
    assert (got.out[dead] == 0).all(), "fully masked rows' output must be exactly 0"
    assert (got.grads["q"][dead] == 0).all(), "fully masked rows' dq must be exactly 0"
    for grad in got.grads.values():
        assert torch.isfinite(grad).all()
    if name == "everything":
        for grad in got.grads.values():
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["rel_bias+causal", "alibi+sliding_window"])
def test_dtypes(name, dtype):
    # bf16 / fp16 against the reference on the rounded inputs; learnable buffers stay fp32 and
    # so do their gradients.
    case = {**TEXT_CASES, **CALLABLE_CASES}[name]
    check_case(case, MAIN_SHAPE, dtype=dtype, seed=5)


def test_strided_inputs_and_explicit_scale():
    # [B, L, H, D] storage seen as [B, H, L, D] (transposed views), as models hold them.
    B, Hq, Hkv, L, D = 2, 6, 2, 97, 80
    gen = torch.Generator().manual_seed(6)
    base = [torch.randn(B, L, h, D, generator=gen).requires_grad_() for h in (Hq, Hkv, Hkv)]
    g = torch.randn(B, Hq, L, D, generator=gen)
    rel = randn(Hq, 2 * L, gen=gen).requires_grad_()
    q, k, v = (x.transpose(1, 2) for x in base)
    assert not q.is_contiguous()
    out = flexjit.flex_attention(q, k, v, rel_bias_mod(rel, L), scale=0.3, enable_gqa=True, mask_mod="causal")
    out.backward(g)
    ref_base = [x.detach().double().requires_grad_() for x in base]
    ref_rel = rel.detach().double().requires_grad_()
    ref = reference(*(x.transpose(1, 2) for x in ref_base), rel_bias_mod(ref_rel, L), causal, scale=0.3)
    ref.backward(g.double())
    assert_close(out.detach(), ref.detach(), torch.float32, "out")
    for name, x, r in zip("qkv", base, ref_base):
        assert_close(x.grad, r.grad, torch.float32, f"d{name}")
    assert_close(rel.grad, ref_rel.grad, torch.float32, "drel")


def test_gradients_only_where_asked_and_no_grad():
    (q, k, v, g), gen = inputs((1, 4, 2, 33, 33, 80), seed=7)
    rel = randn(4, 66, gen=gen)
    q.requires_grad_()
    out = flexjit.flex_attention(q, k, v, rel_bias_mod(rel, 33), enable_gqa=True, mask_mod="causal")
    out.backward(g)
    assert k.grad is None and v.grad is None and rel.grad is None
    ref_q = q.detach().double().requires_grad_()
    reference(ref_q, k.double(), v.double(), rel_bias_mod(rel.double(), 33), causal).backward(g.double())
    assert_close(q.grad, ref_q.grad, torch.float32, "dq")
    # Only a captured tensor requires grad: the output does too.
    rel.requires_grad_()
    out = flexjit.flex_attention(q.detach(), k, v, rel_bias_mod(rel, 33), enable_gqa=True, mask_mod="causal")
    assert out.requires_grad
    out.backward(g)
    assert rel.grad is not None and torch.isfinite(rel.grad).all()
    # Under no_grad a learnable capture is fine and nothing requires grad.
    with torch.no_grad():
        out = flexjit.flex_attention(q, k, v, rel_bias_mod(rel, 33), enable_gqa=True, mask_mod="causal")
    assert not out.requires_grad


def test_return_lse_keeps_the_same_gradients():
    case = CALLABLE_CASES["rel_bias+causal"]
    (q, k, v, g), gen = inputs(MAIN_SHAPE, seed=8)
    B, Hq, Hkv, Lq, Lkv, D = MAIN_SHAPE
    tensors = case.make(B, Hq, Lq, Lkv, gen)
    plain = run_flexjit(case, q, k, v, g, tensors)
    t = leaves(tensors, case.learn)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = flexjit.flex_attention(*qkv, enable_gqa=True, return_lse=True, **case.flexjit(t))
    assert lse.shape == (B, Hq, Lq)
    out.backward(g)
    for name, x in zip("qkv", qkv):
        assert torch.equal(x.grad, plain.grads[name]), name
    assert torch.equal(t["rel"].grad, plain.grads["rel"])


def test_block_masks_from_both_builders():
    # The same document mask as a BlockMask from PyTorch's create_block_mask and from flexjit's
    # (its partial blocks run the traced mask_mod): the same gradients as the reference.
    case = CALLABLE_CASES["batch_head_bias+document"]
    shape = (2, 6, 2, 129, 129, 80)
    B, Hq, Hkv, L, _, D = shape
    (q, k, v, g), gen = inputs(shape, seed=9)
    tensors = case.make(B, Hq, L, L, gen)
    want = run_reference(case, q, k, v, g, tensors)
    mask = document_mask(tensors["doc"])

    def by_block_mask(bm):
        return Case(lambda t: dict(score_mod=batch_head_bias_mod(t["bh"]), block_mask=bm), case.torch, case.make,
                    case.learn)

    for bm in (torch_create_block_mask(mask, None, None, L, L, device="cpu"),
               flexjit.create_block_mask(mask, None, None, L, L),
               flexjit.create_block_mask(mask, None, None, L, L, BLOCK_SIZE=64)):
        got = run_flexjit(by_block_mask(bm), q, k, v, g, tensors)
        for name, grad in got.grads.items():
            assert_close(grad, want.grads[name], torch.float32, f"d{name}")


# ---- finite differences (flexjit has no float64 kernel, so no gradcheck) ----


def test_finite_differences_fp32():
    # <analytic gradient, u> against (f(x + eps u) - f(x - eps u)) / 2 eps with f the fp32
    # forward, for q, k, v and a learnable bias, through a tanh softcap and a causal mask.
    B, H, L, D = 1, 2, 9, 8
    gen = torch.Generator().manual_seed(10)
    x = {"q": torch.randn(B, H, L, D, generator=gen), "k": torch.randn(B, H, L, D, generator=gen),
         "v": torch.randn(B, H, L, D, generator=gen), "rel": randn(H, 2 * L, gen=gen, std=1.0)}
    g = torch.randn(B, H, L, D, generator=gen)

    def mods(rel):
        def score_mod(score, b, h, q_idx, kv_idx):
            return 2.0 * torch.tanh((score + rel[h, q_idx - kv_idx + L]) / 2.0)
        return dict(score_mod=score_mod, mask_mod="causal")

    def f(t):
        with torch.no_grad():
            out = flexjit.flex_attention(t["q"], t["k"], t["v"], **mods(t["rel"]))
        return (out.double() * g.double()).sum().item()

    leaves_ = {n: t.clone().requires_grad_() for n, t in x.items()}
    flexjit.flex_attention(leaves_["q"], leaves_["k"], leaves_["v"], **mods(leaves_["rel"])).backward(g)
    eps = 1e-2
    for name in x:
        u = torch.randn(x[name].shape, generator=gen)
        analytic = (leaves_[name].grad.double() * u.double()).sum().item()
        numeric = (f({**x, name: x[name] + eps * u}) - f({**x, name: x[name] - eps * u})) / (2 * eps)
        assert abs(analytic - numeric) <= FD_RTOL * max(abs(analytic), abs(numeric)) + FD_ATOL, \
            f"d{name}: analytic {analytic} vs finite differences {numeric}"


def test_gradcheck_fp32():
    # flexjit's kernels take fp32 / bf16 / fp16 (no float64), so gradcheck runs on fp32 inputs,
    # with its step and tolerances sized for fp32 central differences (eps 1e-2 on O(1) values:
    # truncation ~1e-4, rounding ~1e-5), through a causal mask and a learnable relative bias.
    B, H, L, D = 1, 2, 6, 4
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).requires_grad_() for _ in range(3))
    rel = torch.randn(H, 2 * L, generator=gen).requires_grad_()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        assert torch.autograd.gradcheck(
            lambda q, k, v, rel: flexjit.flex_attention(q, k, v, rel_bias_mod(rel, L), mask_mod="causal"),
            (q, k, v, rel), eps=1e-2, atol=5e-3, rtol=5e-3)


# ---- determinism ----


def _grads_once(case, shape, dtype, seed=11):
    (q, k, v, g), gen = inputs(shape, seed, dtype)
    B, Hq, Hkv, Lq, Lkv, D = shape
    got = run_flexjit(case, q, k, v, g, case.make(B, Hq, Lq, Lkv, gen))
    return {"out": got.out, **got.grads}


def _assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs {what}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_thread_counts(dtype):
    # GQA (dK / dV summed over the group) and two learnable tensors summed over every position.
    case = Case(lambda t: dict(score_mod=learned_and_frozen_mod(t["rel"], t["frozen"], t["lkv"]), mask_mod="causal"),
                lambda t: (learned_and_frozen_mod(t["rel"], t["frozen"], t["lkv"]), causal),
                CALLABLE_CASES["learned_and_frozen"].make, ("rel", "frozen"))
    shape = (2, 6, 2, 129, 129, 80)
    first = _grads_once(case, shape, dtype)
    _assert_bitwise_equal(first, _grads_once(case, shape, dtype), "between two runs")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads_once(case, shape, dtype)
        torch.set_num_threads(2)
        two = _grads_once(case, shape, dtype)
    finally:
        torch.set_num_threads(old)
    _assert_bitwise_equal(one, two, "between 1 and 2 threads")
    _assert_bitwise_equal(first, two, f"between {old} and 2 threads")


# ---- torch.compile ----


class LearnedBiasAttention(torch.nn.Module):
    def __init__(self, heads, lkv):
        super().__init__()
        self.rel = torch.nn.Parameter(0.5 * torch.randn(heads, 2 * lkv, generator=torch.Generator().manual_seed(12)))
        self.lkv = lkv

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.rel[h, q_idx - kv_idx + self.lkv]

    def forward(self, q, k, v):
        return flexjit.flex_attention(q, k, v, self.score_mod, enable_gqa=True, mask_mod="causal")


def test_torch_compile_fullgraph_backward_matches_eager():
    torch._dynamo.reset()
    shape = (1, 6, 2, 97, 97, 80)
    (q, k, v, g), _ = inputs(shape, seed=13)
    m = LearnedBiasAttention(6, 97)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")

    def step(fn):
        qkv = [x.clone().requires_grad_() for x in (q, k, v)]
        m.zero_grad()
        out = fn(*qkv)
        out.backward(g)
        return [out.detach(), *(x.grad for x in qkv), m.rel.grad.clone()]

    for _ in range(2):  # the second time after an in-place update of the parameter: read, not baked in
        eager, got = step(m), step(compiled)
        for name, a, b in zip(["out", "dq", "dk", "dv", "drel"], got, eager):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda s, name=name: f"{name}: {s}")
        with torch.no_grad():
            m.rel -= 0.5 * m.rel.grad
    ref_rel = m.rel.detach().double().requires_grad_()
    # The float64 reference agrees too (after the update).
    ref = reference(q.double(), k.double(), v.double(), rel_bias_mod(ref_rel, 97), causal)
    ref.backward(g.double())
    assert_close(step(compiled)[4], ref_rel.grad, torch.float32, "drel")


# ---- training a bias ----


def _train(steps=20, lr=1.0):
    B, H, L, D = 1, 2, 33, 16
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    true_rel = torch.randn(H, 2 * L, generator=gen)
    with torch.no_grad():
        target = flexjit.flex_attention(q, k, v, rel_bias_mod(true_rel, L), mask_mod="causal")
    rel = torch.nn.Parameter(torch.zeros(H, 2 * L))
    opt = torch.optim.SGD([rel], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = flexjit.flex_attention(q, k, v, rel_bias_mod(rel, L), mask_mod="causal")
        loss = ((out - target) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, rel.detach(), (q, k, v, true_rel)


def test_a_learnable_bias_trains_reproducibly():
    losses, rel, (q, k, v, true_rel) = _train()
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.25 * losses[0], losses
    again, rel_again, _ = _train()
    assert again == losses and torch.equal(rel, rel_again)
    # The same loop on the float64 reference follows the same curve.
    L = q.shape[2]
    target = reference(q.double(), k.double(), v.double(), rel_bias_mod(true_rel.double(), L), causal)
    ref_rel = torch.zeros(true_rel.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([ref_rel], lr=1.0)
    for i in range(len(losses)):
        opt.zero_grad()
        loss = ((reference(q.double(), k.double(), v.double(), rel_bias_mod(ref_rel, L), causal) - target) ** 2
                ).sum(-1).mean()
        loss.backward()
        opt.step()
        assert loss.item() == pytest.approx(losses[i], rel=1e-3, abs=1e-5), i


# ---- the lse output ----


def test_gradient_through_the_lse_output():
    # return_lse=True: the lse is differentiable too (d lse / d score = P), as a float64 torch
    # logsumexp of the same scores says; GQA 3, a learnable bias, causal.
    B, Hq, Hkv, L, D = 2, 6, 2, 41, 24
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(B, h, L, D, generator=gen) for h in (Hq, Hkv, Hkv))
    bias = torch.randn(Hq, generator=gen)
    g, gl = torch.randn(B, Hq, L, D, generator=gen), torch.randn(B, Hq, L, generator=gen)

    def score_mod_of(bias):
        return lambda score, b, h, q_idx, kv_idx: score + bias[h] * (kv_idx - q_idx) / 8

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out, lse = flexjit.flex_attention(*leaves[:3], score_mod_of(leaves[3]), mask_mod="causal", enable_gqa=True,
                                      return_lse=True)
    ((out * g).sum() + (lse * gl).sum()).backward()

    ref = [t.double().requires_grad_() for t in (q, k, v, bias)]
    qr, kr, vr, br = ref
    kr_, vr_ = kr.repeat_interleave(Hq // Hkv, 1), vr.repeat_interleave(Hq // Hkv, 1)
    pos = torch.arange(L, dtype=torch.float64)
    s = qr @ kr_.transpose(-2, -1) / math.sqrt(D) + br.view(1, Hq, 1, 1) * (pos.view(1, L) - pos.view(L, 1)) / 8
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    out_ref = torch.softmax(s, -1) @ vr_
    ((out_ref * g.double()).sum() + (lse_ref * gl.double()).sum()).backward()
    torch.testing.assert_close(lse.double(), lse_ref.detach(), atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), leaves, ref):
        assert_close(a.grad, b.grad, torch.float32, name)

"""Python score_mod / mask_mod callables, written exactly as for PyTorch's flex_attention: every
gallery mod against PyTorch's own flex_attention (eager, float64), captured Python numbers and
tensors as runtime params / buffers (changing them recompiles nothing and is never stale), the
trace memo, errors that name the construct and its source line, create_block_mask from a callable
(the same blocks as PyTorch's, usable by both libraries), and torch.compile(fullgraph=True).
Skips (visibly) when the op library is not built."""

import math
import os
from pathlib import Path

import pytest
import torch

import flexjit
from flexjit import gallery

if flexjit.library_path() is None:
    pytest.skip(f"libflexjit_torch_ops.so not found (FLEXJIT_TORCH_OPS={os.environ.get('FLEXJIT_TORCH_OPS')!r}, "
                "else build/): cmake --build build --target flexjit_torch_ops", allow_module_level=True)

import torch.nn.attention.flex_attention as torch_fa
from torch.nn.attention.flex_attention import AuxRequest, and_masks, create_block_mask, or_masks
from torch.nn.attention.flex_attention import flex_attention as torch_flex

TOL = dict(atol=2e-5, rtol=1e-4)  # flexjit fp32 vs PyTorch float64
D = 40
SHAPES = {"B2_H4_Hkv2_L97": (2, 4, 2, 97), "B1_H4_Hkv4_L129": (1, 4, 4, 129)}


@pytest.fixture(autouse=True, scope="module")
def torch_eager_reference():
    # PyTorch's "eager" flex_attention still runs the mods under Dynamo, which fails on a captured
    # Python float (softcap: "can only be of (Tensor, int, SymInt) but got SymFloat"). This flag
    # runs them truly eagerly (vmap), exact for the forward pass that we compare.
    old = torch_fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    torch_fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    yield
    torch_fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = old


def qkv(B, H, HKV, L, seed=0, lkv=None):
    g = torch.Generator().manual_seed(seed)
    lkv = lkv or L
    return (torch.randn(B, H, L, D, generator=g, dtype=torch.float64),
            torch.randn(B, HKV, lkv, D, generator=g, dtype=torch.float64),
            torch.randn(B, HKV, lkv, D, generator=g, dtype=torch.float64))


def reference(q, k, v, score_mod=None, mask_mod=None, B=None, H=None, **kw):
    bm = create_block_mask(mask_mod, B, H, q.shape[-2], k.shape[-2], device="cpu") if mask_mod else None
    return torch_flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, **kw)


def ours(q, k, v, score_mod=None, mask_mod=None, **kw):
    """flexjit in fp32 with PyTorch's BlockMask: the partial blocks run the traced mask_mod."""
    bm = create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2], device="cpu") if mask_mod else None
    return flexjit.flex_attention(q.float(), k.float(), v.float(), score_mod, bm, enable_gqa=True, **kw)


def cached_objects():
    return sum(1 for _ in Path(os.environ["FLEXJIT_CACHE_DIR"]).rglob("*.o"))


# ---- the gallery against PyTorch ----


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(gallery.examples(4, 97)))
def test_gallery_matches_torch_flex_attention(name, shape):
    B, H, HKV, L = SHAPES[shape]
    score_mod, mask_mod = gallery.examples(H, L)[name]
    q, k, v = qkv(B, H, HKV, L)
    ref = reference(q, k, v, score_mod, mask_mod)
    out = ours(q, k, v, score_mod, mask_mod)
    assert out.dtype == torch.float32 and out.shape == (B, H, L, D)
    torch.testing.assert_close(out.double(), ref, **TOL)
    if mask_mod is not None:  # the same through flexjit's own BlockMask builder
        bm = flexjit.create_block_mask(mask_mod, None, None, L, L)
        got = flexjit.flex_attention(q.float(), k.float(), v.float(), score_mod, bm, enable_gqa=True)
        torch.testing.assert_close(got.double(), ref, **TOL)


def test_positional_signature_scale_and_return_aux():
    # PyTorch's positional order (score_mod, block_mask, scale, enable_gqa, return_lse), and
    # return_aux as PyTorch 2.9+ has it.
    q, k, v = qkv(1, 4, 2, 97, seed=1)
    score_mod, mask_mod = gallery.alibi(gallery.alibi_slopes(4)), gallery.causal()
    bm = create_block_mask(mask_mod, None, None, 97, 97, device="cpu")
    ref, aux = torch_flex(q, k, v, score_mod, bm, 0.3, True, return_aux=AuxRequest(lse=True))
    out, lse = flexjit.flex_attention(q.float(), k.float(), v.float(), score_mod, bm, 0.3, True, True)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(lse.double(), aux.lse, **TOL)
    out, got = flexjit.flex_attention(q.float(), k.float(), v.float(), score_mod, bm, 0.3, True,
                                      return_aux=AuxRequest(lse=True))
    torch.testing.assert_close(got.lse.double(), aux.lse, **TOL)


# ---- captured values: params and buffers, never stale, never recompiled ----


def test_changing_a_captured_float_recompiles_nothing():
    cap = 20.0

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    q, k, v = qkv(2, 4, 2, 97, seed=2)
    first = ours(q, k, v, softcap)
    objects, stats = cached_objects(), flexjit.trace.stats()
    cap = 2.0
    second = ours(q, k, v, softcap)
    assert cached_objects() == objects  # the same kernel, cap is a runtime param
    after = flexjit.trace.stats()
    assert after["traces"] == stats["traces"] and after["hits"] == stats["hits"] + 1
    torch.testing.assert_close(second.double(), reference(q, k, v, softcap), **TOL)
    assert not torch.allclose(first, second, atol=1e-3)


def test_repeated_binds_are_memo_hits():
    # A bind of mods already traced re-reads their captured values and traces nothing (its cost,
    # ~10 us, is a benchmark's business, not a test's).
    score_mod = gallery.t5_relative_bias(torch.randn(4, 32))
    mask_mod = gallery.document(torch.zeros(97, dtype=torch.int32))
    flexjit.trace.bind(score_mod, mask_mod)
    before = flexjit.trace.stats()
    for _ in range(20):
        flexjit.trace.bind(score_mod, mask_mod)
    after = flexjit.trace.stats()
    assert after["traces"] == before["traces"]
    assert after["hits"] >= before["hits"] + 20


DOC = torch.tensor([0] * 30 + [1] * 40 + [2] * 27, dtype=torch.int32)


def global_document_mask(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def test_changing_captured_tensors_recompiles_nothing():
    global DOC
    slopes = gallery.alibi_slopes(4)
    score_mod = gallery.alibi(slopes)
    q, k, v = qkv(2, 4, 2, 97, seed=3)
    # A BlockMask without a mask of its own: global_document_mask runs on every block.
    bm = flexjit.create_block_mask(gallery.causal(), None, None, 97, 97, separate_full_blocks=False)
    run = lambda: flexjit.flex_attention(q.float(), k.float(), v.float(), score_mod, bm, enable_gqa=True,  # noqa: E731
                                         mask_mod=global_document_mask)
    run()
    objects, traces = cached_objects(), flexjit.trace.stats()["traces"]
    slopes.mul_(3)  # in place: the closure holds the same tensor
    DOC = torch.tensor([0] * 10 + [1] * 80 + [2] * 7, dtype=torch.int32)  # rebound: a new tensor
    got = run()
    assert cached_objects() == objects and flexjit.trace.stats()["traces"] == traces
    torch.testing.assert_close(got.double(), reference(q, k, v, score_mod, global_document_mask), **TOL)


def test_fresh_closures_from_one_factory_share_the_trace():
    q, k, v = qkv(1, 4, 2, 129, seed=4)
    ours(q, k, v, None, gallery.sliding_window(10))
    traces = flexjit.trace.stats()["traces"]
    for window in (3, 50, 200):
        mask_mod = gallery.sliding_window(window)  # a new function object, same code
        torch.testing.assert_close(ours(q, k, v, None, mask_mod).double(), reference(q, k, v, None, mask_mod),
                                   **TOL)
    assert flexjit.trace.stats()["traces"] == traces


def test_numbers_used_as_python_values_become_guarded_constants():
    # T5 computes math.log(max_distance / max_exact) from its captured ints, so they are baked
    # into the text; another num_buckets is another trace, never the stale one.
    q, k, v = qkv(1, 4, 4, 129, seed=5)
    g = torch.Generator().manual_seed(5)
    for buckets, distance in ((32, 128), (16, 64), (32, 128)):
        score_mod = gallery.t5_relative_bias(torch.randn(4, buckets, generator=g), buckets, distance)
        text = flexjit.trace.bind(score_mod)[0]
        assert "num_buckets" not in text and f"{buckets // 2 - 1}" in text
        torch.testing.assert_close(ours(q, k, v, score_mod).double(), reference(q, k, v, score_mod), **TOL)
    # A captured bool picks a branch in Python: a constant, guarded by its value.

    def make(causal):
        def mask(b, h, q_idx, kv_idx):
            if causal:
                return q_idx >= kv_idx
            return q_idx <= kv_idx
        return mask

    assert flexjit.trace.bind(None, make(True))[1] == "q_idx >= kv_idx"
    assert flexjit.trace.bind(None, make(False))[1] == "q_idx <= kv_idx"


HELPER_SCALE = 0.5


def helper_bias(h, distance):
    return HELPER_SCALE * distance.float() / (h + 1)


class BiasedAttention(torch.nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.register_buffer("head_bias", torch.linspace(-1, 1, heads))
        self.window = 20

    def score_mod(self, score, b, h, q_idx, kv_idx, offset=1.5):
        return score + self.head_bias[h] + helper_bias(h, q_idx - kv_idx) + offset

    def mask_mod(self, b, h, q_idx, kv_idx):
        return torch.abs(q_idx - kv_idx) <= self.window


def test_methods_helpers_defaults_and_torch_combinators():
    q, k, v = qkv(2, 4, 2, 97, seed=6)
    m = BiasedAttention(4)
    text, _, buffers, params = flexjit.trace.bind(m.score_mod, m.mask_mod)
    assert set(buffers) == {"head_bias"} and set(params) == {"HELPER_SCALE", "offset", "window"}
    # PyTorch's create_block_mask refuses bound methods (it counts `self`): wrap them for it.
    torch_score = lambda score, b, h, q_idx, kv_idx: m.score_mod(score, b, h, q_idx, kv_idx)  # noqa: E731
    torch_mask = lambda b, h, q_idx, kv_idx: m.mask_mod(b, h, q_idx, kv_idx)  # noqa: E731
    got = flexjit.flex_attention(q.float(), k.float(), v.float(), m.score_mod, enable_gqa=True, mask_mod=m.mask_mod)
    torch.testing.assert_close(got.double(), reference(q, k, v, torch_score, torch_mask), **TOL)
    m.window = 5  # an attribute read again on every call
    got = flexjit.flex_attention(q.float(), k.float(), v.float(), m.score_mod, enable_gqa=True, mask_mod=m.mask_mod)
    torch.testing.assert_close(got.double(), reference(q, k, v, torch_score, torch_mask), **TOL)
    mask = or_masks(and_masks(gallery.causal(), gallery.sliding_window(30)), gallery.prefix_lm(11))
    torch.testing.assert_close(ours(q, k, v, None, mask).double(), reference(q, k, v, None, mask), **TOL)


def test_same_names_in_both_mods_are_kept_apart():
    q, k, v = qkv(2, 4, 2, 97, seed=7)

    def make_score(bias):
        return lambda score, b, h, q_idx, kv_idx: score + bias[kv_idx]

    def make_mask(bias):
        return lambda b, h, q_idx, kv_idx: bias[q_idx] >= bias[kv_idx]

    score_mod, mask_mod = make_score(torch.randn(97)), make_mask(torch.randint(0, 5, (97,)))
    score_text, mask_text, buffers, _ = flexjit.trace.bind(score_mod, mask_mod)
    assert set(buffers) == {"bias", "bias_2"} and "bias_2" in mask_text
    torch.testing.assert_close(ours(q, k, v, score_mod, mask_mod).double(), reference(q, k, v, score_mod, mask_mod),
                               **TOL)


def test_python_semantics_of_division_modulo_and_casts():
    # // floors and % takes the divisor's sign for negative operands too, / is true division,
    # ** expands, casts truncate; all as PyTorch computes them.
    q, k, v = qkv(1, 4, 4, 97, seed=8)
    period = 7

    def score_mod(score, b, h, q_idx, kv_idx):
        d = kv_idx - q_idx
        x = (d // 5) * 0.25 + (d % period) * 0.1 + (d % -3) * 0.05 + (-d // -4) * 0.01
        y = (d / 40) ** 2 - torch.abs(d).float().sqrt() * 0.1 + (2.5 * d / 17).to(torch.int32) * 0.05
        return score + x + y + torch.where(d % 2 == 0, 0.5, -0.5) + torch.clamp(d, min=-3, max=4) * 0.1

    torch.testing.assert_close(ours(q, k, v, score_mod).double(), reference(q, k, v, score_mod), **TOL)


def test_paged_flex_attention_takes_callables():
    g = torch.Generator().manual_seed(9)
    page, lens = 16, torch.tensor([40, 70], dtype=torch.int32)
    k_cache, v_cache = torch.randn(12, page, 2, D, generator=g), torch.randn(12, page, 2, D, generator=g)
    table = torch.arange(12, dtype=torch.int32).reshape(2, 6)
    q = torch.randn(2, 4, 1, D, generator=g)
    score_mod = gallery.alibi(gallery.alibi_slopes(4))
    got = flexjit.paged_flex_attention(q, k_cache, v_cache, table, lens, score_mod=score_mod,
                                       mask_mod=gallery.causal(), enable_gqa=True)
    want = flexjit.paged_flex_attention(q, k_cache, v_cache, table, lens, score_mod="alibi", mask_mod="causal",
                                        buffers={"slopes": gallery.alibi_slopes(4)}, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ---- unsupported constructs: errors that name the construct and the line ----


def python_if(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return True
    return False


def item_call(score, b, h, q_idx, kv_idx):
    return score * h.item()


def data_dependent_loop(b, h, q_idx, kv_idx):
    keep = q_idx >= kv_idx
    for i in range(q_idx):
        keep = keep & (kv_idx != i)
    return keep


def unsupported_erf(score, b, h, q_idx, kv_idx):
    return score + torch.erf(score)


def unsupported_cumsum(score, b, h, q_idx, kv_idx):
    return torch.cumsum(score, 0)


def math_on_traced(score, b, h, q_idx, kv_idx):
    return score + math.exp(q_idx - kv_idx)


def tensor_made_inside(score, b, h, q_idx, kv_idx):
    return score + torch.arange(8.0)[h]


def bf16_cast(score, b, h, q_idx, kv_idx):
    return score.to(torch.bfloat16)


@pytest.mark.parametrize("fn, kind, what, line", [
    (python_if, "mask", r"a Python `if`, `while`, `and`, `or`, `not`", r"if q_idx >= kv_idx:"),
    (item_call, "score", r"`\.item\(\)` on a traced value \(h\)", r"return score \* h\.item\(\)"),
    (data_dependent_loop, "mask", r"used as a Python int \(range\(\), a data-dependent loop",
     r"for i in range\(q_idx\):"),
    (unsupported_erf, "score", r"torch\.erf is not supported", r"return score \+ torch\.erf\(score\)"),
    (unsupported_cumsum, "score", r"torch\.cumsum is not supported", r"return torch\.cumsum\(score, 0\)"),
    (math_on_traced, "score", r"math\.\* function on a traced value", r"math\.exp\(q_idx - kv_idx\)"),
    (tensor_made_inside, "score", r"indexing a tensor flexjit did not capture \(shape \[8\]\)",
     r"torch\.arange\(8\.0\)\[h\]"),
    (bf16_cast, "score", r"a cast in torch\.bfloat16", r"score\.to\(torch\.bfloat16\)"),
], ids=lambda x: x.__name__ if callable(x) else None)
def test_unsupported_constructs_name_the_construct_and_line(fn, kind, what, line):
    q, k, v = qkv(1, 4, 4, 97)
    mods = dict(score_mod=fn) if kind == "score" else dict(mask_mod=fn)
    with pytest.raises(flexjit.TraceError, match=rf"(?s){what}.*test_callables\.py:\d+: `[^`]*{line}`") as info:
        flexjit.flex_attention(q.float(), k.float(), v.float(), enable_gqa=True, **mods)
    assert fn.__name__ in str(info.value)
    assert isinstance(info.value, TypeError)


def test_other_errors_name_the_mod():
    q, k, v = qkv(1, 4, 4, 97)
    with pytest.raises(flexjit.TraceError, match=r"a score_mod takes \(score, b, h, q_idx, kv_idx\)"):
        flexjit.flex_attention(q.float(), k.float(), v.float(), gallery.causal(), enable_gqa=True)
    with pytest.raises(flexjit.TraceError, match=r"returned tuple"):
        flexjit.flex_attention(q.float(), k.float(), v.float(), lambda s, b, h, qi, kv: (s, s), enable_gqa=True)
    with pytest.raises(TypeError, match=r"must be a Python function .* not int"):
        flexjit.flex_attention(q.float(), k.float(), v.float(), 42, enable_gqa=True)
    # paged decoding has no backward: a captured tensor that requires grad is refused there, not
    # given zero gradients (flex_attention trains it: tests/python/test_backward.py).
    bias = torch.nn.Parameter(torch.zeros(4))
    learned = lambda score, b, h, q_idx, kv_idx: score + bias[h]  # noqa: E731
    k_cache, v_cache = k.float()[0].transpose(0, 1).contiguous(), v.float()[0].transpose(0, 1).contiguous()
    k_cache, v_cache = k_cache.unsqueeze(0), v_cache.unsqueeze(0)  # one page of 97 slots
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.full((1,), 97, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"the tensor 'bias' of a mod requires grad, and paged_flex_attention has no"):
        flexjit.paged_flex_attention(q.float()[:, :, :1], k_cache, v_cache, table, lens, learned, enable_gqa=True)
    with torch.no_grad():
        flexjit.paged_flex_attention(q.float()[:, :, :1], k_cache, v_cache, table, lens, learned, enable_gqa=True)
    out = flexjit.flex_attention(q.float(), k.float(), v.float(), learned, enable_gqa=True)
    out.sum().backward()
    assert bias.grad is not None and bias.grad.shape == (4,)


# ---- create_block_mask from a callable ----


def _dense(num, idx, n_kv_blocks):
    """The [B, H, q_blocks, kv_blocks] 0/1 matrix a (num, indices) pair lists."""
    valid = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
    out = torch.zeros(*num.shape, n_kv_blocks + 1, dtype=torch.int32)
    out.scatter_(-1, torch.where(valid, idx.long(), n_kv_blocks), 1)
    return out[..., :n_kv_blocks]


def _assert_same_blocks(mine, theirs):
    """The same blocks are kept. PyTorch pads the last q / kv block with masked rows, so it calls
    such tail blocks partial where flexjit, which looks at the real positions only, may call
    them full; elsewhere full and partial agree."""
    assert mine.BLOCK_SIZE == theirs.BLOCK_SIZE and mine.seq_lengths == theirs.seq_lengths
    n = -(-theirs.seq_lengths[1] // theirs.BLOCK_SIZE[1])
    full = [_dense(bm.full_kv_num_blocks, bm.full_kv_indices, n) for bm in (mine, theirs)]
    partial = [_dense(bm.kv_num_blocks, bm.kv_indices, n) for bm in (mine, theirs)]
    assert torch.equal(full[0] + partial[0], full[1] + partial[1])
    assert torch.all(full[0] >= full[1])
    tail = torch.zeros_like(full[0], dtype=torch.bool)
    if theirs.seq_lengths[0] % theirs.BLOCK_SIZE[0]:
        tail[..., -1, :] = True
    if theirs.seq_lengths[1] % theirs.BLOCK_SIZE[1]:
        tail[..., :, -1] = True
    assert torch.equal(full[0][~tail], full[1][~tail])


@pytest.mark.parametrize("block_size", [128, (64, 128)], ids=["128", "64x128"])
def test_create_block_mask_from_callables_matches_torch(block_size):
    B, H, L = 2, 4, 300
    g = torch.Generator().manual_seed(10)
    doc = torch.sort(torch.randint(0, 6, (B, L), generator=g, dtype=torch.int32), dim=-1).values
    windows = torch.tensor([16, 64, 200, 3])

    def per_batch_documents(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx - kv_idx <= windows[h]) & (q_idx >= kv_idx)

    q, k, v = qkv(B, H, 2, L, seed=10)
    for mask_mod in (per_batch_documents, gallery.prefix_lm(100), gallery.natten_2d(20, 15, 7, 5)):
        theirs = create_block_mask(mask_mod, B, H, L, L, device="cpu", BLOCK_SIZE=block_size)
        mine = flexjit.create_block_mask(mask_mod, B, H, L, L, device="cpu", BLOCK_SIZE=block_size)
        _assert_same_blocks(mine, theirs)
        assert mine.mask_mod is mask_mod
        ref = torch_flex(q, k, v, block_mask=theirs, enable_gqa=True)
        torch.testing.assert_close(torch_flex(q, k, v, block_mask=mine, enable_gqa=True), ref)
        got = flexjit.flex_attention(q.float(), k.float(), v.float(), block_mask=mine, enable_gqa=True)
        torch.testing.assert_close(got.double(), ref, **TOL)


def test_create_block_mask_without_separate_full_blocks():
    mask_mod = gallery.sliding_window(40)
    theirs = create_block_mask(mask_mod, None, None, 300, 300, device="cpu", separate_full_blocks=False)
    mine = flexjit.create_block_mask(mask_mod, None, None, 300, 300, separate_full_blocks=False)
    assert mine.full_kv_num_blocks is None and torch.equal(mine.to_dense(), theirs.to_dense())


# ---- torch.compile ----


def test_torch_compile_fullgraph_with_callables():
    torch._dynamo.reset()
    cap = 20.0

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    doc = torch.tensor([0] * 40 + [1] * 57, dtype=torch.int32)
    bm = create_block_mask(gallery.document(doc), None, None, 97, 97, device="cpu")
    alibi = gallery.alibi(gallery.alibi_slopes(4))

    def f(q, k, v):
        return (flexjit.flex_attention(q, k, v, softcap, enable_gqa=True)
                + flexjit.flex_attention(q, k, v, alibi, bm, enable_gqa=True))

    q, k, v = (t.float() for t in qkv(1, 4, 2, 97, seed=11))
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    cap = 3.0  # a captured float read again: Dynamo guards on it and retraces, never stale
    doc[:60] = 0  # a captured tensor's values: no retrace needed
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    expected = reference(*(t.double() for t in (q, k, v)), softcap) + torch_flex(
        q.double(), k.double(), v.double(), alibi, bm, enable_gqa=True)
    torch.testing.assert_close(compiled(q, k, v).double(), expected, **TOL)


class SoftcappedAlibi(torch.nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.register_buffer("slopes", gallery.alibi_slopes(heads))
        self.cap = 20.0
        self.mask_mod = gallery.sliding_window(30)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh((score + self.slopes[h] * (kv_idx - q_idx)) / self.cap)

    def forward(self, q, k, v):
        return flexjit.flex_attention(q, k, v, self.score_mod, enable_gqa=True, mask_mod=self.mask_mod)


def test_torch_compile_fullgraph_module_with_method_mods():
    torch._dynamo.reset()
    m = SoftcappedAlibi(4)
    q, k, v = (t.float() for t in qkv(1, 4, 2, 97, seed=12))
    explanation = torch._dynamo.explain(m)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), m(q, k, v))
    m.cap = 4.0
    torch.testing.assert_close(compiled(q, k, v), m(q, k, v))


_GLOBAL_GAIN = torch.tensor([1.0, 0.5, 2.0, 1.5])


class ModsMadeInForward(torch.nn.Module):
    """Mods written inside forward, as in most FlexAttention code: closures over locals (a tensor,
    a float), a default argument and a module global."""

    def __init__(self, variant):
        super().__init__()
        self.rel = torch.nn.Parameter(0.1 * torch.randn(4, 2 * 97, generator=torch.Generator().manual_seed(3)))
        self.cap, self.variant = 20.0, variant

    def forward(self, q, k, v):
        rel, cap = self.rel, self.cap
        if self.variant == "lambda":
            score_mod = lambda score, b, h, q_idx, kv_idx: score + rel[h, q_idx - kv_idx + 97]  # noqa: E731
        elif self.variant == "default":
            score_mod = lambda score, b, h, q_idx, kv_idx, r=rel: score + r[h, q_idx - kv_idx + 97]  # noqa: E731
        else:
            def score_mod(score, b, h, q_idx, kv_idx):
                return cap * torch.tanh((score + rel[h, q_idx - kv_idx + 97]) * _GLOBAL_GAIN[h] / cap)

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return flexjit.flex_attention(q, k, v, score_mod, enable_gqa=True, mask_mod=mask_mod)


@pytest.mark.parametrize("variant", ["lambda", "default", "def_with_float_and_global"])
def test_torch_compile_fullgraph_mods_made_inside_forward(variant):
    torch._dynamo.reset()
    m = ModsMadeInForward(variant)
    q, k, v = (t.float().requires_grad_() for t in qkv(1, 4, 2, 97, seed=14))
    explanation = torch._dynamo.explain(m)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second time with a changed captured float: read again, never stale
        eager = m(q, k, v)
        eager.sum().backward()
        want = [t.grad.clone() for t in (q, k, v, m.rel)]
        for t in (q, k, v, m.rel):
            t.grad = None
        got = compiled(q, k, v)
        got.sum().backward()
        torch.testing.assert_close(got, eager)
        for a, b in zip([t.grad for t in (q, k, v, m.rel)], want):
            torch.testing.assert_close(a, b)
        for t in (q, k, v, m.rel):
            t.grad = None
        m.cap = 3.0

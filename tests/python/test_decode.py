"""Decoding from Python: flexjit.paged_flex_attention against PyTorch's own flex_attention on the
same keys gathered back into contiguous K/V (shuffled pages, NaN in every slot no sequence owns,
GQA, Lq 1 and 4, fp32 / bf16, with and without LSE, mods at absolute positions), the decode
kernel options, merge_attention_states, errors as ValueError, and torch.compile without graph
breaks. Skips (visibly) when the op library is not built."""

import os

import pytest
import torch

import flexjit

if flexjit.library_path() is None:
    pytest.skip(f"libflexjit_torch_ops.so not found (FLEXJIT_TORCH_OPS={os.environ.get('FLEXJIT_TORCH_OPS')!r}, "
                "else build/): cmake --build build --target flexjit_torch_ops", allow_module_level=True)

from torch.nn.attention.flex_attention import AuxRequest, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

HQ, HKV, D = 8, 2, 64  # GQA group 4
LENS = [300, 77, 0, 129]  # a long sequence, short ones, and an unused batch slot
WINDOW = 64
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def slopes():
    return torch.exp2(-8.0 * torch.arange(1, HQ + 1) / HQ)


def make_paged(dtype, page_size, lens=LENS, seed=0):
    """A paged cache holding len(lens) sequences: pages in shuffled order, NaN in every page or
    slot no sequence owns, -1 in the table columns past each sequence. Also returns the same keys
    as contiguous [B, Hkv, max_len, D] (zeros past each end) for the reference."""
    g = torch.Generator().manual_seed(seed)
    B, max_len = len(lens), max(lens)
    max_pages = -(-max_len // page_size) + 1  # a spare column, never read
    used = sum(-(-n // page_size) for n in lens)
    num_pages = used + 5
    k_full = torch.randn(B, HKV, max_len, D, generator=g).to(dtype)
    v_full = torch.randn(B, HKV, max_len, D, generator=g).to(dtype)
    k_cache = torch.full((num_pages, page_size, HKV, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    block_table = torch.full((B, max_pages), -1, dtype=torch.int32)
    order = torch.randperm(num_pages, generator=g).tolist()
    for b, n in enumerate(lens):
        k_full[b, :, n:] = 0
        v_full[b, :, n:] = 0
        for p in range(-(-n // page_size)):
            page = order.pop()
            block_table[b, p] = page
            keys = slice(p * page_size, min(n, (p + 1) * page_size))
            count = keys.stop - keys.start
            k_cache[page, :count] = k_full[b, :, keys].transpose(0, 1)
            v_cache[page, :count] = v_full[b, :, keys].transpose(0, 1)
    return k_cache, v_cache, block_table, torch.tensor(lens, dtype=torch.int32), k_full, v_full


def make_q(dtype, lq, B=len(LENS), seed=1):
    return torch.randn(B, HQ, lq, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Mod:
    """A mod as flexjit text and as PyTorch functions at absolute positions: PyTorch's q_idx is
    the row in the query block, so the query's position is q_idx + off[b], off = seq_lens - Lq."""

    def __init__(self, name, lens, lq):
        self.score_mod = self.mask_mod = None
        self.buffers, self.params = {}, {}
        lens_t = torch.tensor(lens)
        off = lens_t - lq
        self.torch_score = None
        extra = lambda b, h, q, kv: torch.ones_like(q, dtype=torch.bool)  # noqa: E731
        if name in ("causal", "alibi"):
            self.mask_mod = "causal"
            extra = lambda b, h, q, kv: q + off[b] >= kv  # noqa: E731
        if name == "alibi":
            s = slopes()
            self.score_mod, self.buffers = "alibi", {"slopes": s}
            self.torch_score = lambda x, b, h, q, kv: x + s[h] * (kv - (q + off[b]))  # noqa: E731
        if name == "sliding_window":
            self.mask_mod, self.params = "sliding_window", {"window": WINDOW}
            extra = lambda b, h, q, kv: (q + off[b] >= kv) & (q + off[b] - kv < WINDOW)  # noqa: E731
        # Keys past a sequence's end are zero padding in the gathered K/V: mask them out.
        self.torch_mask = lambda b, h, q, kv: (kv < lens_t[b]) & extra(b, h, q, kv)  # noqa: E731


def torch_reference(mod, q, k_full, v_full, lens):
    """PyTorch eager flex_attention in fp32 on the gathered K/V; rows of an unused slot (len 0)
    are set to flexjit's contract (out 0, lse -inf) whatever PyTorch gives for them."""
    B, _, lq, _ = q.shape
    bm = create_block_mask(mod.torch_mask, B, None, lq, k_full.shape[2], device="cpu")
    out, aux = torch_flex(q.float(), k_full.float(), v_full.float(), score_mod=mod.torch_score, block_mask=bm,
                          enable_gqa=True, return_aux=AuxRequest(lse=True))
    lse = aux.lse.clone()
    for b, n in enumerate(lens):
        if n == 0:
            out[b], lse[b] = 0, float("-inf")
    return out, lse


def paged(mod, q, k_cache, v_cache, block_table, seq_lens, **kw):
    return flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, score_mod=mod.score_mod,
                                        mask_mod=mod.mask_mod, buffers=mod.buffers, params=mod.params,
                                        enable_gqa=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lq", [1, 4], ids=["lq1", "lq4"])
@pytest.mark.parametrize("page_size", [16, 64], ids=["page16", "page64"])
@pytest.mark.parametrize("name", ["noop", "causal", "alibi", "sliding_window"])
def test_paged_matches_torch_flex_attention_on_gathered_kv(name, page_size, lq, dtype):
    k_cache, v_cache, block_table, seq_lens, k_full, v_full = make_paged(dtype, page_size)
    q = make_q(dtype, lq)
    mod = Mod(name, LENS, lq)
    out, lse = paged(mod, q, k_cache, v_cache, block_table, seq_lens, return_lse=True)
    ref, ref_lse = torch_reference(mod, q, k_full, v_full, LENS)
    assert out.dtype == dtype and out.shape == (len(LENS), HQ, lq, D)
    assert lse.dtype == torch.float32 and lse.shape == (len(LENS), HQ, lq)
    assert not out.isnan().any(), "a NaN slot no sequence owns was read"
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    # LSE is computed in fp32 from the same rounded inputs in both, so it is tight for bf16 too.
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    # Without LSE: the same out.
    alone = paged(mod, q, k_cache, v_cache, block_table, seq_lens)
    assert isinstance(alone, torch.Tensor)
    torch.testing.assert_close(alone, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_size", [16, 8], ids=["page16", "page8"])
def test_use_amx_decode_engine_matches_torch(page_size, dtype):
    # The decode kernel's engines through the paged op: USE_AMX 0 (the dot engine) and 1 (AMX
    # tiles: 4 query rows x a GQA group of 4 = 16 rows per KV head; skipped visibly where the
    # host or OS lacks AMX) both match PyTorch's fp32 flex_attention on the gathered K/V.
    k_cache, v_cache, block_table, seq_lens, k_full, v_full = make_paged(dtype, page_size)
    q = make_q(dtype, 4)
    mod = Mod("alibi", LENS, 4)
    ref, ref_lse = torch_reference(mod, q, k_full, v_full, LENS)
    tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    for use_amx in (0, 1):
        try:
            out, lse = paged(mod, q, k_cache, v_cache, block_table, seq_lens, return_lse=True,
                             kernel_options={"USE_AMX": use_amx})
        except ValueError as e:
            if use_amx == 1:
                pytest.skip(f"AMX engine unavailable here: {e}")
            raise
        assert not out.isnan().any(), "a NaN slot no sequence owns was read"
        torch.testing.assert_close(out.float(), ref, **tol)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_unused_slot_gives_zeros_and_lse_minus_inf():
    k_cache, v_cache, block_table, seq_lens, _, _ = make_paged(torch.float32, 16, lens=[0, 33, 0])
    q = make_q(torch.float32, 1, B=3)
    out, lse = flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, mask_mod="causal",
                                            enable_gqa=True, return_lse=True)
    for b in (0, 2):
        assert torch.all(out[b] == 0) and torch.all(lse[b] == float("-inf"))
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def test_registered_mod_makes_its_buffers_for_absolute_positions():
    # alibi without slopes: the registered mod makes the geometric slopes for Hq itself.
    k_cache, v_cache, block_table, seq_lens, _, _ = make_paged(torch.float32, 16)
    q = make_q(torch.float32, 4)
    given = flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, score_mod="alibi",
                                         buffers={"slopes": slopes()}, mask_mod="causal", enable_gqa=True)
    made = flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, score_mod="alibi",
                                        mask_mod="causal", enable_gqa=True)
    torch.testing.assert_close(made, given, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("page_size,partition", [(16, 64), (64, 128)], ids=["page16", "page64"])
def test_partition_size_changes_nothing_numerically(page_size, partition):
    k_cache, v_cache, block_table, seq_lens, _, _ = make_paged(torch.float32, page_size)
    q = make_q(torch.float32, 4)
    mod = Mod("alibi", LENS, 4)
    out, lse = paged(mod, q, k_cache, v_cache, block_table, seq_lens, return_lse=True)
    split, split_lse = paged(mod, q, k_cache, v_cache, block_table, seq_lens, return_lse=True,
                             kernel_options={"PARTITION_SIZE": partition})
    torch.testing.assert_close(split, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_lse, lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"must be a multiple of the page size {page_size}"):
        paged(mod, q, k_cache, v_cache, block_table, seq_lens, kernel_options={"PARTITION_SIZE": page_size + 8})


@pytest.mark.parametrize("force", [True, 1], ids=["bool", "int"])
def test_flex_attention_decode_kernel_options(force):
    # A decode shape on contiguous K/V: the decode kernel by default, the prefill kernel with
    # FORCE_USE_FLEX_ATTENTION; same numbers, and PARTITION_SIZE changes nothing either.
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, HQ, 1, D, generator=g), torch.randn(2, HKV, 1000, D, generator=g), \
        torch.randn(2, HKV, 1000, D, generator=g)
    kw = dict(score_mod="alibi", buffers={"slopes": slopes()}, enable_gqa=True, return_lse=True)
    out, lse = flexjit.flex_attention(q, k, v, **kw)
    for options in ({"FORCE_USE_FLEX_ATTENTION": force}, {"PARTITION_SIZE": 128}):
        got, got_lse = flexjit.flex_attention(q, k, v, kernel_options=options, **kw)
        torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)
    ref, aux = torch_flex(q, k, v, score_mod=lambda x, b, h, qi, kv: x + slopes()[h] * (kv - qi), enable_gqa=True,
                          return_aux=AuxRequest(lse=True))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="FORCE_USE_FLEX_ATTENTION must be a bool or 0 / 1"):
        flexjit.flex_attention(q, k, v, enable_gqa=True, kernel_options={"FORCE_USE_FLEX_ATTENTION": 2})
    with pytest.raises(ValueError, match="PARTITION_SIZE must be >= 0"):
        flexjit.flex_attention(q, k, v, enable_gqa=True, kernel_options={"PARTITION_SIZE": -16})


# ---- merge_attention_states ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_of_two_kv_halves_is_the_whole(dtype):
    g = torch.Generator().manual_seed(5)
    B, L, LKV, SPLIT = 2, 5, 300, 200
    q = torch.randn(B, HQ, L, D, generator=g).to(dtype)
    k, v = (torch.randn(B, HKV, LKV, D, generator=g).to(dtype) for _ in range(2))
    # Row 3 sees no key anywhere; row 4 only keys >= SPLIT, so its first half is empty (lse -inf).
    # kv_idx is relative to the keys a call gets: `off` makes it absolute.
    mask = "q_idx != 3 && (q_idx != 4 || kv_idx + off >= 200)"
    run = lambda kk, vv, off: flexjit.flex_attention(  # noqa: E731
        q, kk, vv, mask_mod=mask, params={"off": off}, enable_gqa=True, return_lse=True)
    whole, whole_lse = run(k, v, 0)
    oa, la = run(k[:, :, :SPLIT], v[:, :, :SPLIT], 0)
    ob, lb = run(k[:, :, SPLIT:], v[:, :, SPLIT:], SPLIT)
    assert torch.isinf(la[:, :, 4]).all() and torch.isinf(whole_lse[:, :, 3]).all()
    oa[:, :, 4] = float("nan")  # a state that kept nothing must not be read
    out, lse = flexjit.merge_attention_states(oa, la, ob, lb)
    assert out.dtype == dtype and out.shape == oa.shape and lse.dtype == torch.float32
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)  # one more bf16 rounding
    torch.testing.assert_close(out, whole, **tol)
    torch.testing.assert_close(lse, whole_lse, atol=2e-5, rtol=2e-5)
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf"))
    # Inputs are left alone; strided views are fine.
    assert torch.isnan(oa[:, :, 4]).all()
    out_t, lse_t = flexjit.merge_attention_states(oa.transpose(1, 2).contiguous().transpose(1, 2), la, ob, lb)
    torch.testing.assert_close(out_t, out, atol=0, rtol=0)
    torch.testing.assert_close(lse_t, lse, atol=0, rtol=0)


def test_merge_errors():
    o, l = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"lse_b must be fp32 \[2, 3, 5\]"):
        flexjit.merge_attention_states(o, l, o, l[:, :, :4])
    with pytest.raises(ValueError, match="out_b must have out_a's shape"):
        flexjit.merge_attention_states(o, l, o[:, :2], l)
    with pytest.raises(ValueError, match="share a dtype"):
        flexjit.merge_attention_states(o, l, o.bfloat16(), l)


# ---- errors ----


def test_bad_inputs_raise_value_error_with_flexjit_message():
    k_cache, v_cache, block_table, seq_lens, _, _ = make_paged(torch.float32, 16)
    q = make_q(torch.float32, 4)
    args = (k_cache, v_cache)
    call = lambda q, bt, sl, **kw: flexjit.paged_flex_attention(q, *args, bt, sl, enable_gqa=True, **kw)  # noqa: E731
    bad = block_table.clone()
    bad[0, 1] = 9999
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9999 is not a page of the cache"):
        call(q, bad, seq_lens)
    short = seq_lens.clone()
    short[1] = 3
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 3 is less than the query length Lq=4"):
        call(q, block_table, short)
    with pytest.raises(ValueError, match=r"block_table has dtype int64; it must be int32: convert it once"):
        call(q, block_table.long(), seq_lens)
    with pytest.raises(ValueError, match=r"up to 16 query rows"):
        call(make_q(torch.float32, 17), block_table, seq_lens)
    with pytest.raises(ValueError, match=r"pass enable_gqa=true"):
        flexjit.paged_flex_attention(q, *args, block_table, seq_lens)
    with pytest.raises(ValueError, match=r"unknown kernel_options \['FORCE_USE_FLEX_ATTENTION'\].*gather the pages"):
        call(q, block_table, seq_lens, kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    with pytest.raises(ValueError, match="param 'windw' is given but neither score_mod nor mask_mod reads it"):
        call(q, block_table, seq_lens, mask_mod="sliding_window", params={"windw": 3})
    with pytest.raises(TypeError, match="must be a Python function"):
        call(q, block_table, seq_lens, mask_mod=42)
    # The next call still works.
    assert call(q, block_table, seq_lens).shape == q.shape


def test_no_backward_is_an_error_not_a_silent_zero_grad():
    k_cache, v_cache, block_table, seq_lens, _, _ = make_paged(torch.float32, 16)
    q = make_q(torch.float32, 1).requires_grad_()
    out, lse = flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, enable_gqa=True,
                                            return_lse=True)
    with pytest.raises(RuntimeError, match="paged_flex_attention has no backward pass"):
        out.sum().backward()
    merged, merged_lse = flexjit.merge_attention_states(out, lse, out, lse)
    with pytest.raises(RuntimeError, match="merge_attention_states has no backward pass"):
        merged.sum().backward()
    with torch.no_grad():
        assert not flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens,
                                                enable_gqa=True).requires_grad


# ---- torch.compile ----


def test_compile_fullgraph_no_graph_break():
    # aot_eager runs Dynamo + AOTAutograd on the Meta kernels without Inductor's codegen (fast).
    torch._dynamo.reset()
    k_cache, v_cache, block_table, seq_lens, k_full, v_full = make_paged(torch.float32, 16)
    q = make_q(torch.float32, 4)
    s = slopes()

    def f(q, k_cache, v_cache, block_table, seq_lens, k_prefix, v_prefix):
        # Cascade attention: a shared prefix (contiguous K/V) + each sequence's paged suffix.
        a, la = flexjit.paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, score_mod="alibi",
                                             mask_mod="causal", buffers={"slopes": s}, enable_gqa=True,
                                             return_lse=True, kernel_options={"PARTITION_SIZE": 64})
        b, lb = flexjit.flex_attention(q, k_prefix, v_prefix, enable_gqa=True, return_lse=True)
        return flexjit.merge_attention_states(a, la, b, lb)

    args = (q, k_cache, v_cache, block_table, seq_lens, k_full[:, :, :50], v_full[:, :, :50])
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_meta_kernels_check_ranks_and_dtypes():
    # Under FakeTensorMode (what torch.compile traces with) bad ranks and dtypes fail at trace time.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, kc = torch.empty(2, HQ, 1, D), torch.empty(10, 16, HKV, D)
        bt, sl = torch.empty(2, 5, dtype=torch.int32), torch.empty(2, dtype=torch.int32)
        out, lse = torch.ops.flexjit.paged_flex_attention(q, kc, kc, bt, sl, enable_gqa=True, return_lse=True)
        assert out.shape == (2, HQ, 1, D) and lse.shape == (2, HQ, 1) and lse.dtype == torch.float32
        with pytest.raises(ValueError, match="block_table must be int32"):
            torch.ops.flexjit.paged_flex_attention(q, kc, kc, bt.long(), sl)
        with pytest.raises(ValueError, match="k_cache must be 4-D"):
            torch.ops.flexjit.paged_flex_attention(q, kc[0], kc, bt, sl)
        o, l = torch.ops.flexjit.merge_attention_states(out, lse, out, lse)
        assert o.shape == out.shape and l.shape == lse.shape
        with pytest.raises(ValueError, match="lse_b must be fp32"):
            torch.ops.flexjit.merge_attention_states(out, lse, out, lse.bfloat16())

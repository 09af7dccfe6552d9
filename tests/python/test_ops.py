"""torch.ops.flexjit against PyTorch FlexAttention: numerics for the suite's mods (fp32, bf16, GQA),
LSE, BlockMask interop both ways, errors as Python exceptions, torch.compile without graph
breaks, no_grad / inference_mode. Skips (visibly) when the op library is not built."""

import os

import pytest
import torch

import flexjit

if flexjit.library_path() is None:
    pytest.skip(f"libflexjit_torch_ops.so not found (FLEXJIT_TORCH_OPS={os.environ.get('FLEXJIT_TORCH_OPS')!r}, "
                "else build/): cmake --build build --target flexjit_torch_ops", allow_module_level=True)

from torch.nn.attention.flex_attention import AuxRequest, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

B, HQ, HKV, L, D = 2, 4, 2, 256, 64

# ---- the suite's mods, each as flexjit text (or a registered name) and as PyTorch functions ----


def slopes():
    return torch.exp2(-8.0 * torch.arange(1, HQ + 1) / HQ)


def doc_ids(n=L):
    lens = [7, 50, 13, 100, 1, 64, 29]
    ids = torch.cat([torch.full((x,), i, dtype=torch.int32) for i, x in enumerate(lens * (n // 40 + 1))])
    return ids[:n].contiguous()


def causal(b, h, q, kv):
    return q >= kv


class Mod:
    def __init__(self, score_mod=None, mask_mod=None, buffers=None, params=None, torch_score=None,
                 torch_mask=None):
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.buffers, self.params = buffers or {}, params or {}
        self.torch_score, self.torch_mask = torch_score, torch_mask


def make_mod(name):
    if name == "noop":
        return Mod()
    if name == "causal":
        return Mod(mask_mod="causal", torch_mask=causal)
    if name == "alibi":  # registered score_mod with its buffer, plus causal
        s = slopes()
        return Mod("alibi", "causal", {"slopes": s}, torch_score=lambda x, b, h, q, kv: x + s[h] * (kv - q),
                   torch_mask=causal)
    if name == "softcap":  # text with a runtime param
        return Mod("cap * tanh(score / cap)", params={"cap": 20.0},
                   torch_score=lambda x, b, h, q, kv: 20.0 * torch.tanh(x / 20.0))
    if name == "sliding_window":  # registered mask_mod with a param
        return Mod(mask_mod="sliding_window", params={"window": 64},
                   torch_mask=lambda b, h, q, kv: (q >= kv) & (q - kv < 64))
    if name == "document":  # text with a captured int32 buffer
        doc = doc_ids()
        return Mod(mask_mod="doc[q_idx] == doc[kv_idx]", buffers={"doc": doc},
                   torch_mask=lambda b, h, q, kv: doc[q] == doc[kv])
    if name == "prefix_lm":
        return Mod(mask_mod="prefix_lm", params={"prefix": 48},
                   torch_mask=lambda b, h, q, kv: (kv < 48) | (q >= kv))
    raise KeyError(name)


MODS = ["noop", "causal", "alibi", "softcap", "sliding_window", "document", "prefix_lm"]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def qkv(dtype, lq=L, lkv=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((HQ, lq), (HKV, lkv), (HKV, lkv))]


def torch_reference(mod, q, k, v, lq=L, lkv=L, **kw):
    """PyTorch eager flex_attention in fp32 on the same (rounded) inputs: (out, lse)."""
    bm = create_block_mask(mod.torch_mask, None, None, lq, lkv, device="cpu") if mod.torch_mask else None
    out, aux = torch_flex(q.float(), k.float(), v.float(), score_mod=mod.torch_score, block_mask=bm,
                          enable_gqa=True, return_aux=AuxRequest(lse=True), **kw)
    return out, aux.lse


def call(mod, q, k, v, **kw):
    return flexjit.flex_attention(q, k, v, score_mod=mod.score_mod, mask_mod=mod.mask_mod, buffers=mod.buffers,
                                  params=mod.params, enable_gqa=True, **kw)


# ---- numerics ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODS)
def test_matches_torch_flex_attention(name, dtype):
    mod = make_mod(name)
    q, k, v = qkv(dtype)
    out, lse = call(mod, q, k, v, return_lse=True)
    ref, ref_lse = torch_reference(mod, q, k, v)
    assert out.dtype == dtype and out.shape == (B, HQ, L, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, HQ, L)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    # LSE is computed in fp32 from the same rounded inputs in both, so it is tight for bf16 too.
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    if dtype == torch.bfloat16:
        # PyTorch's own bf16 result is the baseline: flexjit's error must be of the same order.
        base = torch_flex(q, k, v, score_mod=mod.torch_score, enable_gqa=True,
                          block_mask=create_block_mask(mod.torch_mask, None, None, L, L, device="cpu")
                          if mod.torch_mask else None)
        ours_err, base_err = (out.float() - ref).abs().mean(), (base.float() - ref).abs().mean()
        assert ours_err <= 2 * base_err + 1e-4, (ours_err, base_err)


def test_tails_scale_and_kernel_options():
    # Lengths that are not multiples of any block, a custom scale, explicit kernel tiles.
    mod = make_mod("alibi")
    q, k, v = qkv(torch.float32, lq=97, lkv=300, seed=1)
    out, lse = call(mod, q, k, v, scale=0.3, return_lse=True, kernel_options={"BLOCK_M": 16, "BLOCK_N": 32})
    ref, ref_lse = torch_reference(mod, q, k, v, lq=97, lkv=300, scale=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_use_amx_kernel_option_picks_the_engine(dtype):
    # bf16 and fp16 with USE_AMX 0 (FMA engine) and 1 (AMX tiles; fp16 as bf16 hi + lo halves;
    # skipped visibly where the host or OS lacks them): both match PyTorch's fp32 flex_attention,
    # out and fp32 LSE; USE_AMX on fp32 is refused with a message.
    mod = make_mod("alibi")
    q, k, v = qkv(dtype, lq=97, lkv=300, seed=2)
    ref, ref_lse = torch_reference(mod, q, k, v, lq=97, lkv=300)
    tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    out, lse = call(mod, q, k, v, return_lse=True, kernel_options={"USE_AMX": 0})
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    try:
        out, lse = call(mod, q, k, v, return_lse=True, kernel_options={"USE_AMX": 1})
    except ValueError as e:
        pytest.skip(f"AMX engine unavailable here: {e}")
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="USE_AMX=1 needs bf16 or fp16"):
        call(mod, *qkv(torch.float32), kernel_options={"USE_AMX": 1})


def test_use_wgmma_kernel_option_is_cuda_only():
    # USE_WGMMA picks the CUDA prefill engine: 0 is harmless on the CPU, 1 is refused with the fix.
    mod = make_mod("alibi")
    q, k, v = qkv(torch.bfloat16, lq=17, lkv=33, seed=3)
    ref, _ = torch_reference(mod, q, k, v, lq=17, lkv=33)
    out = call(mod, q, k, v, kernel_options={"USE_WGMMA": 0})
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])
    with pytest.raises(ValueError, match="USE_WGMMA=1 asks for the CUDA wgmma engine"):
        call(mod, q, k, v, kernel_options={"USE_WGMMA": 1})


def test_use_dpbf16_kernel_option_picks_the_bf16_engine():
    # bf16 with USE_DPBF16 0 (FMA or AMX) and 1 (vdpbf16ps; skipped visibly where the host lacks
    # AVX512-BF16): both match PyTorch's fp32 flex_attention; fp32 and a clash with USE_AMX=1 are
    # refused with a message.
    mod = make_mod("alibi")
    q, k, v = qkv(torch.bfloat16, lq=97, lkv=300, seed=2)
    ref, _ = torch_reference(mod, q, k, v, lq=97, lkv=300)
    out = call(mod, q, k, v, kernel_options={"USE_DPBF16": 0})
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])
    with pytest.raises(ValueError, match="USE_DPBF16=1 needs bf16"):
        call(mod, *qkv(torch.float32), kernel_options={"USE_DPBF16": 1})
    with pytest.raises(ValueError, match="set one of them"):
        call(mod, q, k, v, kernel_options={"USE_DPBF16": 1, "USE_AMX": 1})
    try:
        out = call(mod, q, k, v, kernel_options={"USE_DPBF16": 1})
    except ValueError as e:
        pytest.skip(f"vdpbf16ps engine unavailable here: {e}")
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])


def test_follows_torch_set_num_threads():
    # The op runs its TBB launch in an arena of torch.get_num_threads() workers (here 1, not the
    # default of all cores); results are unchanged.
    mod = make_mod("alibi")
    q, k, v = qkv(torch.float32, seed=3)
    expected = call(mod, q, k, v)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = call(mod, q, k, v)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_fully_masked_rows_are_zero_with_lse_minus_inf():
    q, k, v = qkv(torch.float32)
    out, lse = flexjit.flex_attention(q, k, v, mask_mod="q_idx >= 100 && q_idx >= kv_idx", enable_gqa=True,
                                      return_lse=True)
    assert torch.all(out[:, :, :100] == 0) and torch.all(lse[:, :, :100] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 100:]).all()


def test_raw_op_defaults_and_empty_lse():
    q, k, v = qkv(torch.float32)
    out, lse = torch.ops.flexjit.flex_attention(q, k, v, enable_gqa=True)
    assert lse.numel() == 0
    ref = torch_flex(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# ---- BlockMask interop ----


@pytest.mark.parametrize("block_size", [128, (64, 128)], ids=["128", "64x128"])
def test_torch_block_mask_into_flexjit(block_size):
    # Per-batch lengths and per-head windows: a BlockMask with real B and H dims and a tail.
    lq = lkv = 300
    kv_len, win = torch.tensor([300, 170], dtype=torch.int32), torch.tensor([40, 90, 300, 7], dtype=torch.int32)

    def mask(b, h, q, kv):
        return (kv < kv_len[b]) & (q >= kv) & (q - kv < win[h])

    bm = create_block_mask(mask, B, HQ, lq, lkv, device="cpu", BLOCK_SIZE=block_size)
    assert bm.kv_num_blocks.shape[:2] == (B, HQ)
    q, k, v = qkv(torch.float32, lq, lkv)
    out, lse = flexjit.flex_attention(q, k, v, mask_mod="kv_idx < kv_len[b] && q_idx >= kv_idx && q_idx - kv_idx < win[h]",
                                      buffers={"kv_len": kv_len, "win": win}, block_mask=bm, enable_gqa=True,
                                      return_lse=True)
    ref, aux = torch_flex(q, k, v, block_mask=bm, enable_gqa=True, return_aux=AuxRequest(lse=True))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, aux.lse, atol=1e-4, rtol=1e-4)


def test_flexjit_block_mask_into_torch():
    # Ours -> PyTorch's layout: same blocks as PyTorch's create_block_mask, same attention.
    doc = doc_ids(300)
    torch_mask = lambda b, h, q, kv: doc[q] == doc[kv]  # noqa: E731
    ours = flexjit.create_block_mask("document", None, None, 300, 300, buffers={"doc": doc},
                                     torch_mask_mod=torch_mask)
    theirs = create_block_mask(torch_mask, None, None, 300, 300, device="cpu")
    for n_ours, i_ours, n_theirs, i_theirs in [
            (ours.kv_num_blocks, ours.kv_indices, theirs.kv_num_blocks, theirs.kv_indices),
            (ours.full_kv_num_blocks, ours.full_kv_indices, theirs.full_kv_num_blocks, theirs.full_kv_indices)]:
        assert torch.equal(n_ours, n_theirs)
        for row in range(n_ours.shape[-1]):
            n = int(n_ours[0, 0, row])
            assert sorted(i_ours[0, 0, row, :n].tolist()) == sorted(i_theirs[0, 0, row, :n].tolist())
    q, k, v = qkv(torch.float32, 300, 300)
    ref = torch_flex(q, k, v, block_mask=theirs, enable_gqa=True)
    torch.testing.assert_close(torch_flex(q, k, v, block_mask=ours, enable_gqa=True), ref, **TOL[torch.float32])
    # flexjit remembers the mask_mod (and its buffer) it built the mask from.
    torch.testing.assert_close(flexjit.flex_attention(q, k, v, block_mask=ours, enable_gqa=True), ref,
                               **TOL[torch.float32])


def test_bad_block_masks_raise():
    q, k, v = qkv(torch.float32)
    bm = create_block_mask(causal, None, None, L, L, device="cpu")
    op = torch.ops.flexjit.flex_attention
    bad_index = bm.kv_indices.clone()
    bad_index[0, 0, 1, 0] = 7
    with pytest.raises(ValueError, match=r"kv_indices row \(b=0, h=0, q_block=1\) lists block 7"):
        op(q, k, v, mask_mod="causal", enable_gqa=True, kv_num_blocks=bm.kv_num_blocks, kv_indices=bad_index)
    with pytest.raises(ValueError, match="twice"):
        op(q, k, v, enable_gqa=True, kv_num_blocks=bm.kv_num_blocks, kv_indices=bm.kv_indices,
           full_kv_num_blocks=bm.kv_num_blocks, full_kv_indices=bm.kv_indices)
    with pytest.raises(ValueError, match="create the BlockMask for these lengths"):
        op(q[:, :, :100], k, v, enable_gqa=True, kv_num_blocks=bm.kv_num_blocks, kv_indices=bm.kv_indices)
    with pytest.raises(ValueError, match="kv_indices has dtype Float"):
        op(q, k, v, enable_gqa=True, kv_num_blocks=bm.kv_num_blocks, kv_indices=bm.kv_indices.float())
    with pytest.raises(ValueError, match="must be given together"):
        op(q, k, v, enable_gqa=True, kv_num_blocks=bm.kv_num_blocks, kv_indices=bm.kv_indices,
           full_kv_num_blocks=bm.full_kv_num_blocks)
    # Not an error: a BlockMask PyTorch built from a Python mask_mod has flexjit trace that mask_mod.
    torch.testing.assert_close(flexjit.flex_attention(q, k, v, block_mask=bm, enable_gqa=True),
                               torch_flex(q, k, v, block_mask=bm, enable_gqa=True), **TOL[torch.float32])


# ---- errors ----


def test_errors_are_python_exceptions_with_flexjit_text():
    q, k, v = qkv(torch.float32)
    with pytest.raises(ValueError, match=r"(?s)expected an operand.*at column 9\n  score \+ \* 2\n          \^"):
        flexjit.flex_attention(q, k, v, score_mod="score + * 2", enable_gqa=True)
    with pytest.raises(ValueError, match=r"unknown mod 'casual'; registered mods: .*causal"):
        flexjit.flex_attention(q, k, v, mask_mod="casual", enable_gqa=True)
    with pytest.raises(ValueError, match="'causal' is a mask_mod, not a score_mod"):
        flexjit.flex_attention(q, k, v, score_mod="causal", enable_gqa=True)
    with pytest.raises(ValueError, match="q has dtype fp64; supported: fp32, bf16, fp16"):
        flexjit.flex_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    with pytest.raises(ValueError, match=r"query must be 4-D \[B, H, L, D\], got 3-D"):
        flexjit.flex_attention(q[0], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="pass enable_gqa=true"):
        flexjit.flex_attention(q, k, v)
    with pytest.raises(ValueError, match="param 'windw' is given but neither score_mod nor mask_mod reads it"):
        flexjit.flex_attention(q, k, v, mask_mod="sliding_window", params={"windw": 3}, enable_gqa=True)
    with pytest.raises(ValueError, match="buffer 'slopes' is bound to a fp64 tensor"):
        flexjit.flex_attention(q, k, v, score_mod="alibi", buffers={"slopes": slopes().double()}, enable_gqa=True)
    with pytest.raises(ValueError, match="unknown kernel_options"):
        flexjit.flex_attention(q, k, v, enable_gqa=True, kernel_options={"num_warps": 4})
    with pytest.raises(TypeError, match="must be a Python function"):
        flexjit.flex_attention(q, k, v, score_mod=42, enable_gqa=True)
    # The next call still works.
    torch.testing.assert_close(flexjit.flex_attention(q, k, v, enable_gqa=True), torch_flex(q, k, v, enable_gqa=True),
                               **TOL[torch.float32])


def test_backward_matches_sdpa():
    # The op has a backward (the full matrix is in test_backward.py): the same gradients as SDPA's.
    q, k, v = (t.requires_grad_() for t in qkv(torch.float32))
    g = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    flexjit.flex_attention(q, k, v, mask_mod="causal", enable_gqa=True).backward(g)
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


# ---- grad modes and torch.compile ----


def test_no_grad_and_inference_mode():
    mod = make_mod("softcap")
    q, k, v = (t.requires_grad_() for t in qkv(torch.float32))
    ref, _ = torch_reference(mod, q.detach(), k.detach(), v.detach())
    with torch.no_grad():
        out = call(mod, q, k, v)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    with torch.inference_mode():
        out = call(mod, q, k, v)
    assert out.is_inference()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_compile_fullgraph_no_graph_break():
    # aot_eager runs Dynamo + AOTAutograd on the Meta kernel without Inductor's codegen (fast).
    torch._dynamo.reset()
    s = slopes()
    bm = create_block_mask(causal, None, None, L, L, device="cpu")

    def f(q, k, v):
        a, lse = torch.ops.flexjit.flex_attention(q, k, v, "score + s[h] * (kv_idx - q_idx)", "", [s], ["s"],
                                                  enable_gqa=True, return_lse=True)
        b = flexjit.flex_attention(q * 2, k, v, mask_mod="causal", block_mask=bm, enable_gqa=True)
        return a + b, lse

    q, k, v = qkv(torch.float32)
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_inductor_graph_matches_compiled_torch_flex_attention():
    # One Inductor graph holding both: flexjit's op and torch.compile'd PyTorch flex_attention.
    torch._dynamo.reset()
    mod = make_mod("alibi")
    s = mod.buffers["slopes"]
    bm = create_block_mask(causal, None, None, L, L, device="cpu")

    def f(q, k, v):
        ours = flexjit.flex_attention(q, k, v, score_mod="alibi", mask_mod="causal", buffers={"slopes": s},
                                      block_mask=bm, enable_gqa=True)
        theirs = torch_flex(q, k, v, score_mod=mod.torch_score, block_mask=bm, enable_gqa=True)
        return ours, theirs

    q, k, v = qkv(torch.float32)
    with torch.no_grad():
        ours, theirs = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float32])

"""flexjit.flash_attn_varlen_func (torch.ops.flexjit.varlen_attention) against a float64 torch
reference of FlashAttention-2's varlen semantics, written per sequence: bottom-right causal and
windows, ALiBi of both shapes, softcap, GQA, user mods (Python callables and text) at in-sequence
positions; the op's Meta kernel under torch.compile; and its errors."""

import math

import pytest
import torch

import flexjit

pytestmark = pytest.mark.skipif(flexjit.library_path() is None, reason="op library not built")


def cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def reference(q, k, v, cu_q, cu_k, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
              score_mod=None, mask_mod=None):
    total_q, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(total_q, hq, dv, dtype=torch.float64)
    lse = torch.full((hq, total_q), -math.inf, dtype=torch.float64)
    wl, wr = window
    if causal:
        wr = 0
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        sq, sk = q1 - q0, k1 - k0
        if sq == 0:
            continue
        qs = q[q0:q1].double().transpose(0, 1)
        ks = k[k0:k1].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vs = v[k0:k1].double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        sc = qs @ ks.transpose(-1, -2) * scale
        if softcap > 0:
            sc = softcap * torch.tanh(sc / softcap)
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        diag = i + sk - sq
        h = torch.arange(hq)[:, None, None]
        if alibi is not None:
            slope = (alibi if alibi.dim() == 1 else alibi[s]).double()[:, None, None]
            sc = sc - slope * (diag - j).abs()
        if score_mod is not None:
            sc = score_mod(sc, torch.tensor(s), h, i, j)
        keep = torch.ones(hq, sq, sk, dtype=torch.bool)
        if wl >= 0:
            keep &= j >= diag - wl
        if wr >= 0:
            keep &= j <= diag + wr
        if mask_mod is not None:
            keep &= mask_mod(torch.tensor(s), h, i, j)
        sc = sc.masked_fill(~keep, -math.inf)
        l = torch.logsumexp(sc, -1)
        p = torch.exp(sc - l[..., None]).nan_to_num(0.0)
        out[q0:q1] = (p @ vs).transpose(0, 1)
        lse[:, q0:q1] = l
    return out, lse


def packed(lens_q, lens_k, hq, hkv, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), hkv, dv, generator=g).to(dtype)
    return q, k, v


def check(out, lse, ref_out, ref_lse, dtype):
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] < 0).all()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)


CASES = [
    dict(name="causal_mixed", lq=[17, 1, 97, 0, 33], lk=[17, 1, 97, 0, 33], causal=True),
    dict(name="q_longer_than_k", lq=[40, 5], lk=[17, 9], causal=True),
    dict(name="window_both", lq=[97, 20], lk=[97, 45], window=(7, 3)),
    dict(name="gqa3_alibi_heads", lq=[33, 18], lk=[50, 18], hq=6, hkv=2, causal=True, alibi="heads"),
    dict(name="alibi_batch_softcap", lq=[30, 9], lk=[20, 40], alibi="batch", softcap=2.5),
    dict(name="bf16_window_left", lq=[129, 60], lk=[129, 60], dtype=torch.bfloat16, causal=True, window=(30, -1)),
    dict(name="batch64_len1", lq=[1] * 64, lk=[1] * 64),
]


@pytest.mark.parametrize("c", CASES, ids=[c["name"] for c in CASES])
def test_matches_fa2_semantics(c):
    hq, hkv, dtype = c.get("hq", 2), c.get("hkv", 2), c.get("dtype", torch.float32)
    q, k, v = packed(c["lq"], c["lk"], hq, hkv, 24, 20, dtype)
    cu_q, cu_k = cu(c["lq"]), cu(c["lk"])
    alibi = None
    if c.get("alibi") == "heads":
        alibi = torch.rand(hq) * 0.3 + 0.05
    elif c.get("alibi") == "batch":
        alibi = torch.rand(len(c["lq"]), hq) * 0.3 + 0.05
    kw = dict(causal=c.get("causal", False), window_size=c.get("window", (-1, -1)), softcap=c.get("softcap", 0.0),
              alibi_slopes=alibi)
    out, lse, probs = flexjit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(c["lq"]), max(c["lk"]),
                                                     return_attn_probs=True, **kw)
    assert probs is None and out.dtype == dtype and out.shape == (q.shape[0], hq, 20) and lse.shape == (hq, q.shape[0])
    ref_out, ref_lse = reference(q, k, v, cu_q, cu_k, causal=kw["causal"], window=kw["window_size"],
                                 softcap=kw["softcap"], alibi=alibi)
    check(out, lse, ref_out, ref_lse, dtype)


def test_user_mods_see_the_sequence_and_in_sequence_positions():
    lq, lk = [33, 18, 7], [40, 18, 7]
    q, k, v = packed(lq, lk, 4, 2, 16, 16, torch.float32, seed=3)
    bias = torch.randn(3, 4)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h] * (q_idx - kv_idx) / 8

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx + kv_idx + b) % 4 != 0

    out = flexjit.flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), 33, 40, causal=True, softcap=4.0,
                                         score_mod=score_mod, mask_mod=mask_mod)
    ref_out, _ = reference(q, k, v, cu(lq), cu(lk), causal=True, softcap=4.0, score_mod=score_mod, mask_mod=mask_mod)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    # The same mod as text, with its buffer by name.
    out2 = flexjit.flash_attn_varlen_func(q, k, v, cu(lq), cu(lk), 33, 40, causal=True, softcap=4.0,
                                          score_mod="score + bias(b, h) * (q_idx - kv_idx) / 8",
                                          mask_mod="(q_idx + kv_idx + b) % 4 != 0", buffers={"bias": bias})
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_matches_padded_sdpa_on_equal_lengths():
    # Every sequence of one length: the packed call is a padded batch without the padding.
    q, k, v = packed([64] * 3, [64] * 3, 4, 4, 32, 32, torch.float32, seed=5)
    out = flexjit.flash_attn_varlen_func(q, k, v, cu([64] * 3), cu([64] * 3), 64, 64, causal=True)
    qb, kb, vb = (t.view(3, 64, 4, -1).transpose(1, 2) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(192, 4, 32), atol=2e-5, rtol=2e-5)


def test_compiles_without_graph_break():
    q, k, v = packed([20, 12], [20, 12], 2, 2, 16, 16, torch.float32, seed=7)
    cq = cu([20, 12])

    def f(q, k, v):
        return flexjit.flash_attn_varlen_func(q, k, v, cq, cq, 20, 20, causal=True) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_errors_say_what_is_wrong():
    q, k, v = packed([4, 6], [4, 6], 2, 2, 8, 8, torch.float32)
    good = cu([4, 6])
    with pytest.raises(ValueError, match="int64; it must be int32"):
        flexjit.flash_attn_varlen_func(q, k, v, good.long(), good, 6, 6)
    with pytest.raises(ValueError, match="must not go backwards"):
        flexjit.flash_attn_varlen_func(q, k, v, good, torch.tensor([0, 6, 4], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="past the 10 rows of q"):
        flexjit.flash_attn_varlen_func(q, k, v, torch.tensor([0, 4, 11], dtype=torch.int32), good, 7, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q has 1 sequences but cu_seqlens_k has 2"):
        flexjit.flash_attn_varlen_func(q, k, v, torch.tensor([0, 10], dtype=torch.int32), good, 10, 6)
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        flexjit.flash_attn_varlen_func(q, k, v, good, good, 6, 6, dropout_p=0.1)
    with pytest.raises(ValueError, match="unknown kernel_options"):
        flexjit.flash_attn_varlen_func(q, k, v, good, good, 6, 6, kernel_options={"PARTITION_SIZE": 64})
    with pytest.raises(ValueError, match="3-D"):
        flexjit.flash_attn_varlen_func(q[None], k, v, good, good, 6, 6)
    qg = q.clone().requires_grad_()
    out = flexjit.flash_attn_varlen_func(qg, k, v, good, good, 6, 6)
    with pytest.raises(RuntimeError, match="no backward pass"):
        out.sum().backward()

#!/usr/bin/env python3
"""flexjit's torch op against PyTorch on a fixed suite: speed, first-call latency, numerics.

    PYTHONPATH=python python3 bench/compare_torch.py                  # full suite, ~9-10 min
    PYTHONPATH=python python3 bench/compare_torch.py --quick --filter prefill/fp32/causal

The suite (SUITE, below) is every combination of the mods noop, causal, alibi (+ causal),
softcap (cap 20), sliding_window (causal, 256 keys), document (packed documents of seeded
random lengths summing to the sequence length) and prefix_lm (prefix 64), the dtypes fp32 and
bf16, and two paths: prefill (B=1, H=8, Lq = Lkv = 2048, D=64) and decode (B=4, Hq=8, Hkv=2
with enable_gqa, Lq=1, Lkv=8192, D=64). In decode the query is the last position, so the
masks and ALiBi see it at q_idx + off with off = Lkv - Lq (bottom-right aligned); flexjit's
built-ins are top-left aligned like PyTorch's, so decode writes the same mods as text with a
param `off`. Each mod is written twice with the same buffers and params: as flexjit text or a
built-in name, and as PyTorch score_mod / mask_mod functions (make_mod).

--suite gallery runs flexjit.gallery's attention-gym mods (causal, sliding_window (L/4),
prefix_lm (L/3), document, alibi, softcap, t5_relative_bias, natten_2d) as the very same
Python functions on both sides: flexjit traces them (the first call's time includes the trace),
torch.compile compiles them. Prefill only, B=1, H=8, L=2048, D=64, fp32 and bf16; outputs go to
docs/compare-torch-gallery.* unless told otherwise. --suite llm-decode: see its help.

Implementations, timed INTERLEAVED (one sample of each per repetition, in an order rotated
every repetition) after a warm-up, on the same inputs; a sample is the mean of enough calls to
last ~100 ms; the medians of --reps samples are reported:

  flexjit   flexjit.flex_attention (the torch op); a BlockMask from flexjit.create_block_mask,
            built once before the timing when the mod has a mask.
  compile   torch.compile(flex_attention, dynamic=False, fullgraph=True), compiled once per
            case; its BlockMask from torch's create_block_mask, built before the timing.
  sdpa      torch.nn.functional.scaled_dot_product_attention where it can express the case:
            plain, is_causal, a dense bool attn_mask, or a dense fp32 bias (with -inf where
            masked), all built before the timing; skipped (with the reason) for softcap. The
            JSON's impls.sdpa.how and the table's "SDPA used" say which.
  unfused   q @ k^T (case dtype) * scale, the PyTorch score_mod on the whole score tensor,
            masked_fill with a dense mask precomputed once, softmax, @ v (case dtype). For bf16
            the scores are widened to fp32 for the mod and the softmax (as flexjit and SDPA do;
            an ALiBi bias in bf16 is off by up to 4 at L=2048), then P is rounded to bf16.

First call (compile latency): the first flexjit call and the first torch.compile call of each
case, each after building its BlockMask (timed apart; flexjit's create_block_mask JIT-compiles
the mask's module when it needs an exact check), and after the process has paid its one-time
start-up costs (a warm-up on an unrelated tiny case for each, reported as `warmup`).
flexjit's kernel cache is a fresh temporary FLEXJIT_CACHE_DIR (set before flexjit is imported),
Inductor's a fresh TORCHINDUCTOR_CACHE_DIR (unless --inductor-cache), and torch._dynamo.reset()
runs before each case. flexjit's attention kernel depends on the dtype and path, not on the
mods (which are a small module of their own), so later cases reuse it: new objects in the disk
cache are counted, and a first call that compiled nothing is marked `*` in the table. The
summary gives geomeans over all cases and over those whose first call compiled. By default the
build's prebuilt attention kernels (<build>/flexjit-kernels, compiled at build time by `flexjit
cache warm`; jit/cache.h) serve flexjit's attention kernels where a case's shape is among them,
so first calls compile only mods; --cold turns that tier off (FLEXJIT_PREBUILT_DIR=off) and
every kernel is compiled in the run. The report says which.

Numerics: every implementation against a float64 unfused reference on the same (rounded)
inputs; max abs error, tolerance 1e-3 (fp32) / 3e-2 (bf16). The process exits 1 (after
writing its outputs) when any implementation disagrees or flexjit fails; errors of a
baseline are recorded and reported but do not fail the run (exit 2: no case selected).

Rates: prefill GFLOP/s = 4 * B * Hq * D * (unmasked (q, kv) pairs) / time, i.e. the dense
4*B*H*Lq*Lkv*D counted only over pairs the mask keeps (exact, from the dense mask; about half
for causal); decode GB/s = bytes of K and V over the keys the mask keeps (B * Hkv * kept keys
* 2 * D * element size) / time. Every implementation of a case gets the same count, so a rate
ratio is a time ratio. Ratios are flexjit's speed over a baseline's (> 1: flexjit faster);
the first-call ratio is compile's first call over flexjit's (> 1: flexjit's first result
comes sooner), also given with both BlockMask builds added.

--threads N sets torch.set_num_threads(N) and pins the process to N CPUs: flexjit's op has no
thread-count argument and its TBB pool follows the CPU affinity.

Progress goes to stderr, one line per case and implementation. Outputs: --json (raw samples,
medians, ratios, environment), --markdown (ratio table and summary), --chart (PNG).
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the suite (plain data) ----

MODS = ["noop", "causal", "alibi", "softcap", "sliding_window", "document", "prefix_lm"]
DTYPES = ["fp32", "bf16"]
PATHS = ["prefill", "decode"]
IMPLS = ["flexjit", "compile", "sdpa", "unfused"]
IMPL_LABELS = {"flexjit": "flexjit", "compile": "torch.compile(flex_attention)", "sdpa": "SDPA",
               "unfused": "unfused"}

# Mod parameters (the same values on both sides).
SOFTCAP = 20.0
WINDOW = 256
PREFIX = 64
DOC_SEED = 1234
TOL = {"fp32": 1e-3, "bf16": 3e-2}  # max abs error of the output vs float64

# Shapes per path: full suite, --quick, and the reduced ones the pytest file uses.
SIZES = {
    "full": {"prefill": dict(B=1, Hq=8, Hkv=8, Lq=2048, Lkv=2048, D=64),
             "decode": dict(B=4, Hq=8, Hkv=2, Lq=1, Lkv=8192, D=64)},
    "quick": {"prefill": dict(B=1, Hq=4, Hkv=4, Lq=256, Lkv=256, D=64),
              "decode": dict(B=2, Hq=4, Hkv=2, Lq=1, Lkv=512, D=64)},
    "test": {"prefill": dict(B=1, Hq=4, Hkv=4, Lq=129, Lkv=129, D=64),
             "decode": dict(B=2, Hq=4, Hkv=2, Lq=1, Lkv=300, D=64)},
}


# The LLM decode suite (--suite llm-decode): one query token per sequence against long caches,
# at the attention shapes of Llama-3.1-8B (Hq 32, Hkv 8, D 128) at batch 1 and 4 and of an MQA
# model (Hkv 1) at batch 1, KV 4k-32k, fp32 and bf16, contiguous and paged (pages of 16 keys in a
# shuffled order; torch.compile(flex_attention), SDPA and unfused read the same keys contiguous,
# as PyTorch's flex_attention has no paged form). No mod: a decode query sees every cached key.
LLM_SHAPES = {"llama8b_b1": dict(B=1, Hq=32, Hkv=8, D=128), "llama8b_b4": dict(B=4, Hq=32, Hkv=8, D=128),
              "mqa_b1": dict(B=1, Hq=32, Hkv=1, D=128)}
LLM_KV = [4096, 8192, 16384, 32768]
PAGE_SIZE = 16

# The gallery suite (--suite gallery): flexjit.gallery's mods, written as plain Python functions
# for PyTorch's flex_attention, passed UNCHANGED to both libraries (flexjit traces them), at the
# prefill shape (B 1, H 8, L 2048, D 64), fp32 and bf16. The names are gallery.examples()'s keys.
GALLERY_MODS = ["causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap", "t5_relative_bias",
                "natten_2d"]


@dataclasses.dataclass(frozen=True)
class Case:
    path: str   # "prefill" (Lq = Lkv) or "decode" (Lq = 1, GQA)
    dtype: str  # "fp32" or "bf16"
    mod: str    # one of MODS
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lkv: int
    D: int
    window: int = WINDOW  # sliding_window's window (smaller in the reduced test shapes)
    label: str = ""       # llm-decode: the shape's name (llama8b_b1, ...)
    paged: bool = False   # llm-decode: flexjit reads a paged cache
    gallery: bool = False  # gallery suite: mod is a flexjit.gallery example, the same callables on both sides

    @property
    def name(self):
        if self.label:
            return f"{self.path}/{self.dtype}/{self.label}/KV{self.Lkv}/{'paged' if self.paged else 'contig'}"
        if self.gallery:
            return f"gallery/{self.dtype}/{self.mod}"
        return f"{self.path}/{self.dtype}/{self.mod}"

    @property
    def gqa(self):
        return self.Hq != self.Hkv

    @property
    def off(self):
        """Position of query row 0: the queries are the last Lq positions (0 for prefill)."""
        return self.Lkv - self.Lq

    def shape(self):
        return dict(B=self.B, Hq=self.Hq, Hkv=self.Hkv, Lq=self.Lq, Lkv=self.Lkv, D=self.D)


def make_suite(size="full", suite="default"):
    """The default suite (every path x dtype x mod), the llm-decode one or the gallery one, at the
    "full", "quick" or "test" shapes (llm-decode's quick shapes keep the heads and cut KV to 512
    and 1024; the gallery uses the prefill shapes)."""
    if suite == "gallery":
        return [Case("prefill", dtype, mod, gallery=True, **SIZES[size]["prefill"])
                for dtype in DTYPES for mod in GALLERY_MODS]
    if suite == "llm-decode":
        kvs = LLM_KV if size == "full" else [512, 1024]
        return [Case("decode", dtype, "noop", Lq=1, Lkv=L, label=label, paged=paged, **shape)
                for dtype in DTYPES for label, shape in LLM_SHAPES.items() for L in kvs for paged in (False, True)]
    cases = [Case(path, dtype, mod, **SIZES["full"][path]) for path in PATHS for dtype in DTYPES for mod in MODS]
    return cases if size == "full" else [resized(c, size) for c in cases]


SUITE = make_suite("full")


def resized(case, size):
    """The same case at the "quick" or "test" shapes. A window of 256 would cover a whole
    129-long test sequence (it would be causal), so small shapes use a window of about a third
    of Lkv."""
    shape = SIZES[size][case.path]
    window = case.window if shape["Lkv"] > 2 * case.window else max(8, shape["Lkv"] // 3)
    return dataclasses.replace(case, window=window, **shape)


# ------------------------------------------------------------------- mods, both sides ----

torch = None
flexjit = None
F = None
flex_attention = None
torch_create_block_mask = None


def load(library_retries=10):
    """Imports torch and flexjit (deferred so that main() can set FLEXJIT_CACHE_DIR,
    TORCHINDUCTOR_CACHE_DIR and the CPU affinity first). Retries the op library for a while:
    it may be being rebuilt."""
    global torch, flexjit, F, flex_attention, torch_create_block_mask
    if flexjit is not None:
        return
    import torch as _torch
    import torch.nn.functional as _F
    from torch.nn.attention.flex_attention import create_block_mask as _cbm
    from torch.nn.attention.flex_attention import flex_attention as _fa

    if str(ROOT / "python") not in sys.path:
        sys.path.insert(0, str(ROOT / "python"))
    for attempt in range(library_retries + 1):
        try:
            import flexjit as _flexjit  # loads the op library when it finds one

            _flexjit.load_library()
            break
        except (FileNotFoundError, OSError, RuntimeError) as e:
            sys.modules.pop("flexjit", None)
            if attempt == library_retries:
                raise
            print(f"compare_torch: op library not loadable ({e}); retrying in 30 s", file=sys.stderr, flush=True)
            time.sleep(30)
    torch, F, flex_attention, torch_create_block_mask, flexjit = _torch, _F, _fa, _cbm, _flexjit


def torch_dtype(name):
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def doc_ids(n, seed=DOC_SEED):
    """Packed documents of random lengths (seeded) that sum to n: int32 [n], ids ascending."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, n // 64), max(2, n // 4)
    lens = []
    while sum(lens) < n:
        lens.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lens[-1] -= sum(lens) - n
    return torch.cat([torch.full((x,), i, dtype=torch.int32) for i, x in enumerate(lens)])


def alibi_slopes(H):
    return torch.exp2(-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H).float()


@dataclasses.dataclass
class Mod:
    """One mod on both sides. fj_*: flexjit text or built-in names with their buffers and
    params; torch_score / torch_mask: PyTorch FlexAttention functions (also applied to whole
    broadcast index tensors by the unfused path and the reference)."""
    fj_score: str = None
    fj_mask: str = None
    buffers: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)
    mask_buffers: tuple = ()  # the names in `buffers` the mask reads (for create_block_mask)
    torch_score: object = None
    torch_mask: object = None
    sdpa_skip: str = None  # why SDPA cannot express the mod (its score_mod is not an additive bias)


def gallery_mod(case):
    """A gallery example: the same Python functions for flexjit (which traces them) and PyTorch."""
    from flexjit import gallery
    examples = gallery.examples(case.Hq, case.Lkv)
    assert list(examples) == GALLERY_MODS, f"GALLERY_MODS is out of date: gallery.examples() has {list(examples)}"
    score, mask = examples[case.mod]
    return Mod(fj_score=score, fj_mask=mask, torch_score=score, torch_mask=mask,
               sdpa_skip="tanh soft-capping of scores is not expressible" if case.mod == "softcap" else None)


def make_mod(case):
    """The case's mod. Prefill uses flexjit's built-ins (top-left aligned, query i is position
    i); decode writes the same mods as text with the query position q_idx + int(off)."""
    if case.gallery:
        return gallery_mod(case)
    m, off, dec = case.mod, case.off, case.path == "decode"
    qpos = "(q_idx + int(off))" if dec else "q_idx"
    offp = {"off": float(off)} if dec else {}

    def causal(b, h, q, kv):
        return q + off >= kv

    if m == "noop":
        return Mod()
    if m == "causal":
        return Mod(fj_mask=f"{qpos} >= kv_idx" if dec else "causal", params=offp, torch_mask=causal)
    if m == "alibi":  # ALiBi bias (registered score_mod, buffer `slopes`) with a causal mask
        s = alibi_slopes(case.Hq)
        return Mod(fj_score=f"score + slopes[h] * float(kv_idx - {qpos})" if dec else "alibi",
                   fj_mask=f"{qpos} >= kv_idx" if dec else "causal", buffers={"slopes": s}, params=offp,
                   torch_score=lambda x, b, h, q, kv: x + s[h] * (kv - q - off), torch_mask=causal)
    if m == "softcap":  # built-in score_mod with a runtime param
        return Mod(fj_score="softcap", params={"cap": SOFTCAP},
                   torch_score=lambda x, b, h, q, kv: SOFTCAP * torch.tanh(x / SOFTCAP),
                   sdpa_skip="tanh soft-capping of scores is not expressible")
    if m == "sliding_window":  # causal window of `window` keys
        w = case.window
        return Mod(fj_mask=f"{qpos} >= kv_idx && {qpos} - kv_idx < window" if dec else "sliding_window",
                   params={"window": float(w), **offp},
                   torch_mask=lambda b, h, q, kv: (q + off >= kv) & (q + off - kv < w))
    if m == "document":  # packed documents, int32 buffer `doc` over all positions
        doc = doc_ids(case.Lkv)
        return Mod(fj_mask=f"doc[{qpos}] == doc[kv_idx]" if dec else "document", buffers={"doc": doc},
                   params=offp, mask_buffers=("doc",), torch_mask=lambda b, h, q, kv: doc[q + off] == doc[kv])
    if m == "prefix_lm":  # bidirectional over the first `prefix` keys, causal after
        return Mod(fj_mask=f"kv_idx < prefix || {qpos} >= kv_idx" if dec else "prefix_lm",
                   params={"prefix": float(PREFIX), **offp},
                   torch_mask=lambda b, h, q, kv: (kv < PREFIX) | (q + off >= kv))
    raise KeyError(m)


def make_inputs(case, seed=0):
    """q, k, v in the case dtype (randn, rounded once, so every implementation sees the same)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch_dtype(case.dtype)
    return [torch.randn(case.B, h, n, case.D, generator=g).to(dt)
            for h, n in ((case.Hq, case.Lq), (case.Hkv, case.Lkv), (case.Hkv, case.Lkv))]


def index_grids(case):
    """b, h, q_idx, kv_idx as broadcastable [B,1,1,1], [1,H,1,1], [1,1,Lq,1], [1,1,1,Lkv]."""
    return (torch.arange(case.B).view(-1, 1, 1, 1), torch.arange(case.Hq).view(1, -1, 1, 1),
            torch.arange(case.Lq).view(1, 1, -1, 1), torch.arange(case.Lkv).view(1, 1, 1, -1))


def dense_mask(case, mod):
    """The mask as a dense bool tensor broadcastable to [B, Hq, Lq, Lkv] (None without one)."""
    if mod.torch_mask is None:
        return None
    return mod.torch_mask(*index_grids(case)).expand(-1, -1, case.Lq, case.Lkv).contiguous()


def unfused(case, mod, q, k, v, mask, scale, grids, compute=None):
    """The textbook math: scores in the input dtype, the mod, softmax, @ v. `compute` widens the
    scores for the mod and softmax (fp32 for bf16 inputs; float64 for the reference). GQA: each
    KV head's query heads are one batched matmul (no K/V copies per query head)."""
    if case.gqa:
        g = case.Hq // case.Hkv
        qg = q.reshape(case.B, case.Hkv, g * case.Lq, case.D)
        s = (qg @ k.transpose(-2, -1)).reshape(case.B, case.Hq, case.Lq, case.Lkv)
    else:
        s = q @ k.transpose(-2, -1)
    if compute is not None and s.dtype != compute:
        s = s.to(compute)
    s = s * scale
    if mod.torch_score is not None:
        s = mod.torch_score(s, *grids)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    if case.gqa:
        g = case.Hq // case.Hkv
        o = p.reshape(case.B, case.Hkv, g * case.Lq, case.Lkv) @ v
        return o.reshape(case.B, case.Hq, case.Lq, v.shape[-1])
    return p @ v


def reference(case, mod, q, k, v, mask, scale):
    """float64 unfused attention on the same rounded inputs."""
    return unfused(case, mod, q.double(), k.double(), v.double(), mask, scale, index_grids(case))


def sdpa_plan(case, mod, mask):
    """How SDPA expresses the case: (how, kwargs) or (None, reason)."""
    if mod.sdpa_skip:
        return None, mod.sdpa_skip
    if mod.torch_score is not None:  # alibi: a dense fp32 bias, -inf where masked
        bias = mod.torch_score(torch.zeros((), dtype=torch.float32), *index_grids(case)).float()
        bias = bias.expand(1, case.Hq, case.Lq, case.Lkv)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        return f"fp32 bias [1,{case.Hq},{case.Lq},{case.Lkv}]", dict(attn_mask=bias.contiguous())
    if mask is None:
        return "plain", {}
    if bool(mask.all()):
        return "plain (mask keeps every key)", {}
    causal = torch.ones(case.Lq, case.Lkv, dtype=torch.bool).tril()
    if case.Lq == case.Lkv and torch.equal(mask[0, 0], causal):
        return "is_causal", dict(is_causal=True)
    return f"bool mask [{case.Lq},{case.Lkv}]", dict(attn_mask=mask[0, 0].contiguous())


def flexjit_block_mask(case, mod):
    if mod.fj_mask is None:
        return None
    if callable(mod.fj_mask):  # a Python mask_mod: traced; it captures its own buffers and params
        return flexjit.create_block_mask(mod.fj_mask, None, None, case.Lq, case.Lkv)
    return flexjit.create_block_mask(mod.fj_mask, None, None, case.Lq, case.Lkv,
                                     buffers={n: mod.buffers[n] for n in mod.mask_buffers}, params=mod.params)


def torch_block_mask(case, mod):
    if mod.torch_mask is None:
        return None
    return torch_create_block_mask(mod.torch_mask, None, None, case.Lq, case.Lkv, device="cpu")


def paged_cache(case, k, v):
    """k, v [B, Hkv, L, D] as a paged cache: pages of PAGE_SIZE keys, shuffled (as a serving
    engine's allocator leaves them); returns (k_cache, v_cache, block_table, seq_lens)."""
    per_seq = -(-case.Lkv // PAGE_SIZE)
    pad = per_seq * PAGE_SIZE - case.Lkv
    order = torch.randperm(case.B * per_seq, generator=torch.Generator().manual_seed(7)).to(torch.int32)

    def pages(x):  # [B, Hkv, L, D] -> [B * per_seq, PAGE_SIZE, Hkv, D], then scattered to `order`
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).transpose(1, 2)  # [B, L', Hkv, D]
        x = x.reshape(case.B * per_seq, PAGE_SIZE, case.Hkv, case.D)
        out = torch.empty_like(x)
        out[order.long()] = x
        return out
    return (pages(k), pages(v), order.view(case.B, per_seq).contiguous(),
            torch.full((case.B,), case.Lkv, dtype=torch.int32))


def flexjit_call(case, mod, block_mask, kv=None):
    if case.paged:  # the cache is made once, before any timing
        k_cache, v_cache, table, lens = paged_cache(case, *kv)

        def paged_call(q, k, v):
            return flexjit.paged_flex_attention(q, k_cache, v_cache, table, lens, score_mod=mod.fj_score,
                                                mask_mod=mod.fj_mask, buffers=mod.buffers, params=mod.params,
                                                enable_gqa=case.gqa)
        return paged_call

    if case.gallery:  # PyTorch's call, unchanged: the mask travels in the BlockMask as its mask_mod
        def gallery_call(q, k, v):
            return flexjit.flex_attention(q, k, v, score_mod=mod.fj_score, block_mask=block_mask,
                                          enable_gqa=case.gqa)
        return gallery_call

    def call(q, k, v):
        return flexjit.flex_attention(q, k, v, score_mod=mod.fj_score, mask_mod=mod.fj_mask, buffers=mod.buffers,
                                      params=mod.params, block_mask=block_mask, enable_gqa=case.gqa)
    return call


def compiled_flex():
    """A fresh torch.compile(flex_attention) (call torch._dynamo.reset() before, per case)."""
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def compile_call(case, mod, block_mask, fn):
    def call(q, k, v):
        return fn(q, k, v, score_mod=mod.torch_score, block_mask=block_mask, enable_gqa=case.gqa)
    return call


def max_abs_err(out, ref):
    return float((out.double() - ref).abs().max())


# ----------------------------------------------------------------------- measurement ----


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1e3


def kept_pairs(case, mask):
    """Unmasked (q, kv) pairs per (b, h), and keys kept by at least one query."""
    if mask is None:
        return case.Lq * case.Lkv, case.Lkv
    m = mask[0, 0]
    return int(m.sum()), int(m.any(dim=0).sum())


def work(case, mask):
    pairs, keys = kept_pairs(case, mask)
    if case.path == "prefill":
        return dict(unit="GFLOP/s", amount=4.0 * case.B * case.Hq * case.D * pairs, kept_pairs=pairs,
                    convention="4*B*Hq*D*(unmasked q,kv pairs)")
    elem = {"fp32": 4, "bf16": 2}[case.dtype]
    return dict(unit="GB/s", amount=float(case.B * case.Hkv * keys * 2 * case.D * elem), kept_keys=keys,
                convention="bytes of K and V over kept keys: B*Hkv*keys*2*D*elem")


def run_case(case, idx, total, reps, target_ms=100.0):
    """Everything for one case; never raises (errors are recorded per implementation)."""
    tag = f"[{idx}/{total}] {case.name}"
    res = dict(name=case.name, path=case.path, dtype=case.dtype, mod=case.mod, shape=case.shape(),
               gqa=case.gqa, tol=TOL[case.dtype], impls={i: {} for i in IMPLS})
    impls = res["impls"]
    mod = make_mod(case)
    if case.gallery:  # what flexjit traced the functions into (then forgotten: the first call traces)
        score_text, mask_text, bufs, pars = flexjit.trace.bind(mod.fj_score, mod.fj_mask)
        flexjit.trace.clear()
        res["mods"] = dict(python_score=getattr(mod.fj_score, "__qualname__", None),
                           python_mask=getattr(mod.fj_mask, "__qualname__", None), flexjit_score=score_text,
                           flexjit_mask=mask_text, params=pars, buffers={n: list(t.shape) for n, t in bufs.items()})
    else:
        res["mods"] = dict(flexjit_score=mod.fj_score, flexjit_mask=mod.fj_mask,
                           params=mod.params, buffers={n: list(t.shape) for n, t in mod.buffers.items()})
    q, k, v = make_inputs(case)
    scale = 1.0 / math.sqrt(case.D)
    grids = index_grids(case)
    mask = dense_mask(case, mod)
    res["work"] = work(case, mask)
    t = time.perf_counter()
    ref = reference(case, mod, q, k, v, mask, scale)
    res["reference_ms"] = (time.perf_counter() - t) * 1e3
    calls = {}

    # flexjit: the BlockMask (timed apart), then the first call. New objects in the (fresh) disk
    # cache tell what compiled where: flexjit's attention kernel depends on the dtype and the
    # kernel spec, not on the mods, which are a small module of their own that
    # create_block_mask already compiles when there is a mask.
    fj = impls["flexjit"]
    try:
        cache = Path(os.environ["FLEXJIT_CACHE_DIR"])
        n0 = len(list(cache.glob("*.o")))
        bm, fj["block_mask_ms"] = timed(flexjit_block_mask, case, mod)
        n1 = len(list(cache.glob("*.o")))
        call = flexjit_call(case, mod, bm, (k, v))
        out, fj["first_call_ms"] = timed(call, q, k, v)
        n2 = len(list(cache.glob("*.o")))
        fj["block_mask_new_objects"], fj["first_call_new_objects"] = n1 - n0, n2 - n1
        fj["first_call_compiled"] = n2 > n1
        fj["first_result_ms"] = fj["block_mask_ms"] + fj["first_call_ms"]
        fj["max_abs_err"] = max_abs_err(out, ref)
        calls["flexjit"] = call
        log(f"{tag}: flexjit first call {fj['first_call_ms']:.0f} ms ({n2 - n1} new objects in the kernel "
            f"cache), BlockMask {fj['block_mask_ms']:.1f} ms ({n1 - n0} new)")
    except Exception as e:  # noqa: BLE001
        fj["error"] = f"{type(e).__name__}: {e}"
        log(f"{tag}: flexjit ERROR {fj['error']}")

    # torch.compile(flex_attention): reset, fresh compiled function, first call = compile.
    tc = impls["compile"]
    try:
        tbm, tc["block_mask_ms"] = timed(torch_block_mask, case, mod)
        torch._dynamo.reset()
        call = compile_call(case, mod, tbm, compiled_flex())
        out, tc["first_call_ms"] = timed(call, q, k, v)
        tc["first_result_ms"] = tc["block_mask_ms"] + tc["first_call_ms"]
        tc["max_abs_err"] = max_abs_err(out, ref)
        calls["compile"] = call
        log(f"{tag}: compile first call {tc['first_call_ms']:.0f} ms, BlockMask {tc['block_mask_ms']:.1f} ms")
    except Exception as e:  # noqa: BLE001
        tc["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        log(f"{tag}: compile ERROR {tc['error']}")

    try:
        how, kw = sdpa_plan(case, mod, mask)
        if how is None:
            impls["sdpa"]["skipped"] = kw
            log(f"{tag}: sdpa skipped ({kw})")
        else:
            impls["sdpa"]["how"] = how

            def sdpa(q, k, v, kw=kw):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=case.gqa, **kw)
            impls["sdpa"]["max_abs_err"] = max_abs_err(sdpa(q, k, v), ref)
            calls["sdpa"] = sdpa
    except Exception as e:  # noqa: BLE001
        impls["sdpa"]["error"] = f"{type(e).__name__}: {e}"
        log(f"{tag}: sdpa ERROR {impls['sdpa']['error']}")

    try:
        compute = torch.float32 if case.dtype == "bf16" else None

        def unf(q, k, v):
            return unfused(case, mod, q, k, v, mask, scale, grids, compute)
        impls["unfused"]["how"] = "scores fp32 for mod/softmax" if compute else "all fp32"
        impls["unfused"]["max_abs_err"] = max_abs_err(unf(q, k, v), ref)
        calls["unfused"] = unf
    except Exception as e:  # noqa: BLE001
        impls["unfused"]["error"] = f"{type(e).__name__}: {e}"
        log(f"{tag}: unfused ERROR {impls['unfused']['error']}")
    del ref

    for name, r in impls.items():
        if "max_abs_err" in r:
            r["ok"] = r["max_abs_err"] <= TOL[case.dtype] and math.isfinite(r["max_abs_err"])

    # Warm-up (a second call each) and the number of calls per sample (>= target_ms a sample).
    inner = {}
    for name in list(calls):
        try:
            _, ms = timed(calls[name], q, k, v)
            _, ms2 = timed(calls[name], q, k, v)
            inner[name] = max(1, min(200, math.ceil(target_ms / max(min(ms, ms2), 1e-3))))
            impls[name]["calls_per_sample"] = inner[name]
            impls[name]["samples_ms"] = []
        except Exception as e:  # noqa: BLE001
            impls[name]["error"] = f"{type(e).__name__}: {e}"
            calls.pop(name)

    # Interleaved repetitions: one sample of each implementation per repetition, order rotated.
    order = list(calls)
    for rep in range(reps):
        rot = order[rep % len(order):] + order[:rep % len(order)] if order else []
        for name in rot:
            if name not in calls:
                continue
            try:
                t = time.perf_counter()
                for _ in range(inner[name]):
                    calls[name](q, k, v)
                impls[name]["samples_ms"].append((time.perf_counter() - t) * 1e3 / inner[name])
            except Exception as e:  # noqa: BLE001
                impls[name]["error"] = f"{type(e).__name__}: {e}"
                calls.pop(name)

    for name, r in impls.items():
        if r.get("samples_ms"):
            r["median_ms"] = statistics.median(r["samples_ms"])
            r["rate"] = res["work"]["amount"] / (r["median_ms"] * 1e-3) / 1e9
    res["ratios"] = ratios(res)
    res["loadavg_1min_after"] = os.getloadavg()[0]
    res["ok"] = (not impls["flexjit"].get("error")) and all(r.get("ok", True) for r in impls.values())

    parts = []
    for name in IMPLS:
        r = impls[name]
        if "median_ms" in r:
            parts.append(f"{name} {fmt_ms(r['median_ms'])} ms")
        elif "skipped" in r:
            parts.append(f"{name} skipped")
        elif "error" in r:
            parts.append(f"{name} ERROR")
    fc = res["ratios"].get("first_call")
    log(f"{tag}: " + ", ".join(parts) + (f" | first call compile/flexjit {fc:.0f}x" if fc else "")
        + f" | numerics {'ok' if res['ok'] else 'FAIL'}")
    return res


def ratios(res):
    impls, out = res["impls"], {}
    fj = impls["flexjit"].get("median_ms")
    for base in ("compile", "sdpa", "unfused"):
        b = impls[base].get("median_ms")
        if fj and b:
            out[f"flexjit/{base}"] = b / fj
    for key in ("first_call", "first_result"):
        a, b = impls["flexjit"].get(f"{key}_ms"), impls["compile"].get(f"{key}_ms")
        if a and b:
            out[key] = b / a
    return out


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(cases):
    s = {}
    for key in ("flexjit/compile", "flexjit/sdpa", "flexjit/unfused"):
        for path in ("all",) + tuple(PATHS):
            s[f"geomean {key} ({path})"] = geomean(
                [c["ratios"].get(key) for c in cases if path in ("all", c["path"])])
    s["geomean first_call (all)"] = geomean([c["ratios"].get("first_call") for c in cases])
    s["geomean first_result (all)"] = geomean([c["ratios"].get("first_result") for c in cases])
    s["geomean first_call (flexjit's attention kernel compiled)"] = geomean(
        [c["ratios"].get("first_call") for c in cases if c["impls"]["flexjit"].get("first_call_compiled")])
    s["slower"] = [f"{c['name']} vs {k.split('/')[1]}: {v:.2f}x" for c in cases
                   for k, v in c["ratios"].items() if k.startswith("flexjit/") and v < 1.0]
    s["disagree"] = [f"{c['name']} {n}: max abs err {r['max_abs_err']:.3g} > {c['tol']}" for c in cases
                     for n, r in c["impls"].items() if r.get("ok") is False]
    s["errors"] = [f"{c['name']} {n}: {r['error']}" for c in cases for n, r in c["impls"].items() if r.get("error")]
    return s


# ------------------------------------------------------------------------- reports ----


def environment(threads):
    def sh(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return None
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = sh("git", "rev-parse", "--short", "HEAD")
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                git_commit=commit, git_dirty=bool(dirty), torch=torch.__version__, python=platform.python_version(),
                cpu=cpu, nproc=os.cpu_count(), affinity=len(os.sched_getaffinity(0)), threads=threads,
                torch_threads=torch.get_num_threads(), loadavg=list(os.getloadavg()),
                flexjit_library=str(flexjit.library_path()), flexjit_prebuilt=prebuilt_tier())


def prebuilt_tier():
    """The prebuilt kernel directory flexjit's op library reads (flexjit.prebuilt_kernel_dir(): the
    cache's own lookup, jit/cache.h) and how many kernels it holds; None when off or absent."""
    d = flexjit.prebuilt_kernel_dir()
    if d is None or not Path(d).is_dir():
        return None
    return dict(dir=d, kernels=len(list(Path(d).glob("*.o"))))


def fmt(x, spec=".2f", none="—", suffix=""):
    return none if x is None else format(x, spec) + suffix


def fmt_ms(x):
    if x is None:
        return "—"
    return format(x, ".0f" if x >= 100 else ".1f" if x >= 10 else ".2f" if x >= 1 else ".3f")


def prebuilt_line(pre):
    if not pre:
        return ("flexjit's kernels: **cold**, nothing prebuilt (--cold, or no prebuilt tier): every first call "
                "compiles the kernels it uses, attention kernel included.")
    return (f"flexjit's kernels: attention kernels of common shapes from the build's **prebuilt tier** "
            f"({pre['kernels']} kernels in `{pre['dir']}`, compiled at build time by `flexjit cache warm`, "
            f"mod-free), mods compiled in the run; `--cold` measures without them.")


def markdown(report):
    env, cases, s = report["env"], report["cases"], report["summary"]
    lines = [
        "## flexjit vs PyTorch (bench/compare_torch.py" + ("" if report["config"]["suite"] == "default" else
                                                        f" --suite {report['config']['suite']}") + ")", "",
        f"{env['date']}, commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, "
        f"{env['cpu']}, {env['threads']} threads ({env['nproc']} cores), 1-min load average before the run "
        f"{env['loadavg_start'][0]:.2f}. Medians of {report['config']['reps']} "
        f"interleaved repetitions{' (--quick sizes)' if report['config']['quick'] else ''}.", "",
        prebuilt_line(env.get("flexjit_prebuilt")), "",
        "Ratios are flexjit's speed over the baseline's (> 1: flexjit faster). First call: the first "
        "attention call of the case (compile + run), after `(+N)` ms of building its BlockMask; the "
        "first-call ratio is torch.compile's over flexjit's, `incl. BlockMask` adds both BlockMask "
        "builds (> 1: flexjit's first result sooner). `*`: flexjit compiled nothing in that call, its "
        "attention kernel (per dtype, shared by all mods) came from an earlier case or the prebuilt tier "
        "and the mod module from create_block_mask. Rates: prefill GFLOP/s over unmasked (q, kv) pairs (4*B*Hq*D per pair), "
        "decode GB/s of K+V over kept keys; the same count for every implementation.", "",
        "| case | shape | flexjit ms | flexjit rate | ×compile | ×SDPA | SDPA used | ×unfused | "
        "first call flexjit ms | first call compile ms | first-call ratio | incl. BlockMask | "
        "max err flexjit / compile | ok |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in cases:
        i, r, sh = c["impls"], c["ratios"], c["shape"]
        fj, tc = i["flexjit"], i["compile"]
        shape = (f"B{sh['B']} H{sh['Hq']} L{sh['Lq']}" if c["path"] == "prefill"
                 else f"B{sh['B']} Hq{sh['Hq']}/Hkv{sh['Hkv']} Lkv{sh['Lkv']}")
        sdpa_used = i["sdpa"].get("how") or ("skipped: " + i["sdpa"]["skipped"] if "skipped" in i["sdpa"]
                                             else "error" if "error" in i["sdpa"] else "—")

        def first(r, star=""):
            if r.get("first_call_ms") is None:
                return "—"
            bm = r.get("block_mask_ms")
            return f"{r['first_call_ms']:.0f}{star}" + (f" (+{bm:.0f})" if bm and bm >= 0.5 else "")
        first_fj = first(fj, "" if fj.get("first_call_compiled", True) else "*")
        errs = f"{fmt(fj.get('max_abs_err'), '.1e')} / {fmt(tc.get('max_abs_err'), '.1e')}"
        status = "ok" if c["ok"] else "**FAIL**"
        if fj.get("error"):
            status = "**flexjit error**"
        lines.append(
            f"| {c['name']} | {shape} | {fmt_ms(fj.get('median_ms'))} | "
            f"{fmt(fj.get('rate'), '.1f')} {c['work']['unit']} | {fmt(r.get('flexjit/compile'))} | "
            f"{fmt(r.get('flexjit/sdpa'))} | {sdpa_used} | {fmt(r.get('flexjit/unfused'))} | {first_fj} | "
            f"{first(tc)} | {fmt(r.get('first_call'), '.0f')} | {fmt(r.get('first_result'), '.0f')} | "
            f"{errs} | {status} |")
    cold_fc = s["geomean first_call (flexjit's attention kernel compiled)"]
    lines += ["", "**Summary.** Geometric-mean speedups of flexjit: "
              + "; ".join(f"vs {b} {fmt(s[f'geomean flexjit/{b} (all)'], suffix='x')} (prefill "
                          f"{fmt(s[f'geomean flexjit/{b} (prefill)'], suffix='x')}, decode "
                          f"{fmt(s[f'geomean flexjit/{b} (decode)'], suffix='x')})"
                          for b in ("compile", "sdpa", "unfused"))
              + f". First result sooner than torch.compile's by {fmt(s['geomean first_call (all)'], '.0f', suffix='x')} "
              f"(first call), {fmt(s['geomean first_result (all)'], '.0f', suffix='x')} (incl. BlockMask), "
              f"{fmt(cold_fc, '.0f', suffix='x')} over the cases where "
              f"flexjit's first call compiled a kernel. Warm-up (one-time, per process, not in the "
              f"table): flexjit {fmt(report['warmup'].get('flexjit_ms'), '.0f')} ms, torch.compile "
              f"{fmt(report['warmup'].get('compile_ms'), '.0f')} ms.", ""]
    lines.append("**flexjit is slower** in " + (f"{len(s['slower'])} comparisons: " + "; ".join(s["slower"])
                                                   if s["slower"] else "no comparison") + ".")
    if s["disagree"]:
        lines += ["", "**Numerics disagree:** " + "; ".join(s["disagree"]) + "."]
    if s["errors"]:
        lines += ["", "**Errors:** " + "; ".join(s["errors"]) + "."]
    return "\n".join(lines) + "\n"


def chart(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(p, [c for c in report["cases"] if c["path"] == p]) for p in PATHS]
    groups = [(p, cs) for p, cs in groups if cs]
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8, 0.9 * max(len(cs) for _, cs in groups) + 3),
                                                     4.2 * len(groups)), squeeze=False)
    width = 0.8 / len(IMPLS)
    for ax, (kind, cs) in zip(axes[:, 0], groups):
        for j, impl in enumerate(IMPLS):
            vals = [c["impls"][impl].get("rate") or 0.0 for c in cs]
            ax.bar([x + (j - (len(IMPLS) - 1) / 2) * width for x in range(len(cs))], vals, width,
                   label=IMPL_LABELS[impl])
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([f"{c['dtype']}\n{c['mod']}" for c in cs], fontsize=8)
        unit = cs[0]["work"]["unit"]
        sh = cs[0]["shape"]
        ax.set_ylabel(unit)
        ax.set_title(f"{kind} (B={sh['B']}, Hq={sh['Hq']}, Hkv={sh['Hkv']}, Lq={sh['Lq']}, Lkv={sh['Lkv']}, "
                     f"D={sh['D']}); missing bar = skipped or failed", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    env = report["env"]
    fig.suptitle(f"flexjit vs PyTorch, {env['threads']} threads, torch {env['torch']}, commit {env['git_commit']}",
                 fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(IMPLS), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.975))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main ----


def warmup():
    """One-time process costs on both sides (library and compiler start-up), on shapes and a
    dtype no suite case uses, so no suite kernel gets compiled here."""
    w = {}
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 16, 32, generator=g).half() for _ in range(3))
    try:
        _, w["flexjit_ms"] = timed(lambda: flexjit.flex_attention(q, k, v, score_mod="score * 0.5"))
    except Exception as e:  # noqa: BLE001
        w["flexjit_error"] = str(e)
    try:
        torch._dynamo.reset()
        fn = compiled_flex()
        _, w["compile_ms"] = timed(lambda: fn(q.float(), k.float(), v.float(), score_mod=lambda x, b, h, i, j: x * 0.5))
    except Exception as e:  # noqa: BLE001
        w["compile_error"] = str(e).splitlines()[0]
    return w


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repetitions (smoke test)")
    p.add_argument("--suite", default="default", choices=["default", "llm-decode", "gallery"],
                   help="default: the 28 cases below; llm-decode: Llama-3.1-8B / MQA decode shapes, KV 4k-32k, "
                        "fp32/bf16, contiguous and paged (writes docs/compare-torch-decode.* unless told otherwise); "
                        "gallery: flexjit.gallery's Python mods passed unchanged to both libraries, prefill "
                        "B1 H8 L2048, fp32/bf16 (writes docs/compare-torch-gallery.*)")
    p.add_argument("--filter", default=None,
                   help="run only cases whose name (path/dtype/mod, e.g. prefill/bf16/alibi) contains this; "
                        "commas separate alternatives")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads (default: all cores). torch.set_num_threads, and the process's CPU affinity "
                        "(flexjit's op has no thread option; its TBB pool follows the affinity)")
    p.add_argument("--json", default="docs/compare-torch.json", help='path, or "-"/none to skip')
    p.add_argument("--markdown", default="docs/compare-torch.md", help='path, or "-"/none to skip')
    p.add_argument("--chart", default="docs/compare-torch.png", help='path, or "-"/none to skip')
    p.add_argument("--keep-cache", action="store_true", help="keep the temporary kernel cache dirs")
    p.add_argument("--cold", action="store_true",
                   help="ignore the build's prebuilt attention kernels (FLEXJIT_PREBUILT_DIR=off): flexjit's first "
                        "calls compile every kernel they use")
    p.add_argument("--inductor-cache", default=None, metavar="DIR",
                   help="use this TORCHINDUCTOR_CACHE_DIR instead of a fresh one (a warm one makes "
                        "torch.compile's first calls cache hits: for smoke tests, not for measurements)")
    return p.parse_args(argv)


def out_path(p):
    return None if p is None or p in ("-", "none", "") else Path(p)


def main(argv=None):
    args = parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    cases = make_suite("quick" if args.quick else "full", args.suite)
    if args.suite != "default":  # its own outputs, unless given
        stem = {"llm-decode": "compare-torch-decode", "gallery": "compare-torch-gallery"}[args.suite]
        for attr, ext in (("json", "json"), ("markdown", "md"), ("chart", "png")):
            if getattr(args, attr) == f"docs/compare-torch.{ext}":
                setattr(args, attr, f"docs/{stem}.{ext}")
    if args.filter:
        alts = [f.strip() for f in args.filter.split(",") if f.strip()]
        cases = [c for c in cases if any(a in c.name for a in alts)]
    if not cases:
        log(f"compare_torch: no case matches --filter {args.filter!r}; names look like {SUITE[0].name}")
        return 2
    # Before torch / flexjit are loaded: threads (affinity) and fresh kernel caches.
    all_cpus = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(all_cpus)
    if threads < len(all_cpus):
        os.sched_setaffinity(0, all_cpus[:threads])
    tmp = Path(tempfile.mkdtemp(prefix="flexjit-compare-"))
    os.environ["FLEXJIT_CACHE_DIR"] = str(tmp / "flexjit")
    if args.cold:
        os.environ["FLEXJIT_PREBUILT_DIR"] = "off"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or str(tmp / "inductor")
    (tmp / "flexjit").mkdir()
    try:
        load()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    torch.set_num_threads(threads)
    import warnings
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")

    env = environment(threads)
    loadavg_start = env["loadavg"]
    log(f"compare_torch: {len(cases)} cases, {reps} reps, {threads} threads, torch {env['torch']}, "
        f"commit {env['git_commit']}, load {loadavg_start[0]:.2f}; caches in {tmp}")
    t0 = time.perf_counter()
    w = warmup()
    log(f"warm-up: flexjit {fmt(w.get('flexjit_ms'), '.0f')} ms, torch.compile {fmt(w.get('compile_ms'), '.0f')} ms")
    results = []
    try:
        for i, case in enumerate(cases, 1):
            try:
                results.append(run_case(case, i, len(cases), reps))
            except Exception as e:  # noqa: BLE001  (a bug here must not lose the other cases)
                log(f"[{i}/{len(cases)}] {case.name}: ERROR {e}\n{traceback.format_exc()}")
                results.append(dict(name=case.name, path=case.path, dtype=case.dtype, mod=case.mod,
                                    shape=case.shape(), tol=TOL[case.dtype], ok=False, ratios={}, work={"unit": ""},
                                    impls={n: ({"error": f"{type(e).__name__}: {e}"} if n == "flexjit" else {})
                                           for n in IMPLS}))
    finally:
        if not args.keep_cache:
            shutil.rmtree(tmp, ignore_errors=True)
    env = environment(threads)
    env["loadavg_start"] = loadavg_start
    env["loadavg_end_including_this_run"] = env.pop("loadavg")
    report = dict(env=env, config=dict(reps=reps, quick=args.quick, suite=args.suite, filter=args.filter, threads=threads,
                                       tolerances=TOL, sizes=SIZES["quick" if args.quick else "full"],
                                       params=dict(softcap=SOFTCAP, window=WINDOW, prefix=PREFIX, doc_seed=DOC_SEED),
                                       wall_s=time.perf_counter() - t0),
                  warmup=w, cases=results, summary=summarize(results))
    md = markdown(report)
    if out_path(args.json):
        out_path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out_path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if out_path(args.markdown):
        out_path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        out_path(args.markdown).write_text(md)
    if out_path(args.chart):
        out_path(args.chart).parent.mkdir(parents=True, exist_ok=True)
        try:
            chart(report, out_path(args.chart))
        except Exception as e:  # noqa: BLE001
            log(f"compare_torch: chart failed: {e}")
    print(md)
    log(f"compare_torch: done in {report['config']['wall_s']:.0f} s")
    bad = report["summary"]["disagree"] or any(c["impls"]["flexjit"].get("error") for c in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

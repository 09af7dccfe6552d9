#!/usr/bin/env python3
"""Varlen attention (flexjit.flash_attn_varlen_func) against the ways to run packed sequences
without it, on candle's varlen CPU shapes, in one run.

    PYTHONPATH=python python3 bench/varlen_bench.py                       # ~2-4 min on 2 cores
    PYTHONPATH=python python3 bench/varlen_bench.py --quick --dtype bf16 --json out.json

Shapes (D = 64, sequence lengths drawn uniformly from 128..2048 with a seed per shape, the same
for queries and keys): b4 hq8 hk8 non-causal and causal; b3 hq12 hk4 (GQA) causal; b2 hq8 hk8
ALiBi causal; b4 hq8 hk8 causal with a sliding window of 128 keys back.

Implementations, timed interleaved (one sample of each per repetition, the order rotated every
repetition) after a warm-up, on the same inputs; a sample is the mean of enough calls to last
--target-ms; medians of --reps samples are reported:

  varlen      flexjit.flash_attn_varlen_func on the packed tensors (FA2's API).
  padded      flexjit.flex_attention on the batch padded to the longest sequence [b, H, Lmax, D],
              with a key-padding mask `kv_idx < lens[b]` (and the causal / window band at the
              sequence's own positions), its BlockMask built once before the timing. Padded query
              rows are computed and thrown away: the padding's work.
  packed_doc  flexjit.flex_attention on the packed tensors as one sequence [1, H, total, D] with a
              document mask `doc[q_idx] == doc[kv_idx]` (and the band), BlockMask built once: how
              flexjit emulated varlen before it had it (no padding, a buffer read per score in
              partial blocks).
  sdpa        torch's scaled_dot_product_attention on the padded batch with a dense bool mask
              (key padding and band) or, for ALiBi, a dense fp32 bias with -inf where masked;
              built before the timing. Padded query rows are zeroed after (they attend to
              something; the other impls' padded rows are ignored too).
  unfused     per sequence: q @ k^T * scale (+ ALiBi bias), masked_fill with the band, softmax,
              @ v, in the input dtype (scores widened to fp32 for bf16): what a user writes
              without a varlen kernel, and already without padding.
  unfused_padded  the same math on the padded batch with sdpa's dense mask (eager attention
              on a padded batch, as model code without a varlen kernel runs it).

Numerics: every implementation's rows of real tokens against a float64 unfused reference; max
abs error, tolerance 1e-3 (fp32) / 3e-2 (bf16); the process exits 1 when one disagrees.

Rates: GFLOP/s = 4 * D * (kept (query, key) pairs, all heads) / time, the same count for every
implementation, so rate ratios are time ratios. Ratios are varlen's speed over each baseline's.
The issue's bar: beat padded flexjit by at least the padding fraction saved (speed-up over
`padded` >= 1 / (1 - padding fraction), with the padding fraction the share of the padded call's
(query, key) pairs that padding adds: padded query rows still attend to their sequence's keys)
and unfused by >= 10x. `row padding` is the share of padded query rows.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compare_torch as ct  # noqa: E402  (load(), environment(), log())

IMPLS = ("varlen", "padded", "packed_doc", "sdpa", "unfused", "unfused_padded")
TOL = {"fp32": 1e-3, "bf16": 3e-2}

SHAPES = [
    dict(name="b4_hq8_hk8_d64", b=4, hq=8, hk=8, causal=False),
    dict(name="b4_hq8_hk8_d64_causal", b=4, hq=8, hk=8, causal=True),
    dict(name="b3_hq12_hk4_d64_gqa_causal", b=3, hq=12, hk=4, causal=True),
    dict(name="b2_hq8_hk8_d64_alibi_causal", b=2, hq=8, hk=8, causal=True, alibi=True),
    dict(name="b4_hq8_hk8_d64_window128", b=4, hq=8, hk=8, causal=True, window=128),
]
D = 64


def lengths(shape, quick):
    g = ct.torch.Generator().manual_seed(1000 + SHAPES.index(shape))
    lo, hi = (64, 512) if quick else (128, 2048)
    return [int(x) for x in ct.torch.randint(lo, hi + 1, (shape["b"],), generator=g)]


def band(i, j, causal, window):
    """Kept (query i, key j) of one sequence (equal lengths: the diagonal is j == i)."""
    keep = ct.torch.ones(i.shape[0], j.shape[1], dtype=ct.torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j >= i - window
    return keep


def kept_pairs(lens, causal, window):
    n = 0
    for L in lens:
        for i in range(L):
            lo = max(0, i - window) if window is not None else 0
            hi = i if causal else L - 1
            n += hi - lo + 1
    return n


def padded_pairs(lens, lmax, causal, window):
    """(query, key) pairs the padded call computes: every row of the padded length, keys of the
    sequence inside the band (rows past a sequence's end see its keys up to the band's edge)."""
    n = 0
    for L in lens:
        for i in range(lmax):
            lo = max(0, i - window) if window is not None else 0
            hi = min(i, L - 1) if causal else L - 1
            n += max(0, hi - lo + 1)
    return n


def alibi_slopes(h):
    return ct.torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


class Case:
    def __init__(self, shape, dtype, quick):
        torch = ct.torch
        self.shape, self.dtype = shape, dtype
        self.tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        self.lens = lengths(shape, quick)
        self.b, self.hq, self.hk = shape["b"], shape["hq"], shape["hk"]
        self.causal, self.window = shape.get("causal", False), shape.get("window")
        self.alibi = alibi_slopes(self.hq) if shape.get("alibi") else None
        self.total, self.lmax = sum(self.lens), max(self.lens)
        self.cu = torch.tensor([0] + list(torch.tensor(self.lens).cumsum(0).tolist()), dtype=torch.int32)
        g = torch.Generator().manual_seed(7)
        self.q = torch.randn(self.total, self.hq, D, generator=g).to(self.tdtype)
        self.k = torch.randn(self.total, self.hk, D, generator=g).to(self.tdtype)
        self.v = torch.randn(self.total, self.hk, D, generator=g).to(self.tdtype)
        self.scale = 1 / math.sqrt(D)
        self.pairs = kept_pairs(self.lens, self.causal, self.window) * self.hq
        self.padded_pairs = padded_pairs(self.lens, self.lmax, self.causal, self.window) * self.hq
        self.row_padding = 1 - self.total / (self.b * self.lmax)
        # The share of the padded call's (query, key) pairs that padding adds: padded query rows
        # attend to their sequence's keys (the key-padding mask removes only padded keys).
        self.padding_fraction = 1 - self.pairs / self.padded_pairs

    # -- the band as text mods (in-sequence positions; padded and packed layouts) --
    def band_text(self, q, kv):
        parts = []
        if self.causal:
            parts.append(f"{kv} <= {q}")
        if self.window is not None:
            parts.append(f"{q} - {kv} <= {self.window}")
        return parts

    def seqs(self):
        for s, L in enumerate(self.lens):
            a = int(self.cu[s])
            yield s, a, L

    # ---------------------------------------------------------------- implementations
    def varlen(self):
        flexjit = ct.flexjit
        return lambda: flexjit.flash_attn_varlen_func(
            self.q, self.k, self.v, self.cu, self.cu, self.lmax, self.lmax, causal=self.causal,
            window_size=(self.window if self.window is not None else -1, -1), alibi_slopes=self.alibi)

    def padded_inputs(self):
        torch = ct.torch
        def pad(x):
            out = torch.zeros(self.b, self.lmax, x.shape[1], D, dtype=x.dtype)
            for s, a, L in self.seqs():
                out[s, :L] = x[a:a + L]
            return out.transpose(1, 2)  # [b, H, Lmax, D] (a strided view, as a model has)
        return pad(self.q), pad(self.k), pad(self.v)

    def unpad(self, out):
        """[b, H, Lmax, D] -> packed [total, H, D] rows of real tokens."""
        return ct.torch.cat([out[s, :, :L].transpose(0, 1) for s, _, L in self.seqs()])

    def padded(self):
        torch, flexjit = ct.torch, ct.flexjit
        qp, kp, vp = self.padded_inputs()
        lens = torch.tensor(self.lens, dtype=torch.int32)
        mask = " && ".join(["kv_idx < lens[b]"] + self.band_text("q_idx", "kv_idx"))
        score = "score - slopes[h] * abs(q_idx - kv_idx)" if self.alibi is not None else None
        bm = flexjit.create_block_mask(mask, self.b, None, self.lmax, self.lmax, buffers={"lens": lens})
        bufs = {"slopes": self.alibi} if self.alibi is not None else {}
        return lambda: flexjit.flex_attention(qp, kp, vp, score_mod=score, block_mask=bm, buffers=bufs,
                                              enable_gqa=self.hq != self.hk), self.unpad

    def packed_doc(self):
        torch, flexjit = ct.torch, ct.flexjit
        doc = torch.repeat_interleave(torch.arange(self.b, dtype=torch.int32), torch.tensor(self.lens))
        q1, k1, v1 = (x.transpose(0, 1)[None] for x in (self.q, self.k, self.v))  # [1, H, total, D] views
        mask = " && ".join(["doc[q_idx] == doc[kv_idx]"] + self.band_text("q_idx", "kv_idx"))
        score = "score - slopes[h] * abs(q_idx - kv_idx)" if self.alibi is not None else None
        bm = flexjit.create_block_mask(mask, None, None, self.total, self.total, buffers={"doc": doc})
        bufs = {"slopes": self.alibi} if self.alibi is not None else {}
        return (lambda: flexjit.flex_attention(q1, k1, v1, score_mod=score, block_mask=bm, buffers=bufs,
                                               enable_gqa=self.hq != self.hk),
                lambda out: out[0].transpose(0, 1))

    def sdpa(self):
        torch = ct.torch
        qp, kp, vp = self.padded_inputs()
        mask = self.padded_mask()
        if mask.dtype != torch.bool:
            mask = mask.to(self.tdtype)
        gqa = self.hq != self.hk
        return (lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask,
                                                                         enable_gqa=gqa), self.unpad)

    def padded_mask(self):
        """sdpa's mask: bool [b, 1, Lmax, Lmax] (key padding and band), or for ALiBi an fp32 bias
        [b, H, Lmax, Lmax] with -inf where masked."""
        torch = ct.torch
        i = torch.arange(self.lmax)[:, None]
        j = torch.arange(self.lmax)[None, :]
        keep = torch.zeros(self.b, 1, self.lmax, self.lmax, dtype=torch.bool)
        for s, _, L in self.seqs():
            keep[s, 0] = band(i, j, self.causal, self.window) & (j < L)
        if self.alibi is None:
            return keep
        bias = -self.alibi[None, :, None, None] * (i - j).abs().float()
        return bias.masked_fill(~keep, -math.inf)

    def unfused_padded(self):
        torch = ct.torch
        qp, kp, vp = self.padded_inputs()
        mask = self.padded_mask()
        group = self.hq // self.hk

        def run():
            ks, vs = (kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)) if group > 1 else (kp, vp)
            sc = (qp @ ks.transpose(-1, -2)).float() * self.scale
            sc = sc.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else sc + mask
            p = torch.softmax(sc, -1).nan_to_num(0.0).to(self.tdtype)  # padded rows may be all -inf
            return p @ vs
        return run, self.unpad

    def unfused(self, dtype=None):
        torch = ct.torch
        dtype = dtype or self.tdtype
        group = self.hq // self.hk
        slopes = self.alibi

        def run():
            outs = []
            for s, a, L in self.seqs():
                qs = self.q[a:a + L].transpose(0, 1).to(dtype)
                ks = self.k[a:a + L].transpose(0, 1).to(dtype)
                vs = self.v[a:a + L].transpose(0, 1).to(dtype)
                if group > 1:
                    ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
                sc = (qs @ ks.transpose(-1, -2)).to(torch.float64 if dtype == torch.float64 else torch.float32)
                sc = sc * self.scale
                i = torch.arange(L)[:, None]
                j = torch.arange(L)[None, :]
                if slopes is not None:
                    sc = sc - slopes.to(sc.dtype)[:, None, None] * (i - j).abs().to(sc.dtype)
                if self.causal or self.window is not None:
                    sc = sc.masked_fill(~band(i, j, self.causal, self.window), -math.inf)
                p = torch.softmax(sc, -1).to(dtype)
                outs.append((p @ vs).transpose(0, 1))
            return torch.cat(outs)
        return run, lambda out: out


def sample(fn, target_ms):
    t0 = time.perf_counter()
    fn()
    one = (time.perf_counter() - t0) * 1e3
    n = max(1, int(target_ms / max(one, 1e-3)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def run_case(case, reps, target_ms):
    torch = ct.torch
    res = dict(name=case.shape["name"], dtype=case.dtype, lens=case.lens, b=case.b, hq=case.hq, hk=case.hk, d=D,
               causal=case.causal, window=case.window, alibi=case.alibi is not None, total_tokens=case.total,
               max_len=case.lmax, row_padding=case.row_padding, padding_fraction=case.padding_fraction,
               kept_pairs=case.pairs, padded_pairs=case.padded_pairs, impls={})
    ref_fn, _ = case.unfused(torch.float64)
    ref = ref_fn()
    calls = {}
    for name in IMPLS:
        r = res["impls"][name] = {}
        try:
            t = time.perf_counter()
            got = getattr(case, name)()
            fn, post = (got, lambda o: o) if name == "varlen" else got
            out = post(fn())  # warm-up: compiles kernels, builds nothing inside the timing
            r["setup_and_first_call_ms"] = (time.perf_counter() - t) * 1e3
            r["max_abs_err"] = float((out.double() - ref).abs().max())
            r["ok"] = r["max_abs_err"] <= TOL[case.dtype]
            calls[name] = fn
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            ct.log(f"{res['name']}: {name} ERROR {r['error']}")
    samples = {n: [] for n in calls}
    order = list(calls)
    for rep in range(reps):
        for n in order[rep % len(order):] + order[:rep % len(order)]:
            samples[n].append(sample(calls[n], target_ms))
    for n, xs in samples.items():
        r = res["impls"][n]
        r["samples_ms"] = xs
        r["median_ms"] = statistics.median(xs)
        r["gflops"] = 4 * D * case.pairs / (r["median_ms"] * 1e6)
    v = res["impls"]["varlen"].get("median_ms")
    res["speedup"] = {n: res["impls"][n]["median_ms"] / v for n in samples if n != "varlen" and v}
    res["bar"] = dict(padded_needed=1 / (1 - case.padding_fraction),
                      padded_met=res["speedup"].get("padded", 0) >= 1 / (1 - case.padding_fraction),
                      unfused_needed=10.0, unfused_met=res["speedup"].get("unfused", 0) >= 10.0)
    ct.log(f"{res['name']} {case.dtype}: " + ", ".join(
        f"{n} {res['impls'][n]['median_ms']:.1f} ms" for n in samples) + f"; padding {case.padding_fraction:.0%}")
    return res


def markdown(report):
    env = report["environment"]
    lines = [f"# Varlen attention ({report['dtype']}), {env['date']}", "",
             f"Host: {env['cpu']}, {env['affinity']} CPUs, torch {env['torch']}, commit {env['git_commit']}"
             f"{' (dirty)' if env['git_dirty'] else ''}. Medians of {report['reps']} interleaved samples.", "",
             "| shape | tokens (max) | row / work padding | varlen ms | GFLOP/s | padded | packed_doc | sdpa | unfused | "
             "unfused padded | bar: padded / unfused |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        im, sp = c["impls"], c["speedup"]
        def x(n):
            if "error" in im.get(n, {}):
                return "error"
            return f"{im[n]['median_ms']:.1f} ms ({sp[n]:.2f}x)" if n in sp else "—"
        bar = c["bar"]
        lines.append(
            f"| {c['name']} | {c['total_tokens']} ({c['max_len']}) | {c['row_padding']:.0%} / {c['padding_fraction']:.0%} | "
            f"{im['varlen']['median_ms']:.1f} | {im['varlen']['gflops']:.0f} | {x('padded')} | {x('packed_doc')} | "
            f"{x('sdpa')} | {x('unfused')} | {x('unfused_padded')} | {'met' if bar['padded_met'] else 'MISSED'} "
            f"(>= {bar['padded_needed']:.2f}x) / {'met' if bar['unfused_met'] else 'MISSED'} |")
    lines += ["", "(Nx) = varlen's speed-up over that implementation. Bar: >= 1/(1 - padding) over padded, "
              ">= 10x over unfused.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target-ms", type=float, default=200.0)
    ap.add_argument("--quick", action="store_true", help="short sequences (64..512), 2 reps: a smoke run")
    ap.add_argument("--filter", default="", help="only shapes whose name contains this")
    ap.add_argument("--json", help="write the raw report here")
    ap.add_argument("--markdown", help="write the table here")
    a = ap.parse_args(argv)
    ct.load()
    reps = 2 if a.quick else a.reps
    cases = [s for s in SHAPES if a.filter in s["name"]]
    report = dict(dtype=a.dtype, reps=reps, quick=a.quick, environment=ct.environment(ct.torch.get_num_threads()),
                  cases=[])
    for s in cases:
        report["cases"].append(run_case(Case(s, a.dtype, a.quick), reps, a.target_ms))
    md = markdown(report)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    if a.markdown:
        Path(a.markdown).write_text(md)
    bad = [f"{c['name']}/{n}" for c in report["cases"] for n, r in c["impls"].items()
           if r.get("ok") is False or (n == "varlen" and "error" in r)]
    if bad:
        ct.log("numerics disagree or varlen failed: " + ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

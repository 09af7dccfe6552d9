#!/usr/bin/env python3
"""flexjit.flex_attention's backward pass (autograd) against PyTorch's CPU backwards: time and
peak memory of fwd + bwd and of the backward alone, in one run, plus a toy training check.

    PYTHONPATH=python python3 bench/backward_bench.py \\
        --out-json docs/backward-bench.json --out-md docs/backward-bench.md     # full run
    PYTHONPATH=python python3 bench/backward_bench.py --quick                   # smoke run, L 256
    PYTHONPATH=python python3 bench/backward_bench.py --lengths 512 --dims 64 --mods causal \\
        --dtypes fp32 --reps 2                                                  # one small case

Cases: every combination of L (--lengths, default 1024 2048 4096), D (--dims, 64 128), the mod
(--mods) and the dtype (--dtypes fp32 bf16), at B = 1, H = 8, Lq = Lkv = L, scale 1/sqrt(D):

  causal           the causal mask.
  alibi            causal + ALiBi: score + slopes[h] * (kv_idx - q_idx), slopes 2^(-8(h+1)/H)
                   fixed (no gradient).
  alibi_learnable  the same with slopes that require grad (a learnable captured tensor: every
                   implementation also returns d(slopes)).

Implementations, each run as `out = f(q, k, v); out.backward(g)` on leaf q, k, v that require
grad (grads reset to None after every call: nothing is retained between calls):

  flexjit  flexjit.flex_attention(q, k, v, score_mod=None | "score + slopes[h] * (kv_idx - q_idx)",
           block_mask=BM, mask_mod="causal", buffers={"slopes": slopes}); BM from
           flexjit.create_block_mask, built once per case before the timing.
  sdpa     torch.nn.functional.scaled_dot_product_attention: is_causal=True for causal; for alibi
           an additive bias attn_mask [1, H, L, L] in the input dtype with -inf above the diagonal,
           built once per case before the timing (its size is reported as setup memory, and added
           to SDPA's peak in the summary); for alibi_learnable the same bias is built INSIDE the
           call from the slopes (it must be, to differentiate them), which makes PyTorch run its
           math (unfused) SDPA backend: the table marks the backend the call's autograd node names.
  unfused  plain torch ops under autograd: q @ k^T * scale (+ slopes[h] * (kv - q)), masked_fill
           with a causal bool mask precomputed once, softmax, @ v. For bf16 the scores are widened
           to fp32 for the bias and the softmax and P is rounded to bf16 before @ v (as
           bench/compare_torch.py's unfused path does).

Timing: per case, one warm-up call of each implementation (JIT compile, numerics check), then
--reps repetitions; each repetition times every implementation's fwd + bwd, then every
implementation's backward alone (forward run untimed just before; only the .backward(g) call is
timed), interleaved in an order rotated every repetition. A sample is the mean of enough calls to
last ~--target-ms (one call for the big cases). Medians of the samples are reported with their
min / max.

Peak memory: a dedicated fwd + bwd call per implementation in each of the first --mem-reps
repetitions (not timed, so that measuring cannot perturb the timing): gc + malloc_trim(0), reset
the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), read VmRSS, run, read VmHWM
from /proc/self/status; the peak is VmHWM - VmRSS(before) in MiB: new resident memory the call
needs at its worst moment (the forward's saved tensors, the backward's temporaries, the grads).
It is the process's resident set: malloc_trim hands glibc's free pages back first, so every
tensor torch allocates in the call counts, even in reused heap; memory another allocator keeps
cached across calls (e.g. TBB's, after the warm-up) does not. Where clear_refs does not work
(checked at start), each measurement runs in a fresh subprocess instead (the same case and
implementation, a tiny warm-up call at L 256 to load the kernels, then one call) and reports
VmHWM after - VmRSS before (not ru_maxrss: after fork + exec Linux starts a child's ru_maxrss at
the parent's resident size; ru_maxrss deltas only where /proc is missing); the header says which
method ran. Scaling: an implementation's peak at 2L over its peak at L: ~2 linear, ~4 quadratic.

Numerics (unless --no-check): every implementation's out, dq, dk, dv (and d(slopes)) against a
float64 unfused reference on the same (rounded) inputs; error = max |x - ref| / max |ref| per
tensor, the max over tensors reported; tolerance 1e-3 (fp32) / 5e-2 (bf16). The process exits 1
(after writing its outputs) when flexjit errors or disagrees; a baseline's errors are reported.

Rates: GFLOP/s with the forward counted as 4 * B * H * D per unmasked (q, kv) pair (causal:
L (L + 1) / 2 pairs per head) and the backward as 2.5x the forward (fwd + bwd: 3.5x); every
implementation of a case gets the same count (SDPA and unfused compute the masked half too), so
rate ratios are time ratios. Ratios: the baseline's time over flexjit's (> 1: flexjit faster).

Toy training (unless --skip-train): x [1, 256, 128] (fixed), a learnable projection W_qkv and a
learnable relative-position bias table rel [H=4, 2L-1] (zeros at start), causal attention at
H 4, D 32, fp32, score + rel[h, q_idx - kv_idx + L - 1] (a Python score_mod, traced by flexjit);
MSE to targets made with a known table (ALiBi-like plus a sinusoid) and the initial W_qkv; 30
steps of Adam (lr 1e-2). Run twice from the same seed with flexjit (the loss curves must be
bitwise identical) and once with the unfused equivalent (max relative difference of the curves).

Outputs: markdown to stdout and --out-md, every measurement and the environment to --out-json;
progress on stderr. The markdown ends with the issue's targets, each met / not met with numbers.
"""

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_torch as ct  # noqa: E402  (load(), environment(), log())

IMPLS = ("flexjit", "sdpa", "unfused")
MODS = ("causal", "alibi", "alibi_learnable")
DTYPES = ("fp32", "bf16")
LENGTHS = (1024, 2048, 4096)
DIMS = (64, 128)
B, H = 1, 8
TOL = {"fp32": 1e-3, "bf16": 5e-2}
BWD_FLOP_FACTOR = 2.5
ALIBI_TEXT = "score + slopes[h] * (kv_idx - q_idx)"
MIB = 1024 * 1024
# Scaling classes for peak(2L) / peak(L).
LINEAR_MAX, QUADRATIC_MIN = 2.6, 3.4
TRAIN = dict(L=256, H=4, D=32, steps=30, lr=1e-2, seed=1234)
TRAIN_REL_TOL = 1e-3  # flexjit's loss curve vs unfused's, max relative difference

torch = flexjit = F = None


def load():
    global torch, flexjit, F
    ct.load()
    torch, flexjit, F = ct.torch, ct.flexjit, ct.F


# ------------------------------------------------------------------------- memory helpers ----

_libc = None


def _malloc_trim():
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def proc_status():
    """VmRSS and VmHWM of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) / 1024.0
    return out


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def settle():
    gc.collect()
    _malloc_trim()


def clear_refs_works():
    """True when writing 5 to /proc/self/clear_refs resets VmHWM to the current VmRSS."""
    try:
        settle()
        reset_peak()
        s0 = proc_status()
        x = ct.torch.ones(32 * MIB // 4)  # 32 MiB, touched
        s1 = proc_status()
        del x
        settle()
        reset_peak()
        s2 = proc_status()
        return (s1["VmHWM"] - s0["VmRSS"] >= 24 and s2["VmHWM"] - s2["VmRSS"] < 8
                and s2["VmHWM"] < s1["VmHWM"] - 16)
    except (OSError, KeyError, ValueError):
        return False


# ------------------------------------------------------------------------------ the cases ----

def parse_list(values, conv):
    out = []
    for v in values:
        out += [conv(x) for x in str(v).split(",") if x.strip()]
    return out


def alibi_slopes(h):
    return torch.exp2(-8.0 * torch.arange(1, h + 1, dtype=torch.float64) / h).float()


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Case:
    def __init__(self, L, D, mod, dtype):
        self.L, self.D, self.mod, self.dtype = L, D, mod, dtype
        self.tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        g = torch.Generator().manual_seed(1000 * L + D)
        self.q, self.k, self.v, self.g = (torch.randn(B, H, L, D, generator=g).to(self.tdtype) for _ in range(4))
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        self.alibi = mod in ("alibi", "alibi_learnable")
        self.learnable = mod == "alibi_learnable"
        self.slopes = alibi_slopes(H).requires_grad_(self.learnable)
        self.scale = 1.0 / math.sqrt(D)
        self.pairs = L * (L + 1) // 2  # causal, per (b, h)
        self.fwd_flop = 4.0 * B * H * D * self.pairs

    @property
    def name(self):
        return f"L{self.L}_D{self.D}_{self.mod}_{self.dtype}"

    def leaves(self):
        return [self.q, self.k, self.v] + ([self.slopes] if self.learnable else [])

    def clear_grads(self):
        for t in (self.q, self.k, self.v, self.slopes):
            t.grad = None

    # -- implementations: each returns (fn, info); fn() -> out; info: setup bytes, notes --
    def impl(self, name):
        return getattr(self, "impl_" + name)()

    def impl_flexjit(self):
        bm = flexjit.create_block_mask("causal", B, None, self.L, self.L)
        score = ALIBI_TEXT if self.alibi else None
        bufs = {"slopes": self.slopes} if self.alibi else None
        q, k, v = self.q, self.k, self.v

        def fn():
            return flexjit.flex_attention(q, k, v, score_mod=score, block_mask=bm, mask_mod="causal", buffers=bufs)
        setup = nbytes(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
        return fn, dict(setup_bytes=setup, how="BlockMask + " + ("score_mod text" if self.alibi else "no score_mod"))

    def rel_and_keep(self):
        i = torch.arange(self.L)[:, None]
        j = torch.arange(self.L)[None, :]
        return (j - i).float(), j <= i

    def impl_sdpa(self):
        q, k, v = self.q, self.k, self.v
        if not self.alibi:
            return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), dict(setup_bytes=0, how="is_causal")
        rel, keep = self.rel_and_keep()
        if not self.learnable:
            with torch.no_grad():
                mask = (self.slopes[:, None, None] * rel).masked_fill(~keep, -math.inf).to(self.tdtype)[None]
            del rel, keep
            return ((lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                    dict(setup_bytes=nbytes(mask), how=f"dense {self.dtype} bias [1,H,L,L] built before"))
        slopes, dt = self.slopes, self.tdtype

        def fn():
            bias = (slopes[:, None, None] * rel).masked_fill(~keep, -math.inf).to(dt)[None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return fn, dict(setup_bytes=nbytes(rel, keep), how=f"dense {self.dtype} bias built in the call (needs grad)")

    def impl_unfused(self, dtype=None):
        dtype = dtype or self.tdtype
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        rel, keep = self.rel_and_keep()
        rel = rel.to(wide)
        if dtype == torch.float64:
            q, k, v = (t.detach().double().requires_grad_(True) for t in (self.q, self.k, self.v))
            slopes = self.slopes.detach().double().requires_grad_(self.learnable)
        else:
            q, k, v, slopes = self.q, self.k, self.v, self.slopes
        scale, alibi = self.scale, self.alibi

        def fn():
            sc = (q @ k.transpose(-1, -2)).to(wide) * scale
            if alibi:
                sc = sc + slopes.to(wide)[:, None, None] * rel
            sc = sc.masked_fill(~keep, -math.inf)
            p = torch.softmax(sc, -1).to(dtype)
            return p @ v
        info = dict(setup_bytes=nbytes(rel, keep), how="autograd over matmul/softmax")
        if dtype == torch.float64:
            info["leaves"] = [q, k, v] + ([slopes] if self.learnable else [])
        return fn, info

    def reference(self):
        """float64 unfused out and grads on the same rounded inputs."""
        fn, info = self.impl_unfused(torch.float64)
        out = fn()
        out.backward(self.g.double())
        ref = dict(out=out.detach())
        for n, t in zip(("dq", "dk", "dv", "dslopes"), info["leaves"]):
            ref[n] = t.grad
        del fn, info, out
        return ref


def rel_err(x, ref):
    x, ref = x.detach().double(), ref.double()
    den = float(ref.abs().max())
    return float((x - ref).abs().max()) / (den if den > 0 else 1.0)


# ------------------------------------------------------------------------------- measuring ----

def call_fwdbwd(case, fn):
    out = fn()
    out.backward(case.g)
    del out
    case.clear_grads()


def sample_fwdbwd(case, fn, n):
    t = 0.0
    for _ in range(n):
        case.clear_grads()
        t0 = time.perf_counter()
        out = fn()
        out.backward(case.g)
        t += time.perf_counter() - t0
        del out
        case.clear_grads()
    return t * 1e3 / n


def sample_bwd(case, fn, n):
    t = 0.0
    for _ in range(n):
        case.clear_grads()
        out = fn()
        t0 = time.perf_counter()
        out.backward(case.g)
        t += time.perf_counter() - t0
        del out
        case.clear_grads()
    return t * 1e3 / n


def measure_mem_inproc(case, fn):
    case.clear_grads()
    settle()
    reset_peak()
    before = proc_status()["VmRSS"]
    out = fn()
    s1 = proc_status()
    reset_peak()
    out.backward(case.g)
    s2 = proc_status()
    del out
    case.clear_grads()
    fwd_peak, bwd_peak = s1["VmHWM"] - before, s2["VmHWM"] - before
    return dict(peak_mib=max(fwd_peak, bwd_peak), fwd_peak_mib=fwd_peak, after_fwd_mib=s1["VmRSS"] - before,
                bwd_peak_mib=bwd_peak)


def measure_mem_subprocess(case, impl):
    spec = json.dumps(dict(L=case.L, D=case.D, mod=case.mod, dtype=case.dtype, impl=impl))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mem-child", spec], capture_output=True,
                       text=True, env=env, timeout=3600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed (rc {r.returncode}): {r.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


def mem_child(spec):
    """One fwd + bwd in this fresh process: VmHWM after - VmRSS before, MiB. (Not ru_maxrss: after
    fork + exec Linux starts a child's ru_maxrss at the parent's resident size.)"""
    s = json.loads(spec)
    load()
    small = Case(min(256, s["L"]), s["D"], s["mod"], s["dtype"])  # loads / compiles the kernels
    fn, _ = small.impl(s["impl"])
    call_fwdbwd(small, fn)
    del fn, small
    case = Case(s["L"], s["D"], s["mod"], s["dtype"])
    fn, _ = case.impl(s["impl"])
    settle()
    try:
        s0 = proc_status()
        call_fwdbwd(case, fn)
        s1 = proc_status()
        res = dict(peak_mib=s1["VmHWM"] - s0["VmRSS"], how="VmHWM - VmRSS", raised=s1["VmHWM"] > s0["VmHWM"])
    except (OSError, KeyError):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        call_fwdbwd(case, fn)
        r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        if r1 <= r0:
            raise SystemExit("ru_maxrss did not rise during the call (it starts at the parent's size after exec)")
        res = dict(peak_mib=r1 - r0, how="ru_maxrss delta", raised=True)
    # Not raised: the call's peak stayed under an earlier one (start-up), so the figure is only an
    # upper bound of the call's own.
    print(json.dumps(res), flush=True)


def stats(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), samples=xs)


def run_case(case, a, mem_method, idx, total):
    tag = f"[{idx}/{total}] {case.name}"
    res = dict(name=case.name, L=case.L, D=case.D, mod=case.mod, dtype=case.dtype, B=B, H=H, pairs_per_head=case.pairs,
               fwd_gflop=case.fwd_flop / 1e9, bwd_gflop=BWD_FLOP_FACTOR * case.fwd_flop / 1e9, impls={})
    ref = None
    if not a.no_check:
        try:
            t = time.perf_counter()
            ref = case.reference()
            res["reference_s"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001
            res["reference_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            ct.log(f"{tag}: reference ERROR {res['reference_error']}")
        settle()
    calls = {}
    for name in a.impls:
        r = res["impls"][name] = {}
        try:
            fn, info = case.impl(name)
            r.update(setup_bytes=info["setup_bytes"], setup_mib=info["setup_bytes"] / MIB, how=info["how"])
            case.clear_grads()
            t = time.perf_counter()
            out = fn()
            out.backward(case.g)
            r["first_call_ms"] = (time.perf_counter() - t) * 1e3
            r["grad_fn"] = type(out.grad_fn).__name__ if out.grad_fn is not None else None
            if name == "sdpa":
                r["backend"] = "math (unfused)" if "FlashAttention" not in (r["grad_fn"] or "") else "flash (CPU)"
            if ref is not None:
                got = dict(out=out, dq=case.q.grad, dk=case.k.grad, dv=case.v.grad)
                if case.learnable:
                    got["dslopes"] = case.slopes.grad
                r["errors"] = {n: rel_err(got[n], ref[n]) for n in got}
                r["max_rel_err"] = max(r["errors"].values())
                r["ok"] = r["max_rel_err"] <= TOL[case.dtype]
                del got
            del out
            case.clear_grads()
            t0 = time.perf_counter()  # a second call: the sample size
            call_fwdbwd(case, fn)
            one = (time.perf_counter() - t0) * 1e3
            r["calls_per_sample"] = max(1, int(round(a.target_ms / max(one, 1e-3))))
            calls[name] = fn
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            ct.log(f"{tag}: {name} ERROR {r['error']}")
            case.clear_grads()
    del ref
    settle()
    fb = {n: [] for n in calls}
    bw = {n: [] for n in calls}
    mem = {n: [] for n in calls}
    order = list(calls)
    for rep in range(a.reps):
        rot = order[rep % len(order):] + order[:rep % len(order)] if order else []
        for n in rot:
            fb[n].append(sample_fwdbwd(case, calls[n], res["impls"][n]["calls_per_sample"]))
        for n in rot:
            bw[n].append(sample_bwd(case, calls[n], res["impls"][n]["calls_per_sample"]))
        if rep < a.mem_reps:
            for n in rot:
                try:
                    mem[n].append(measure_mem_inproc(case, calls[n]) if mem_method == "clear_refs"
                                  else measure_mem_subprocess(case, n))
                except Exception as e:  # noqa: BLE001
                    res["impls"][n]["mem_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
                    ct.log(f"{tag}: {n} memory ERROR {res['impls'][n]['mem_error']}")
    for n in calls:
        r = res["impls"][n]
        r["fwdbwd_ms"] = stats(fb[n])
        r["bwd_ms"] = stats(bw[n])
        r["bwd_gflops"] = BWD_FLOP_FACTOR * case.fwd_flop / (r["bwd_ms"]["median"] * 1e6)
        r["fwdbwd_gflops"] = (1 + BWD_FLOP_FACTOR) * case.fwd_flop / (r["fwdbwd_ms"]["median"] * 1e6)
        if mem[n]:
            r["mem_samples"] = mem[n]
            r["peak_mib"] = stats([m["peak_mib"] for m in mem[n]])
            r["peak_incl_setup_mib"] = r["peak_mib"]["median"] + r["setup_mib"]
            if any(m.get("raised") is False for m in mem[n]):
                r["peak_upper_bound"] = True
    fj = res["impls"].get("flexjit", {})
    ratios = {}
    if "fwdbwd_ms" in fj:
        for n in calls:
            if n == "flexjit":
                continue
            ratios[f"vs_{n}_fwdbwd"] = res["impls"][n]["fwdbwd_ms"]["median"] / fj["fwdbwd_ms"]["median"]
            ratios[f"vs_{n}_bwd"] = res["impls"][n]["bwd_ms"]["median"] / fj["bwd_ms"]["median"]
    res["ratios"] = ratios
    ct.log(f"{tag}: " + ", ".join(
        f"{n} fwd+bwd {res['impls'][n]['fwdbwd_ms']['median']:.1f} ms bwd {res['impls'][n]['bwd_ms']['median']:.1f} ms"
        + (f" peak {res['impls'][n]['peak_mib']['median']:.0f} MiB" if "peak_mib" in res["impls"][n] else "")
        for n in calls))
    del calls
    settle()
    return res


# ------------------------------------------------------------------------------- training ----

def train(kind, p=TRAIN):
    """Loss curve of the toy model; kind 'flexjit' or 'unfused'."""
    L, Hh, D = p["L"], p["H"], p["D"]
    E = Hh * D
    torch.manual_seed(p["seed"])
    x = torch.randn(1, L, E)
    w = torch.nn.Parameter(torch.randn(E, 3 * E) / math.sqrt(E))
    rel = torch.nn.Parameter(torch.zeros(Hh, 2 * L - 1))
    r = (torch.arange(2 * L - 1) - (L - 1)).double()  # q_idx - kv_idx
    s = torch.exp2(-8.0 * torch.arange(1, Hh + 1, dtype=torch.float64) / Hh)
    rel_true = -s[:, None] * r.abs() + 0.5 * torch.sin(r / 16.0)[None]
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    keep, ridx = j <= i, i - j + L - 1

    def qkv(weight):
        t = (x.to(weight.dtype) @ weight).view(1, L, 3, Hh, D).permute(2, 0, 3, 1, 4)
        return t[0], t[1], t[2]

    def unfused(q, k, v, table):
        sc = (q @ k.transpose(-1, -2)) / math.sqrt(D) + table[:, ridx]
        return torch.softmax(sc.masked_fill(~keep, -math.inf), -1) @ v

    with torch.no_grad():
        target = unfused(*qkv(w.double()), rel_true).float()
    bm = flexjit.create_block_mask("causal", 1, None, L, L) if kind == "flexjit" else None

    def attend(q, k, v):
        if kind == "unfused":
            return unfused(q, k, v, rel)
        return flexjit.flex_attention(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx:
                                      score + rel[h, q_idx - kv_idx + L - 1], block_mask=bm)
    opt = torch.optim.Adam([w, rel], lr=p["lr"])
    losses, times = [], []
    for _ in range(p["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ((attend(*qkv(w)) - target) ** 2).mean()
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.item())
    # The first step includes flexjit's trace / kernel compile: the median is the steady state.
    return dict(losses=losses, ms_per_step=statistics.median(times), first_step_ms=times[0],
                rel_final=rel.detach().clone())


def run_training():
    out = dict(config=dict(TRAIN))
    try:
        a, b = train("flexjit"), train("flexjit")
        u = train("unfused")
        la, lb, lu = a["losses"], b["losses"], u["losses"]
        out.update(
            flexjit_losses=la, flexjit_rerun_losses=lb, unfused_losses=lu,
            bitwise_identical=la == lb and torch.equal(a["rel_final"], b["rel_final"]),
            first_loss=la[0], last_loss=la[-1], unfused_first_loss=lu[0], unfused_last_loss=lu[-1],
            max_rel_diff_vs_unfused=max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(la, lu)),
            flexjit_ms_per_step=a["ms_per_step"], unfused_ms_per_step=u["ms_per_step"],
            flexjit_first_step_ms=a["first_step_ms"])
        out["loss_decreased"] = la[-1] < la[0]
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        ct.log(f"training ERROR {out['error']}")
    return out


# -------------------------------------------------------------------------- summarising ----

def scaling(cases, impls):
    """Per impl: peak(2L) / peak(L) for every (D, mod, dtype) with both lengths measured."""
    out = {}
    for n in impls:
        rows = []
        by = {}
        for c in cases:
            r = c["impls"].get(n, {})
            if "peak_mib" in r:
                by[(c["D"], c["mod"], c["dtype"], c["L"])] = (r["peak_mib"]["median"], r["peak_incl_setup_mib"])
        for (D, mod, dt, L), (p, ps) in sorted(by.items()):
            if (D, mod, dt, 2 * L) in by:
                p2, ps2 = by[(D, mod, dt, 2 * L)]
                rows.append(dict(D=D, mod=mod, dtype=dt, L=L, L2=2 * L, peak=p, peak2=p2,
                                 ratio=p2 / p if p > 0 else None,
                                 ratio_incl_setup=ps2 / ps if ps > 0 else None))
        rs = [x["ratio"] for x in rows if x["ratio"] is not None]
        out[n] = dict(rows=rows, median_ratio=statistics.median(rs) if rs else None,
                      max_ratio=max(rs) if rs else None, min_ratio=min(rs) if rs else None,
                      verdict=verdict(max(rs)) if rs else "not measured (needs L and 2L)")
    return out


def verdict(ratio):
    if ratio <= LINEAR_MAX:
        return "linear"
    if ratio >= QUADRATIC_MIN:
        return "quadratic"
    return "between linear and quadratic"


def targets(report):
    cases, t = report["cases"], []
    causal32 = [c for c in cases if c["mod"] == "causal" and c["dtype"] == "fp32" and "vs_sdpa_bwd" in c["ratios"]]
    if causal32:
        worst = min(causal32, key=lambda c: c["ratios"]["vs_sdpa_bwd"])
        met = all(c["ratios"]["vs_sdpa_bwd"] >= 1.0 for c in causal32)
        t.append(dict(target="at least as fast as SDPA's backward on causal fp32", met=met,
                      detail=f"SDPA bwd / flexjit bwd: " + ", ".join(
                          f"L{c['L']} D{c['D']} {c['ratios']['vs_sdpa_bwd']:.2f}x" for c in causal32)
                      + f"; worst {worst['ratios']['vs_sdpa_bwd']:.2f}x ({worst['name']})"
                      + "; fwd+bwd: " + ", ".join(f"{c['ratios']['vs_sdpa_fwdbwd']:.2f}x" for c in causal32)))
    else:
        t.append(dict(target="at least as fast as SDPA's backward on causal fp32", met=None,
                      detail="no causal fp32 case with both flexjit and SDPA ran"))
    unf = [c for c in cases if "vs_unfused_fwdbwd" in c["ratios"]]
    if unf:
        worst = min(unf, key=lambda c: c["ratios"]["vs_unfused_fwdbwd"])
        t.append(dict(target=">= 5x faster than unfused (fwd+bwd)",
                      met=all(c["ratios"]["vs_unfused_fwdbwd"] >= 5.0 for c in unf),
                      detail=f"unfused / flexjit fwd+bwd over {len(unf)} cases: min "
                             f"{worst['ratios']['vs_unfused_fwdbwd']:.2f}x ({worst['name']}), median "
                             f"{statistics.median(c['ratios']['vs_unfused_fwdbwd'] for c in unf):.2f}x, max "
                             f"{max(c['ratios']['vs_unfused_fwdbwd'] for c in unf):.2f}x"))
    else:
        t.append(dict(target=">= 5x faster than unfused (fwd+bwd)", met=None, detail="no case with both"))
    sc = report["memory_scaling"].get("flexjit")
    if sc and sc["max_ratio"] is not None:
        others = "; ".join(f"{n}: median {s['median_ratio']:.2f}" for n, s in report["memory_scaling"].items()
                           if n != "flexjit" and s["median_ratio"] is not None)
        t.append(dict(target="peak memory grows linearly in L, not quadratically", met=sc["max_ratio"] <= LINEAR_MAX,
                      detail=f"flexjit peak(2L)/peak(L): median {sc['median_ratio']:.2f}, range "
                             f"{sc['min_ratio']:.2f}-{sc['max_ratio']:.2f} over {len(sc['rows'])} doublings "
                             f"(linear <= {LINEAR_MAX}, ~2 ideal; quadratic ~4)" + (f"; {others}" if others else "")))
    else:
        t.append(dict(target="peak memory grows linearly in L, not quadratically", met=None,
                      detail="needs peak memory at L and 2L (run two lengths)"))
    tr = report.get("training")
    if tr and "bitwise_identical" in tr:
        met = tr["bitwise_identical"] and tr["loss_decreased"] and tr["max_rel_diff_vs_unfused"] <= TRAIN_REL_TOL
        t.append(dict(target="a learnable relative-position bias trains a toy model to the same loss curve, run after run",
                      met=met,
                      detail=f"two flexjit runs bitwise identical: {'yes' if tr['bitwise_identical'] else 'NO'}; loss "
                             f"{tr['first_loss']:.6g} -> {tr['last_loss']:.6g} in {tr['config']['steps']} steps; max "
                             f"relative difference to the unfused curve {tr['max_rel_diff_vs_unfused']:.2e} "
                             f"(bar {TRAIN_REL_TOL:g})"))
    else:
        t.append(dict(target="a learnable relative-position bias trains a toy model to the same loss curve, run after run",
                      met=None, detail="training " + ("skipped" if not tr else "failed: " + tr.get("error", "?"))))
    return t


def f_ms(x):
    return "—" if x is None else format(x, ".0f" if x >= 100 else ".1f" if x >= 10 else ".2f")


def f_spread(s):
    return f"{f_ms(s['median'])} ({f_ms(s['min'])}–{f_ms(s['max'])})"


def markdown(report):
    env, cfg = report["environment"], report["config"]
    lines = [
        "## flexjit backward (bench/backward_bench.py)", "",
        f"{env['date']}, commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} ({env.get('git_commit_full')}), "
        f"torch {env['torch']}, {env['cpu']}, {env['torch_threads']} torch threads, {env['affinity']} CPUs "
        f"({env['nproc']} cores), 1-min load average {env['loadavg'][0]:.2f} at the start, "
        f"{report['loadavg_end'][0]:.2f} at the end; op library {env['flexjit_library']} "
        f"(modified {env.get('flexjit_library_mtime')}).", "",
        f"B {B}, H {H}, Lq = Lkv = L, causal everywhere (alibi adds slopes[h] * (kv_idx - q_idx)). Times: medians "
        f"of {cfg['reps']} interleaved repetitions (min–max), each sample the mean of enough calls to last "
        f"~{cfg['target_ms']:g} ms; `bwd` times the .backward(g) call alone. Peak: {report['memory_method_text']}; "
        f"median of {cfg['mem_reps']} dedicated fwd+bwd call(s) per implementation, MiB; `+N` = memory built before "
        f"the call and held by it (SDPA's dense ALiBi mask, the unfused/SDPA-learnable rel/causal [L,L] tensors, "
        f"flexjit's BlockMask). GFLOP/s: forward = 4*B*H*D per unmasked (q, kv) pair (causal: L(L+1)/2 pairs per "
        f"head), backward = {BWD_FLOP_FACTOR}x forward; the same count for every implementation. `×` columns: "
        f"the baseline's median time over flexjit's (> 1: flexjit faster). err: max over out/dq/dk/dv(/dslopes) of "
        f"max|x-ref|/max|ref| against a float64 unfused reference (tolerance fp32 {TOL['fp32']:g}, bf16 "
        f"{TOL['bf16']:g}).", "",
        "### Summary (per case)", "",
        "| case | flexjit fwd+bwd ms | flexjit bwd ms | flexjit bwd GFLOP/s | ×SDPA bwd | ×SDPA fwd+bwd | "
        "×unfused fwd+bwd | peak MiB flexjit / SDPA / unfused |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def peak(r):
        if "peak_mib" not in r:
            return "—"
        extra = r.get("setup_mib", 0)
        return ("≤" if r.get("peak_upper_bound") else "") + f"{r['peak_mib']['median']:.0f}" + (f" (+{extra:.0f})" if extra >= 0.5 else "")

    def ratio(c, key):
        x = c["ratios"].get(key)
        return "—" if x is None else f"{x:.2f}"
    for c in report["cases"]:
        i = c["impls"]
        fj = i.get("flexjit", {})
        if "fwdbwd_ms" not in fj:
            lines.append(f"| {c['name']} | {'error: ' + fj.get('error', '?') if 'error' in fj else '—'} | | | | | | |")
            continue
        lines.append(f"| {c['name']} | {f_ms(fj['fwdbwd_ms']['median'])} | {f_ms(fj['bwd_ms']['median'])} | "
                     f"{fj['bwd_gflops']:.1f} | {ratio(c, 'vs_sdpa_bwd')} | {ratio(c, 'vs_sdpa_fwdbwd')} | "
                     f"{ratio(c, 'vs_unfused_fwdbwd')} | "
                     + " / ".join(peak(i.get(n, {})) for n in IMPLS) + " |")
    lines += ["", "### All measurements", "",
              "| case | impl | fwd+bwd ms (min–max) | bwd ms (min–max) | peak MiB fwd+bwd | bwd GFLOP/s | "
              "× fwd+bwd | × bwd | err | how |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in report["cases"]:
        for n, r in c["impls"].items():
            how = r.get("how", "") + (f"; SDPA backend {r['backend']}" if "backend" in r else "")
            if "fwdbwd_ms" not in r:
                lines.append(f"| {c['name']} | {n} | error: {r.get('error', '?')} | | | | | | | {how} |")
                continue
            err = "—" if "max_rel_err" not in r else f"{r['max_rel_err']:.1e}" + ("" if r["ok"] else " FAIL")
            rf = "" if n == "flexjit" else ratio(c, f"vs_{n}_fwdbwd")
            rb = "" if n == "flexjit" else ratio(c, f"vs_{n}_bwd")
            lines.append(f"| {c['name']} | {n} | {f_spread(r['fwdbwd_ms'])} | {f_spread(r['bwd_ms'])} | {peak(r)} | "
                         f"{r['bwd_gflops']:.1f} | {rf} | {rb} | {err} | {how} |")
    lines += ["", "### Peak memory scaling: peak(2L) / peak(L) (~2 linear, ~4 quadratic)", ""]
    ms = report["memory_scaling"]
    any_rows = any(s["rows"] for s in ms.values())
    if any_rows:
        lines += ["| impl | D | mod | dtype | L → 2L | peak MiB | ratio | ratio incl. setup |", "|---|---|---|---|---|---|---:|---:|"]
        for n, s in ms.items():
            for x in s["rows"]:
                lines.append(f"| {n} | {x['D']} | {x['mod']} | {x['dtype']} | {x['L']} → {x['L2']} | "
                             f"{x['peak']:.0f} → {x['peak2']:.0f} | {x['ratio']:.2f} | "
                             f"{'—' if x['ratio_incl_setup'] is None else format(x['ratio_incl_setup'], '.2f')} |")
        lines.append("")
    for n, s in ms.items():
        if s["median_ratio"] is None:
            lines.append(f"- {n}: {s['verdict']}")
        else:
            lines.append(f"- {n}: median {s['median_ratio']:.2f}, range {s['min_ratio']:.2f}–{s['max_ratio']:.2f} "
                         f"→ {s['verdict']}")
    tr = report.get("training")
    lines += ["", "### Toy training: learnable relative-position bias", ""]
    if not tr:
        lines.append("skipped (--skip-train)")
    elif "error" in tr:
        lines.append(f"error: {tr['error']}")
    else:
        p = tr["config"]
        lines += [
            f"L {p['L']}, H {p['H']}, D {p['D']}, fp32, causal, score + rel[h, q_idx - kv_idx + L - 1] (Python "
            f"score_mod), learnable W_qkv and rel [H, 2L-1], {p['steps']} Adam steps (lr {p['lr']:g}), seed {p['seed']}.", "",
            f"- flexjit, two runs from the same seed: loss curves bitwise identical: "
            f"**{'yes' if tr['bitwise_identical'] else 'NO'}**; loss {tr['first_loss']:.6g} → {tr['last_loss']:.6g} "
            f"(median {tr['flexjit_ms_per_step']:.1f} ms/step; first step, with the trace and compile, "
            f"{tr['flexjit_first_step_ms']:.0f} ms)",
            f"- unfused torch: loss {tr['unfused_first_loss']:.6g} → {tr['unfused_last_loss']:.6g} "
            f"(median {tr['unfused_ms_per_step']:.1f} ms/step)",
            f"- max relative difference of the loss curves (flexjit vs unfused): {tr['max_rel_diff_vs_unfused']:.2e}",
        ]
    lines += ["", "### Targets", ""]
    for t in report["targets"]:
        state = "not evaluated" if t["met"] is None else "**met**" if t["met"] else "**NOT met**"
        lines.append(f"- {t['target']}: {state}. {t['detail']}")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main ----

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", help=f"sequence lengths (default {' '.join(map(str, LENGTHS))}; --quick: 256)")
    ap.add_argument("--dims", nargs="+", help=f"head dims (default {' '.join(map(str, DIMS))})")
    ap.add_argument("--mods", nargs="+", help=f"mods among {', '.join(MODS)} (default all)")
    ap.add_argument("--dtypes", nargs="+", help="fp32, bf16 (default both)")
    ap.add_argument("--impls", nargs="+", help=f"implementations among {', '.join(IMPLS)} (default all)")
    ap.add_argument("--reps", type=int, help="timed repetitions (default 5; --quick 2)")
    ap.add_argument("--mem-reps", type=int, help="peak-memory calls per implementation (default 2; --quick 1)")
    ap.add_argument("--target-ms", type=float, help="length of one timing sample (default 200; --quick 50)")
    ap.add_argument("--mem-method", choices=["auto", "clear_refs", "subprocess"], default="auto")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 numerics check")
    ap.add_argument("--skip-train", action="store_true", help="skip the toy training check")
    ap.add_argument("--quick", action="store_true", help="smoke run: L 256, 2 reps")
    ap.add_argument("--out-json", help="write every measurement here")
    ap.add_argument("--out-md", help="write the markdown here")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mem_child:
        mem_child(a.mem_child)
        return 0
    lengths = parse_list(a.lengths, int) if a.lengths else ([256] if a.quick else list(LENGTHS))
    dims = parse_list(a.dims, int) if a.dims else list(DIMS)
    mods = parse_list(a.mods, str) if a.mods else list(MODS)
    dtypes = parse_list(a.dtypes, str) if a.dtypes else list(DTYPES)
    a.impls = parse_list(a.impls, str) if a.impls else list(IMPLS)
    for what, got, known in (("mods", mods, MODS), ("dtypes", dtypes, DTYPES), ("impls", a.impls, IMPLS)):
        bad = [x for x in got if x not in known]
        if bad:
            ap.error(f"unknown {what} {bad}; known: {list(known)}")
    if "flexjit" not in a.impls:
        ap.error("--impls must include flexjit (the ratios are against it)")
    a.reps = a.reps if a.reps is not None else (2 if a.quick else 5)
    a.mem_reps = min(a.reps, a.mem_reps if a.mem_reps is not None else (1 if a.quick else 2))
    a.target_ms = a.target_ms if a.target_ms is not None else (50.0 if a.quick else 200.0)

    load()
    env = ct.environment(torch.get_num_threads())
    try:
        env["git_commit_full"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        env["git_commit_full"] = None
    try:
        env["flexjit_library_mtime"] = time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                     time.localtime(os.path.getmtime(flexjit.library_path())))
    except Exception:  # noqa: BLE001
        env["flexjit_library_mtime"] = None
    if a.mem_method == "auto":
        mem_method = "clear_refs" if clear_refs_works() else "subprocess"
    else:
        mem_method = a.mem_method
    mem_text = ("in process: VmHWM after - VmRSS before, the high-water mark reset by writing 5 to "
                "/proc/self/clear_refs (after gc + malloc_trim)" if mem_method == "clear_refs" else
                "one fresh subprocess per measurement (a call at L 256 to load the kernels, then the case's call): "
                "VmHWM after - VmRSS before, or the ru_maxrss delta without /proc; `≤`: the call did not raise "
                "the high-water mark the start-up left, an upper bound (clear_refs "
                + ("not used: --mem-method subprocess" if a.mem_method == "subprocess" else
                   "does not reset VmHWM here") + ")")
    ct.log(f"backward_bench: memory method {mem_method}; {torch.get_num_threads()} torch threads")
    cases = [(L, D, m, dt) for dt in dtypes for D in dims for m in mods for L in lengths]
    report = dict(config=dict(lengths=lengths, dims=dims, mods=mods, dtypes=dtypes, impls=a.impls, reps=a.reps,
                              mem_reps=a.mem_reps, target_ms=a.target_ms, quick=a.quick, B=B, H=H,
                              check=not a.no_check, bwd_flop_factor=BWD_FLOP_FACTOR,
                              flop_convention="forward 4*B*H*D per unmasked (q,kv) pair, causal L(L+1)/2 pairs per "
                                              "head; backward 2.5x forward; fwd+bwd 3.5x"),
                  environment=env, memory_method=mem_method, memory_method_text=mem_text, cases=[])
    for idx, (L, D, m, dt) in enumerate(cases, 1):
        case = Case(L, D, m, dt)
        report["cases"].append(run_case(case, a, mem_method, idx, len(cases)))
        del case
        settle()
    report["memory_scaling"] = scaling(report["cases"], a.impls)
    if not a.skip_train:
        ct.log("toy training ...")
        report["training"] = run_training()
    report["loadavg_end"] = list(os.getloadavg())
    report["targets"] = targets(report)
    md = markdown(report)
    print(md)
    if a.out_md:
        Path(a.out_md).write_text(md)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(report, indent=1) + "\n")
    bad = [f"{c['name']}: " + ("error" if "error" in c["impls"]["flexjit"] else "numerics")
           for c in report["cases"] if "error" in c["impls"]["flexjit"] or c["impls"]["flexjit"].get("ok") is False]
    if report.get("training", {}).get("error"):
        bad.append("training: error")
    if bad:
        ct.log("flexjit failed: " + ", ".join(bad))
        return 1
    return 0 if cases or not a.skip_train else 2


if __name__ == "__main__":
    sys.exit(main())

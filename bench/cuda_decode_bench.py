#!/usr/bin/env python3
"""flexjit's CUDA flash decoding against PyTorch's on one GPU: bf16, Llama-3.1-8B heads (Hq 32,
Hkv 8, D 128), one query token per sequence, batch x KV length from 1 x 4k to 64 x 64k (B x KV up
to 4M tokens).

Per case, each after --warmup calls, the median of --iters by CUDA events:
  - torch.compile(flex_attention) on the contiguous cache (PyTorch's flex decoding: it splits the
    keys itself, by a heuristic);
  - flexjit.flex_attention on the same contiguous cache (the split from the tuning database or
    the cost model);
  - flexjit.paged_flex_attention on the same keys in a paged cache (pages of 16, shuffled block
    table, seq_lens on the device: what a serving loop holds; PyTorch has no paged flex call to
    set beside it, so its contiguous time is the baseline for both).
GB/s counts the K and V bytes one call reads; the device-to-device copy bandwidth (a 1 GiB
torch copy, bytes read + written) is measured in the same run as the ceiling. Each flexjit output
is checked against the compiled flex_attention's (max |diff| printed; above --tol the run fails,
exit 2). The issue's bars are printed beside each row: >= 70% of the copy bandwidth where
B x KV >= 256k tokens, and >= 1.2x torch.compile's time on every case.

    python3 bench/cuda_decode_bench.py [--json PATH] [--cases 1x4096,8x32768] [--quick]

Without a CUDA device it says so and exits 0. Needs `import flexjit` ($FLEXJIT_TORCH_OPS, else
build/); the CUDA-only build's op library works too."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402

from cuda_prefill_bench import context, cuda_time_ms, measure  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
CASES = "1x4096,1x131072,8x32768,16x16384,64x4096,64x65536"
QUICK = "1x4096,8x32768,64x4096"


def copy_gbs(dev):
    """Device-to-device copy bandwidth of 1 GiB (bytes read + written per second)."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev).fill_(1.0)
    b = torch.empty_like(a)
    ms = cuda_time_ms(lambda: b.copy_(a), 3, 10)
    del a, b
    return 2.0 * (1 << 30) / (ms * 1e-3) / 1e9


def paged_cache(k, v, dev, seed):
    """k, v [B, Hkv, L, D] as pages of PAGE slots [num_pages, PAGE, Hkv, D], shuffled, with the
    block table [B, L / PAGE] (int32) that finds them."""
    B, _, L, _ = k.shape
    n = B * L // PAGE

    def pages(t):
        return t.view(B, HKV, L // PAGE, PAGE, D).permute(0, 2, 3, 1, 4).reshape(n, PAGE, HKV, D)

    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(dev)
    table = torch.empty(n, dtype=torch.int32, device=dev)
    table[perm] = torch.arange(n, dtype=torch.int32, device=dev)
    return pages(k)[perm].contiguous(), pages(v)[perm].contiguous(), table.view(B, L // PAGE)


def run_suite(args, dev, ceiling):
    import flexjit
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    compiled = torch.compile(torch_flex, dynamic=False)
    rows = []
    print(f"{'B':>3} {'KV':>7}  {'impl':<26} {'ms':>8} {'GB/s':>7} {'copy%':>6} {'vs torch':>8}  bars / max|diff|")
    for case in args.cases.split(","):
        B, L = (int(x) for x in case.split("x"))
        torch.manual_seed(B * 7 + L)
        q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
        k_cache, v_cache, table = paged_cache(k, v, dev, seed=L)
        seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        impls = [("torch.compile(flex)", lambda: compiled(q, k, v, enable_gqa=True)),
                 ("flexjit", lambda: flexjit.flex_attention(q, k, v, enable_gqa=True)),
                 ("flexjit paged16", lambda: flexjit.paged_flex_attention(q, k_cache, v_cache, table, seq_lens,
                                                                         enable_gqa=True))]
        kv_bytes = 2.0 * B * HKV * L * D * 2
        torch_ms = None
        with torch.no_grad():
            for impl, ms, diff, ok in measure(impls, args.warmup, args.iters, args.tol):
                ours = diff is not None
                gbs = kv_bytes / (ms * 1e-3) / 1e9
                if not ours:
                    torch_ms = ms
                speedup = torch_ms / ms
                bars = ""
                if ours:
                    bw_bar = B * L >= 256 * 1024
                    bars = (f"{'>=' if speedup >= 1.2 else '<'}1.2x"
                            + (f", {'>=' if gbs >= 0.7 * ceiling else '<'}70% copy" if bw_bar else "")
                            + f"  {diff:.2e}" + ("" if ok else "  MISMATCH"))
                print(f"{B:>3} {L:>7}  {impl:<26} {ms:>8.3f} {gbs:>7.0f} {100 * gbs / ceiling:>5.0f}% "
                      f"{speedup:>7.2f}x  {bars}")
                rows.append(dict(B=B, kv=L, Hq=HQ, Hkv=HKV, D=D, dtype="bf16", impl=impl, ms=ms, gbs=gbs,
                                 copy_fraction=gbs / ceiling, speedup_vs_torch_compile=speedup if ours else None,
                                 max_abs_diff_vs_flex=diff, ok=ok))
        del q, k, v, k_cache, v_cache, table, seq_lens
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cases", default=CASES, help="BxKV list (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"cases {QUICK}")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tol", type=float, default=2e-2, help="max |flexjit - flex| allowed (bf16 outputs)")
    args = ap.parse_args()
    if args.quick:
        args.cases = QUICK
    if not torch.cuda.is_available():
        print("cuda_decode_bench: no CUDA device: skipped (torch.cuda.is_available() is False)")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(skipped="no CUDA device"), indent=2) + "\n")
        return 0
    import flexjit

    if flexjit.library_path() is None:
        print("cuda_decode_bench: libflexjit_torch_ops.so not found: build it (scripts/gpu_check.sh does) or set "
              "FLEXJIT_TORCH_OPS")
        return 1
    dev = torch.device("cuda")
    ctx = context()
    ceiling = copy_gbs(dev)
    ctx["copy_gbs"] = ceiling
    print(f"cuda_decode_bench: {ctx['gpu']} ({ctx['sm']}, {ctx['sm_count']} SMs), torch {ctx['torch']}, "
          f"commit {ctx['git']}; device-to-device copy {ceiling:.0f} GB/s")
    rows = run_suite(args, dev, ceiling)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(context=ctx, results=rows), indent=2) + "\n")
    return 2 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

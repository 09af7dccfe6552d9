#!/usr/bin/env python3
"""torch.compile(flex_attention) on prefill_bench's engine cases, as a prefill_bench-style JSON.

    python3 bench/engines_torch.py --json torch.json [--reps 3] [--filter fp32/D64] [--threads N]

The engines table (scripts/engines_bench.sh, scripts/engines_report.py) puts flexjit's engines
and targets next to libtorch SDPA, both timed by build/bench/prefill_bench, and next to
`torch.compile(flex_attention)`, timed here: the same cases (B 1, H 8, L = Lq = Lkv 2048 and
8192, D 64 and 128, fp32, bf16 and fp16; no mod, causal as a BlockMask of 128 x 128 blocks, ALiBi as a
score_mod over captured fp32 slopes 2^(-8 (h+1) / H), as the registry's "alibi" example), the same
effective-FLOP count (bench/flops.h: 4 * B * H * L^2 * D over the blocks the BlockMask visits,
so a causal case counts the diagonal blocks whole), and the same output rows: one benchmark per
case named `prefill/<dtype>/D<D>/L<L>/<mods>/torch.compile/real_time`, aggregate `median`, with
`real_time` in ms and a `GFLOP/s` counter, so engines_report.py reads it like prefill_bench's.

Per case: a fresh torch.compile (torch._dynamo.reset()), one untimed first call (its time, the
compile, is recorded as `first_call_ms`), then `--reps` timed calls; the median is reported.
At L 2048 the output is checked against libtorch SDPA in fp32 on the same rounded inputs
(`max_abs_err`), so a wrong baseline cannot go unnoticed.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

B, H, BLOCK = 1, 8, 128
DTYPES = ["fp32", "bf16", "fp16"]
HEAD_DIMS = [64, 128]
LENGTHS = [2048, 8192]
MODS = ["none", "causal", "alibi"]


def effective_flops(L, D, mods):
    n = (L + BLOCK - 1) // BLOCK
    visited = n * (n + 1) // 2 if mods == "causal" else n * n
    density = visited / (n * n)
    return 4.0 * B * H * L * L * D * density


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output path (prefill_bench-style JSON)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per case (median reported)")
    ap.add_argument("--filter", default="", help="run only cases whose name (e.g. bf16/D128/L8192/alibi) contains this")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)

    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    flex = None
    rows = []
    for dtype in DTYPES:
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        for D in HEAD_DIMS:
            for L in LENGTHS:
                for mods in MODS:
                    case = f"{dtype}/D{D}/L{L}/{mods}"
                    if args.filter and args.filter not in case:
                        continue
                    g = torch.Generator().manual_seed(0)
                    q, k, v = (torch.randn(B, H, L, D, generator=g).to(tdt) for _ in range(3))
                    score_mod, block_mask = None, None
                    if mods == "alibi":
                        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H).float()

                        def score_mod(score, b, h, q_idx, kv_idx, slopes=slopes):
                            return score + slopes[h] * (kv_idx - q_idx)
                    elif mods == "causal":
                        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, L, L,
                                                       device="cpu", BLOCK_SIZE=BLOCK)
                    torch._dynamo.reset()
                    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)

                    def call():
                        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

                    t = time.perf_counter()
                    out = call()
                    first_ms = (time.perf_counter() - t) * 1e3
                    err = None
                    if L <= 2048:
                        bias = None
                        if mods == "alibi":
                            i = torch.arange(L)
                            bias = slopes.view(H, 1, 1) * (i.view(1, 1, L) - i.view(1, L, 1)).float()
                        ref = torch.nn.functional.scaled_dot_product_attention(
                            q.float(), k.float(), v.float(), attn_mask=bias, is_causal=(mods == "causal"))
                        err = float((out.float() - ref).abs().max())
                    times = []
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        call()
                        times.append((time.perf_counter() - t) * 1e3)
                    ms = statistics.median(times)
                    gflops = effective_flops(L, D, mods) / (ms * 1e-3) / 1e9
                    name = f"prefill/{case}/torch.compile/real_time"
                    row = dict(name=name, run_name=name, run_type="aggregate", aggregate_name="median",
                               time_unit="ms", real_time=ms, repetitions=args.reps, first_call_ms=first_ms,
                               samples_ms=times, **{"GFLOP/s": gflops})
                    if err is not None:
                        row["max_abs_err"] = err
                    rows.append(row)
                    print(f"{name}: {ms:.1f} ms median of {args.reps}, {gflops:.0f} GFLOP/s, first call {first_ms:.0f} ms"
                          + (f", max |err| vs SDPA {err:.2e}" if err is not None else ""), file=sys.stderr, flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    ctx = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), torch=torch.__version__,
               python=platform.python_version(), flexjit_cpu_model=cpu, threads=threads,
               loadavg=list(os.getloadavg()), flexjit_cpu_target="torch.compile")
    with open(args.json, "w") as f:
        json.dump(dict(context=ctx, benchmarks=rows), f, indent=1)


if __name__ == "__main__":
    main()

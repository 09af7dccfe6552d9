#!/usr/bin/env python3
"""The CPU decode kernel's two engines side by side: the dot engine (USE_AMX=0) against AMX tiles
(USE_AMX=1) on the same calls, over the query rows per KV head (GQA group x Lq) that decide
which one wins, contiguous and paged (pages of 16 keys, shuffled) KV caches.

    python3 bench/decode_engines.py [--dtype bf16] [--reps 15] [--json OUT.json]

Each call is timed after reading a 512 MiB buffer, so K and V come from DRAM as in a serving
loop (the VM's L3 would otherwise hold them); medians of --reps calls. Both engines' outputs are
checked against an fp32 PyTorch reference first. Prints a Markdown table (ms, GB/s of K + V,
AMX over dot) and writes the rows as JSON. Needs an AMX host (else USE_AMX=1 is refused and the
script says so) and the op library (build/ or FLEXJIT_TORCH_OPS).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flexjit  # noqa: E402

# (B, Hq, Hkv, KV length, Lq): rows per KV head = Hq / Hkv x Lq.
CASES = [
    (1, 32, 32, 16384, 1),  # MHA: 1 row
    (1, 32, 16, 32768, 1),  # 2 rows
    (1, 32, 8, 32768, 1),   # Llama-3.1-8B: 4 rows
    (4, 32, 8, 16384, 1),
    (1, 32, 8, 32768, 2),   # speculative, 2 tokens: 8 rows
    (1, 64, 8, 32768, 1),   # Llama-3.1-70B: 8 rows
    (1, 32, 8, 32768, 4),   # speculative, 4 tokens: 16 rows
    (1, 32, 1, 32768, 1),   # MQA: 32 rows
]
D = 128
PAGE = 16


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_sha():
    try:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        sha = subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.call(["git", "-C", root, "diff", "--quiet", "HEAD"]) != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    flush = torch.zeros(128 * 1024 * 1024)  # 512 MiB

    def timed(f):
        f()
        ts = []
        for _ in range(a.reps):
            flush.add_(1)
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    g = torch.Generator().manual_seed(0)
    rows_out = []
    print(f"decode engines, {a.dtype}, D {D}, {cpu_name()}, {torch.get_num_threads()} threads, commit {git_sha()}\n")
    print("| layout | B | Hq | Hkv | KV | Lq | rows | dot ms | dot GB/s | amx ms | amx GB/s | amx / dot |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for paged in (False, True):
        for (B, hq, hkv, L, lq) in CASES:
            q = torch.randn(B, hq, lq, D, generator=g).to(dtype)
            k = torch.randn(B, hkv, L, D, generator=g).to(dtype)
            v = torch.randn(B, hkv, L, D, generator=g).to(dtype)
            if paged:
                pages = B * L // PAGE
                order = torch.randperm(pages, generator=g)
                kc = torch.empty(pages, PAGE, hkv, D, dtype=dtype)
                vc = torch.empty_like(kc)
                kc[order] = k.reshape(B, hkv, L // PAGE, PAGE, D).permute(0, 2, 3, 1, 4).reshape(pages, PAGE, hkv, D)
                vc[order] = v.reshape(B, hkv, L // PAGE, PAGE, D).permute(0, 2, 3, 1, 4).reshape(pages, PAGE, hkv, D)
                table = order.to(torch.int32).reshape(B, L // PAGE)
                lens = torch.full((B,), L, dtype=torch.int32)

                def call(amx):
                    return flexjit.paged_flex_attention(q, kc, vc, table, lens, enable_gqa=True,
                                                        kernel_options={"USE_AMX": amx})
            else:
                def call(amx):
                    return flexjit.flex_attention(q, k, v, enable_gqa=True, kernel_options={"USE_AMX": amx})
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
            ms = {}
            for amx in (0, 1):
                try:
                    out = call(amx)
                except ValueError as e:
                    print(f"USE_AMX={amx} refused here: {e}")
                    return 1
                err = (out.float() - ref).abs().max().item()
                if not err <= 2e-2:
                    print(f"USE_AMX={amx} differs from the fp32 reference by {err}: not timed")
                    return 1
                ms[amx] = timed(lambda: call(amx))
            gb = B * hkv * L * D * 2 * q.element_size() / 1e9
            row = dict(layout="paged" if paged else "contig", B=B, Hq=hq, Hkv=hkv, KV=L, Lq=lq, rows=hq // hkv * lq,
                       dot_ms=ms[0], amx_ms=ms[1], dot_GBps=gb / ms[0] * 1e3, amx_GBps=gb / ms[1] * 1e3,
                       amx_over_dot=ms[0] / ms[1])
            rows_out.append(row)
            print(f"| {row['layout']} | {B} | {hq} | {hkv} | {L} | {lq} | {row['rows']} | {ms[0]:.2f} | "
                  f"{row['dot_GBps']:.1f} | {ms[1]:.2f} | {row['amx_GBps']:.1f} | {row['amx_over_dot']:.2f}x |")
    if a.json:
        json.dump(dict(cpu=cpu_name(), threads=torch.get_num_threads(), commit=git_sha(), dtype=a.dtype,
                       date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__, rows=rows_out),
                  open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

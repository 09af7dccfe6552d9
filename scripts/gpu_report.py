#!/usr/bin/env python3
"""The README's GPU table from one scripts/gpu_check.sh run: reads OUTDIR's gpu_check.json,
cuda_bench.json, cuda_prefill_bench.json and cuda_decode_bench.json (whichever exist) and prints
Markdown with the device, the date and the commit, and only what those files measured: no file,
no row. Each row says how it stands against issues 9 and 10's bars (prefill >= 0.8x
torch.compile(flex_attention); decode >= 1.2x torch.compile's decoding and, at B x KV >= 256k
tokens, >= 70% of the device-to-device copy bandwidth; NVRTC cold compile <= 2 s, disk hit
<= 20 ms).

    python3 scripts/gpu_report.py OUTDIR [OUTDIR2 ...] --commit abc1234 [--date 2026-12-03] > table.md

The GPU machine gets a copy of the working tree without .git, so the commit is given here."""

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path


def load(outdirs, name):
    """name's measurements from the last of outdirs that has them (a check split over calls)."""
    for out in reversed(outdirs):
        p = Path(out) / name
        if p.exists():
            data = json.loads(p.read_text())
            if "skipped" not in data:
                return data
    return None


def prefill_table(bench):
    """flexjit vs torch.compile(flex) vs SDPA per (case, L), from cuda_prefill_bench.json."""
    rows = {}
    for r in bench["results"]:
        rows.setdefault((r["case"], r["L"], r["B"], r["H"]), {})[r["impl"]] = r
    ours = sorted({r["impl"] for r in bench["results"] if r["impl"].startswith("flexjit")})
    head = ["case", "L", "B x H"] + [f"{o} TFLOP/s" for o in ours] + ["torch.compile(flex) TFLOP/s", "SDPA TFLOP/s",
                                                                      "best flexjit / torch.compile", ">= 0.8x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, L, B, H), impls in sorted(rows.items()):
        theirs = impls.get("torch.compile(flex)")
        cells = [case, str(L), f"{B} x {H}"]
        for o in ours:
            r = impls.get(o)
            cells.append("" if r is None else f"{r['tflops']:.0f}" + ("" if r.get("ok", True) else " (MISMATCH)"))
        cells.append(f"{theirs['tflops']:.0f}" if theirs else "")
        sdpa = next((r for i, r in impls.items() if i.startswith("sdpa")), None)
        cells.append(f"{sdpa['tflops']:.0f}" if sdpa else "")
        good = [impls[o] for o in ours if o in impls and impls[o].get("ok", True)]
        if theirs and good:
            ratio = theirs["ms"] / min(r["ms"] for r in good)
            cells += [f"{ratio:.2f}x", "yes" if ratio >= 0.8 else "no"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def decode_table(bench):
    ceiling = bench["context"].get("copy_gbs")
    lines = [f"Device-to-device copy (the ceiling, same run): {ceiling:.0f} GB/s." if ceiling else "",
             "",
             "| B | KV | impl | ms | GB/s | % of copy | vs torch.compile | bars |",
             "|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        ours = r["impl"].startswith("flexjit")
        bars = ""
        if ours:
            bars = ("1.2x " + ("yes" if r["speedup_vs_torch_compile"] >= 1.2 else "no"))
            if r["B"] * r["kv"] >= 256 * 1024:
                bars += ", 70% " + ("yes" if r["copy_fraction"] >= 0.7 else "no")
            if r.get("ok") is False:
                bars += ", MISMATCH"
        lines.append(f"| {r['B']} | {r['kv']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.0f} | "
                     f"{100 * r['copy_fraction']:.0f}% | "
                     f"{'' if not ours else '%.2fx' % r['speedup_vs_torch_compile']} | {bars} |")
    return lines


def kernel_tables(kb):
    lines = [f"Kernels alone (`flexjit_cuda_bench`, {kb.get('arch')}, {kb.get('sm_count')} SMs; copy "
             f"{kb.get('copy_gbs', 0):.0f} GB/s):", "",
             "| prefill | L | engine | BLOCK | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    wrong = lambda r: " (WRONG output)" if r.get("ok") is False else ""
    for r in kb.get("prefill", []):
        lines.append(f"| {r['mod']} | {r['L']} | {r.get('engine', 'mma')} | {r['block_m']}x{r['block_n']} | "
                     f"{r['ms']:.3f} | {r['tflops']:.0f}{wrong(r)} |")
    lines += ["", "| decode B | KV | layout | variant | ms | GB/s | % of copy | partitions |",
              "|---|---|---|---|---|---|---|---|"]
    for r in kb.get("decode", []):
        lines.append(f"| {r['B']} | {r['kv']} | {'paged16' if r['paged'] else 'contiguous'} | "
                     f"{r.get('variant', 'cost model')} | {r['ms']:.3f} | "
                     f"{r['gbs']:.0f}{wrong(r)} | {100 * r['copy_fraction']:.0f}% | {r['partitions']} |")
    return lines


def decode_verdict(kb):
    """Which decode variant (the cost model's split, BLOCK_N 64, twice / half the partitions) the
    kernel bench found fastest per case, and by how much over the cost model: what to change in
    runtime/cuda_decode.cpp (the GPU host cannot build the tuner)."""
    cases = {}
    for r in kb.get("decode", []):
        if r.get("ok") is not False:
            cases.setdefault((r["B"], r["kv"], r["paged"]), []).append(r)
    wins, gains = {}, []
    for rows in cases.values():
        best = min(rows, key=lambda r: r["ms"])
        wins[best.get("variant", "cost model")] = wins.get(best.get("variant", "cost model"), 0) + 1
        model = next((r for r in rows if r.get("variant", "cost model") == "cost model"), None)
        if model:
            gains.append((model["ms"] / best["ms"], best))
    if not cases:
        return []
    lines = ["Fastest decode variant per case: " + ", ".join(
        f"{k} {v}/{len(cases)}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1])) + "."]
    worst = max(gains, key=lambda g: g[0]) if gains else None
    if worst and worst[0] > 1.03:
        b = worst[1]
        lines.append(f"Largest gain over the cost model: {worst[0]:.2f}x ({b.get('variant')} at B {b['B']}, "
                     f"KV {b['kv']}, {'paged' if b['paged'] else 'contiguous'}).")
    return lines


def engine_verdict(kb, selftest_ok):
    """Which prefill engine / tile the kernel bench found fastest, case by case, and what that says
    for the default (runtime/cuda_prefill.cpp cuda_resolve_wgmma / cuda_prefill_kernel_spec)."""
    cases = {}
    for r in kb.get("prefill", []):
        if r.get("ok") is not False:  # a kernel with a wrong output wins nothing
            cases.setdefault((r["mod"], r["L"]), []).append(r)
    if not cases:
        return []
    wins, speedups = {}, []
    for rows in cases.values():
        best = min(rows, key=lambda r: r["ms"])
        name = f"{best.get('engine', 'mma')} {best['block_m']}x{best['block_n']}"
        wins[name] = wins.get(name, 0) + 1
        default = next((r for r in rows if r.get("engine", "mma") == "mma" and r["block_m"] == 64), None)
        if default:
            speedups.append(default["ms"] / best["ms"])
    top = max(wins, key=wins.get)
    speedups.sort()
    lines = [f"Fastest prefill kernel per case: " + ", ".join(f"{k} {v}/{len(cases)}" for k, v in
                                                          sorted(wins.items(), key=lambda kv: -kv[1])) + "."]
    if speedups:
        lines.append(f"Over the current default (mma 64x64): median {statistics.median(speedups):.2f}x, "
                     f"range {speedups[0]:.2f}x-{speedups[-1]:.2f}x.")
    if not top.startswith("mma"):
        lines.append("Make it the default only if the self-test's wgmma cases and probe passed"
                     + (" (they did)." if selftest_ok else " (they did NOT, or did not run)."))
    return lines


def compile_lines(bench):
    lines = []
    for case, phases in bench.get("compile", {}).items():
        for phase, r in phases.items():
            if "error" in r:
                lines.append(f"- NVRTC {phase} ({case}): FAILED")
            else:
                bar = 2000.0 if phase == "cold" else 20.0
                lines.append(f"- NVRTC {phase} ({case}): {r['compile_ms']:.1f} ms "
                             f"({'within' if r['compile_ms'] <= bar else 'over'} the {bar:g} ms bar)")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="+", help="one run's OUTDIR, or several (a check split over calls)")
    ap.add_argument("--commit", required=True, help="the commit the GPU machine ran (its copy has no .git)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    check = {}  # gpu_check.json of every call, merged: what a call ran wins over what it left out
    for out in args.outdir:
        p = Path(out) / "gpu_check.json"
        if p.exists():
            check.update({k: v for k, v in json.loads(p.read_text()).items() if v not in (-1, "", None, "skipped")})
    kb = load(args.outdir, "cuda_bench.json")
    pb = load(args.outdir, "cuda_prefill_bench.json")
    db = load(args.outdir, "cuda_decode_bench.json")
    ctx = (pb or db or {}).get("context", {})
    if not (kb or pb or db):
        print(f"gpu_report: {args.outdir} holds no GPU measurement (skipped or missing): nothing to report")
        return 1
    gpu = ctx.get("gpu") or (kb or {}).get("device") or "a GPU (not named in the files)"
    if "emulat" in gpu.lower():
        print(f"gpu_report: {', '.join(args.outdir)} comes from {gpu}: its times measure the CPU emulator, "
              "not a GPU; nothing to report")
        return 1
    out = [f"Measured on {gpu} ({ctx.get('sm', check.get('arch', '?'))}, {ctx.get('sm_count', '?')} SMs), "
           f"{args.date}, commit {args.commit}, torch {ctx.get('torch', '?')}, CUDA {ctx.get('cuda', '?')}.", ""]
    if check:
        out += [f"Self-test: {check.get('result', '?')}; test_cuda.py exit {check.get('test_cuda_rc')}.", ""]
    if pb:
        out += ["Prefill, bf16, D 128 (TFLOP/s; causal counted as half):", ""] + prefill_table(pb) + [""]
        out += compile_lines(pb) + [""]
    if db:
        out += ["Decode, bf16, Hq 32, Hkv 8, D 128, one query token:", ""] + decode_table(db) + [""]
    if kb:
        out += kernel_tables(kb) + [""]
        ok = "(0 failures)" in check.get("result", "")
        out += engine_verdict(kb, ok) + decode_verdict(kb) + [""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

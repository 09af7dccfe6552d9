#!/usr/bin/env python3
"""Turns build/bench/decode_bench's JSON into a Markdown table and a summary.

    build/bench/decode_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \\
        --benchmark_out=decode.json --benchmark_out_format=json
    python3 scripts/decode_report.py decode.json [--json summary.json]

One row per case (dtype / shape / KV length / layout): flexjit's time with the planner's knobs,
its GB/s of K+V and % of the DRAM read bandwidth measured right before each call (the
benchmark's paired measurement), the knobs it used and where they came from, and its speed
over each other implementation of the case (> 1: flexjit faster): the cost model's knobs
(`model`), a fixed PARTITION_SIZE of 128 (`p128`), no split (`nosplit`), the dot engine where
flexjit ran the AMX one (`dot`, bf16), the forced prefill kernel and libtorch SDPA. Medians of
the repetitions.
"""

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict


def load(path):
    data = json.load(open(path))
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        if b.get("aggregate_name", "median") != "median" or b.get("error_occurred"):
            continue
        name = re.sub(r"/(iterations:\d+|real_time)", "", b.get("run_name", b["name"]))
        if not name.startswith("decode/"):
            continue
        case, impl = name.rsplit("/", 1)
        ms = b["real_time"] * {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]
        rows[case][impl] = dict(ms=ms, **{k: b[k] for k in ("GBps", "pct_of_dram", "dram_GBps", "partition_size",
                                                            "num_partitions", "block_n", "tuned", "amx") if k in b})
    return data.get("context", {}), rows


def ratio(row, other):
    a, b = row.get("flexjit"), row.get(other)
    return b["ms"] / a["ms"] if a and b else None


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--json", dest="out_json", default=None, help="also write the summary as JSON")
    a = p.parse_args(argv)
    ctx, rows = load(a.json)
    print(f"decode_bench at {ctx.get('flexjit_git_sha', '?')}, {ctx.get('flexjit_cpu_model', '?')}, "
          f"{ctx.get('flexjit_threads', '?')} threads, {ctx.get('date', '')}\n")
    impls = ("model", "p128", "nosplit", "dot", "prefill", "sdpa")
    print("| case | flexjit ms | GB/s | % of DRAM | DRAM GB/s | knobs | ×model | ×p128 | ×nosplit | ×dot | ×prefill "
          "| ×SDPA |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    summary = defaultdict(list)
    for case in sorted(rows, key=lambda c: (c.split("/")[1], c.split("/")[2], int(c.split("/")[3][2:]), c)):
        r = rows[case]
        f = r.get("flexjit")
        if not f:
            continue
        knobs = (f"P={int(f.get('partition_size', 0))} x{int(f.get('num_partitions', 0))} N={int(f.get('block_n', 0))} "
                 f"{'tuned' if f.get('tuned') else 'model'} {'amx' if f.get('amx') else 'dot'}")
        rs = {k: ratio(r, k) for k in impls}
        for k, v in rs.items():
            summary[k].append(v)
        summary["pct_of_dram"].append(f.get("pct_of_dram"))
        if "KV32768" in case and "mqa" not in case:
            summary["pct_of_dram_32k"].append(f.get("pct_of_dram"))
        if "mqa" in case:
            summary["mqa_split_over_nosplit"].append(rs["nosplit"])
        print(f"| {case} | {f['ms']:.3f} | {f.get('GBps', 0):.1f} "
              f"| {fmt(f.get('pct_of_dram'), '.0f')} | {fmt(f.get('dram_GBps'), '.1f')} | {knobs} | "
              + " | ".join(fmt(rs[k]) for k in impls) + " |")
    out = {k: dict(geomean=geomean(v), min=min((x for x in v if x), default=None),
                   max=max((x for x in v if x), default=None)) for k, v in summary.items()}
    print("\n**Summary** (geomean, min-max): " + "; ".join(
        f"{k} {fmt(v['geomean'])} ({fmt(v['min'])}-{fmt(v['max'])})" for k, v in out.items()))
    if a.out_json:
        json.dump(dict(context=ctx, summary=out, rows=rows), open(a.out_json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

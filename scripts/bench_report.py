#!/usr/bin/env python3
"""Summarises flexjit's Google Benchmark JSON files as Markdown tables (and JSON).

    scripts/bench_report.py prefill.json compile.json [--json report.json]

Reads the files written by `--benchmark_out=F --benchmark_out_format=json` of
build/bench/prefill_bench and build/bench/compile_bench. With repetitions
(`--benchmark_repetitions=3 --benchmark_report_aggregates_only=true`) the median
aggregates are used; without, the median of the plain runs of each benchmark. A
benchmark found in several files (several runs) gets the median of their values.

Prefill rows pair the implementations of one case by name,
`prefill/<dtype>/D<D>/L<L>/<mods>/<impl>` with impl in flexjit, sdpa, unfused; the
ratios are flexjit's rate over the baseline's (> 1: flexjit is faster; every impl of
a case is credited with the same effective FLOPs, so this is the time ratio).
Compile rows list each `compile/...` and `blockmask/...` benchmark with its target.

Python 3 standard library only.
"""

import argparse
import json
import math
import re
import statistics
import sys

IMPLS = ("flexjit", "sdpa", "unfused")
# Name components Google Benchmark appends to a registered name.
SUFFIX = re.compile(r"^(real_time|manual_time|process_time"
                    r"|(min_time|min_warmup_time|iterations|repeats|threads):.*)$")
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
# Targets for the compile-latency rows: (time or a counter, limit in ms).
TARGETS = {
    "memory_hit": ("time", 0.020),        # <= 20 us per repeat lookup
    "disk_hit_load": ("time", 30.0),      # <= 30 ms to load a cached kernel
    "disk_hit_process": ("load_ms", 30.0),
    "disk_hit_process_cli": ("load_ms", 30.0),
    "build": ("time", 1000.0),            # 128k x 128k BlockMask well under 1 s
}
# Counters worth showing next to a compile row, in this order.
COMPILE_COUNTERS = ("compile_ms", "first_in_process_ms", "plan_source_ms", "frontend_ms",
                    "optimize_ms", "codegen_ms", "load_ms", "object_KiB", "lookup_us",
                    "main_to_kernel_ms", "exec_to_main_ms", "MiB", "density",
                    "decided_by_interval", "evaluated")


def base_name(entry):
    """The registered name: run_name (or name) without Google Benchmark's suffixes."""
    name = entry.get("run_name") or entry["name"]
    parts = name.split("/")
    while parts and SUFFIX.match(parts[-1]):
        parts.pop()
    return "/".join(parts)


def load(paths):
    """Returns (merged context, {name: result}, {name: error message})."""
    context, aggregates, runs, errors = {}, {}, {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for key, value in data.get("context", {}).items():
            context.setdefault(key, value)  # the first file that has a key wins
        for e in data.get("benchmarks", []):
            name = base_name(e)
            if e.get("error_occurred"):
                errors[name] = e.get("error_message", "error")
                continue
            if e.get("run_type") == "aggregate":
                if e.get("aggregate_name") == "median":
                    aggregates.setdefault(name, []).append(e)
            else:
                runs.setdefault(name, []).append(e)
    results = {}
    for name, es in aggregates.items():
        results[name] = summarise(es)
    for name, es in runs.items():
        if name not in results:
            results[name] = summarise(es)
    for name in results:
        errors.pop(name, None)  # some repetitions ran: the median stands
    return context, results, errors


def summarise(entries):
    """Median time (ms) and median of every numeric counter over `entries`."""
    skip = {"iterations", "real_time", "cpu_time", "repetitions", "repetition_index",
            "threads", "family_index", "per_family_instance_index", "runs"}
    out = {"time_ms": statistics.median(
        e["real_time"] * TO_MS[e.get("time_unit", "ns")] for e in entries)}
    for key in entries[0]:
        if key in skip or not isinstance(entries[0][key], (int, float)) or \
                isinstance(entries[0][key], bool):
            continue
        vals = [e[key] for e in entries if isinstance(e.get(key), (int, float))]
        out[key] = statistics.median(vals)
    # Timed runs behind the value: repetitions per aggregate, else one per plain entry.
    out["runs"] = sum(e.get("repetitions", 1) if e.get("run_type") == "aggregate" else 1
                      for e in entries)
    return out


def prefill_rows(results, errors):
    cases = {}
    names = list(results) + list(errors)
    for name in names:
        parts = name.split("/")
        if len(parts) != 6 or parts[0] != "prefill" or parts[5] not in IMPLS:
            continue
        cases.setdefault("/".join(parts[1:5]), {})[parts[5]] = name
    rows = []
    for case, impls in cases.items():
        dtype, d, l, mods = case.split("/")
        row = {"case": case, "dtype": dtype, "D": int(d[1:]), "L": int(l[1:]), "mods": mods}
        for impl in IMPLS:
            name = impls.get(impl)
            r = results.get(name) if name else None
            row[impl + "_gflops"] = r.get("GFLOP/s") if r else None
            row[impl + "_ms"] = r["time_ms"] if r else None
            row[impl + "_max_abs_err"] = r.get("max_abs_err") if r else None
            if name in errors:
                row[impl + "_note"] = errors[name]
        f = results.get(impls.get("flexjit"), {})
        row["flexjit_pct_of_ceiling"] = f.get("pct_of_ceiling")
        for base in ("sdpa", "unfused"):
            a, b = row["flexjit_gflops"], row[base + "_gflops"]
            row["flexjit_over_" + base] = a / b if a and b else None
        rows.append(row)
    order = {m: i for i, m in enumerate(("none", "causal", "alibi", "causal_alibi"))}
    rows.sort(key=lambda r: (r["dtype"] != "fp32", r["dtype"], r["D"], r["L"],
                             order.get(r["mods"], 9), r["mods"]))
    return rows


def compile_rows(results, errors):
    rows = []
    for name in sorted(set(results) | set(errors)):
        if not (name.startswith("compile/") or name.startswith("blockmask/")):
            continue
        r = results.get(name)
        row = {"benchmark": name, "time_ms": r["time_ms"] if r else None,
               "counters": {k: r[k] for k in COMPILE_COUNTERS if r and k in r}}
        if name in errors:
            row["note"] = errors[name]
        target = TARGETS.get(name.rsplit("/", 1)[-1])
        if target and r:
            what, limit = target
            value = r["time_ms"] if what == "time" else r.get(what)
            row["target"] = "%s <= %s" % (what, fmt_time(limit))
            row["meets_target"] = value is not None and value <= limit
        rows.append(row)
    return rows


def fmt_time(ms):
    if ms is None:
        return "—"
    if ms < 1:
        return "%.1f us" % (ms * 1e3)
    if ms < 1000:
        return "%.1f ms" % ms
    return "%.2f s" % (ms / 1e3)


def fmt(x, spec="%.1f"):
    return "—" if x is None else spec % x


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def markdown(context, prefill, compile_, out=sys.stdout):
    w = out.write
    load = context.get("load_avg")
    w("Context: commit %s, %s, %s threads, LLVM %s, torch %s, %s, load average at start %s\n\n" % (
        context.get("flexjit_git_sha", "?"), context.get("flexjit_cpu_model", "?"),
        context.get("flexjit_threads", "?"), context.get("flexjit_llvm", "?"),
        context.get("flexjit_torch_version", "off" if "flexjit_torch" in context else "n/a"),
        context.get("date", "?"),
        " / ".join("%.1f" % x for x in load) if load else "?"))
    if prefill:
        w("| case | flexjit GFLOP/s | sdpa GFLOP/s | unfused GFLOP/s | flexjit/sdpa "
          "| flexjit/unfused | flexjit % of ceiling |\n")
        w("|---|---:|---:|---:|---:|---:|---:|\n")
        for r in prefill:
            unfused = fmt(r["unfused_gflops"])
            if r["unfused_gflops"] is None and "skipped" in r.get("unfused_note", ""):
                unfused = "skipped"
            w("| %s | %s | %s | %s | %s | %s | %s |\n" % (
                r["case"], fmt(r["flexjit_gflops"]), fmt(r["sdpa_gflops"]), unfused,
                fmt(r["flexjit_over_sdpa"], "%.2f"), fmt(r["flexjit_over_unfused"], "%.2f"),
                fmt(r["flexjit_pct_of_ceiling"], "%.1f%%")))
        w("\nGFLOP/s over effective FLOPs (visited blocks only; bench/flops.h); ceiling = "
          "2-core fp32 FMA peak, %s GFLOP/s. Ratios > 1: flexjit faster.\n" %
          context.get("flexjit_fp32_ceiling_gflops", "270"))
        for dtype in sorted({r["dtype"] for r in prefill}):
            rs = [r for r in prefill if r["dtype"] == dtype]
            w("Geometric mean, %s: flexjit/sdpa %s, flexjit/unfused %s (over %d cases).\n" % (
                dtype, fmt(geomean(r["flexjit_over_sdpa"] for r in rs), "%.2f"),
                fmt(geomean(r["flexjit_over_unfused"] for r in rs), "%.2f"), len(rs)))
        notes = sorted({r[k] for r in prefill for k in r if k.endswith("_note")})
        for n in notes:
            w("Note: %s\n" % n)
    if compile_:
        w("%s| benchmark | median | target | details |\n|---|---:|---|---|\n" %
          ("\n" if prefill else ""))
        for r in compile_:
            target = r.get("target", "")
            if target:
                target += " (met)" if r["meets_target"] else " (MISSED)"
            details = ", ".join("%s=%s" % (k, fmt_counter(v)) for k, v in r["counters"].items())
            if r.get("note"):
                details = (details + "; " if details else "") + r["note"]
            w("| %s | %s | %s | %s |\n" % (r["benchmark"], fmt_time(r["time_ms"]), target,
                                           details))


def fmt_counter(v):
    if abs(v) >= 1000 or v == int(v):
        return "%d" % round(v)
    return "%.3g" % v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="Google Benchmark JSON output files")
    ap.add_argument("--json", metavar="OUT", help="also write the tables as JSON to OUT")
    args = ap.parse_args(argv)
    context, results, errors = load(args.files)
    prefill = prefill_rows(results, errors)
    compile_ = compile_rows(results, errors)
    markdown(context, prefill, compile_)
    if args.json:
        keep = ("date", "host_name", "num_cpus", "load_avg", "library_build_type")
        ctx = {k: v for k, v in context.items() if k.startswith("flexjit_") or k in keep}
        with open(args.json, "w") as f:
            json.dump({"context": ctx, "prefill": prefill, "compile": compile_}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

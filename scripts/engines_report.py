#!/usr/bin/env python3
"""Side-by-side table of prefill_bench runs made under different engines and compile targets.

    scripts/engines_report.py host.json host_fma.json v3.json ... > table.md

Each input is a prefill_bench --benchmark_out JSON (medians are used when repetitions were
aggregated). Every flexjit row is labelled engine@target by the benchmark; SDPA rows are
columns of their own. Cells: GFLOP/s (% of the measured ceiling of the engine's instruction).
The ceilings come from each file's context.
"""
import json
import sys
from collections import OrderedDict


def rows(path):
    data = json.load(open(path))
    ctx = data.get("context", {})
    out = []
    for b in data["benchmarks"]:
        if b.get("aggregate_name", "median") != "median" or b.get("error_occurred"):
            continue
        name = b["run_name"] if "run_name" in b else b["name"]
        parts = name.split("/")  # prefill/<dtype>/D<D>/L<L>/<mods>/<impl>/real_time
        case = "/".join(parts[1:5])
        impl = parts[5]
        col = b.get("label", impl) if impl == "flexjit" else impl
        col = f"{parts[1]} {col}"
        pct = b.get("pct_of_engine_ceiling")
        out.append((case, col, b.get("GFLOP/s", 0.0) , pct))
    return ctx, out


def main(paths):
    table = OrderedDict()
    cols = []
    ceilings = []
    for p in paths:
        ctx, rs = rows(p)
        ceilings.append((p, ctx.get("flexjit_cpu_target", "?"), ctx.get("flexjit_ceiling_fma512_gflops"),
                         ctx.get("flexjit_ceiling_fma256_gflops"), ctx.get("flexjit_ceiling_dpbf16_gflops"),
                         ctx.get("flexjit_git_sha"), ctx.get("flexjit_cpu_model")))
        for case, col, gf, pct in rs:
            shape = case.split("/", 1)[1]  # D/L/mods (dtype goes into the column)
            if col not in cols:
                cols.append(col)
            cell = f"{gf:.0f}" + (f" ({pct:.0f}%)" if pct is not None else "")
            table.setdefault(shape, {})[col] = cell
    print("| case | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for shape, cells in table.items():
        print(f"| {shape} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    print()
    print("Ceilings measured by each run (GFLOP/s, 2 threads): file, target, fma512, fma256, vdpbf16ps, commit, CPU")
    for c in ceilings:
        print("- " + ", ".join(str(x) for x in c))


if __name__ == "__main__":
    main(sys.argv[1:])

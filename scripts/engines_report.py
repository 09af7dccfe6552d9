#!/usr/bin/env python3
"""Side-by-side table of prefill_bench runs made under different engines and compile targets.

    scripts/engines_report.py host.json host_fma.json v3.json ... > table.md

Each input is a prefill_bench --benchmark_out JSON (medians are used when repetitions were
aggregated). Every flexjit row is labelled engine@target by the benchmark; SDPA rows are
columns of their own. Cells: GFLOP/s (% of the measured ceiling of the engine's instruction).
The ceilings come from each file's context. A torch.compile(flex_attention) file written by
bench/engines_torch.py adds a `torch.compile` column per dtype; then a second table gives the
first file's flexjit column of each dtype (the host's default engine) over SDPA and over
torch.compile (> 1: flexjit faster; the same FLOP count on every side, so this is the time ratio).
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
    raw = {}
    cols = []
    ceilings = []
    for p in paths:
        ctx, rs = rows(p)
        ceilings.append((p, ctx.get("flexjit_cpu_target", "?"), ctx.get("flexjit_ceiling_fma512_gflops"),
                         ctx.get("flexjit_ceiling_fma256_gflops"), ctx.get("flexjit_ceiling_dpbf16_gflops"),
                         ctx.get("flexjit_ceiling_amx_gflops"), ctx.get("flexjit_git_sha"), ctx.get("flexjit_cpu_model")))
        for case, col, gf, pct in rs:
            shape = case.split("/", 1)[1]  # D/L/mods (dtype goes into the column)
            if col not in cols:
                cols.append(col)
            cell = f"{gf:.0f}" + (f" ({pct:.0f}%)" if pct is not None else "")
            table.setdefault(shape, {})[col] = cell
            raw[(shape, col)] = gf
    print("| case | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for shape, cells in table.items():
        print(f"| {shape} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    default = {}
    for c in cols:
        dtype, impl = c.split(" ", 1)
        if "@" in impl and dtype not in default:
            default[dtype] = c
    ratio_cols = [(d, base) for d in default for base in ("sdpa", "torch.compile") if f"{d} {base}" in cols]
    if ratio_cols:
        print()
        print("| case | " + " | ".join(f"{default[d]} / {base}" for d, base in ratio_cols) + " |")
        print("|---|" + "---:|" * len(ratio_cols))
        spans = {}
        for shape in table:
            cells = []
            for d, base in ratio_cols:
                a, b = raw.get((shape, default[d])), raw.get((shape, f"{d} {base}"))
                if a and b:
                    cells.append(f"{a / b:.2f}x")
                    spans.setdefault((d, base), []).append(a / b)
                else:
                    cells.append("")
            print(f"| {shape} | " + " | ".join(cells) + " |")
        print()
        for (d, base), xs in spans.items():
            print(f"- {default[d]} over {d} {base}: {min(xs):.2f}x - {max(xs):.2f}x over {len(xs)} cases")
    print()
    print("Ceilings measured by each run (GFLOP/s, 2 threads): file, target, fma512, fma256, vdpbf16ps, "
          "AMX tdpbf16ps (fp16 on AMX is held to a third of it: three products each), commit, CPU")
    for c in ceilings:
        print("- " + ", ".join(str(x) for x in c))


if __name__ == "__main__":
    main(sys.argv[1:])

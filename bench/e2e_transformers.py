#!/usr/bin/env python3
"""End to end: greedy generation with Hugging Face transformers on random-weight Llama-shaped
models, flexjit's attention backend against transformers' own, in one run.

    PYTHONPATH=python python3 bench/e2e_transformers.py                 # the bar case (~3 min)
    PYTHONPATH=python python3 bench/e2e_transformers.py --prompts 512 2048 8192 --batches 1 4 \\
        --impls flexjit sdpa eager flex_attention --json out.json --markdown out.md --chart out.png

Models (no weights are downloaded; weights are random with a fixed seed, the same for every
implementation): `1b` is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP
8192, vocab 128256, tied embeddings); `8b` is Llama-3.1-8B-shaped (hidden 4096, 32 layers, 32 / 8
heads, MLP 14336): 16 GB in bf16, which fits this 24 GB machine only with nothing else loaded and
takes tens of minutes per case on 2 cores, so it runs only when asked for (--models 8b).

Implementations: flexjit, flexjit_paged (flexjit with flexjit.hf.PagedCache: K/V kept in pages and
read in place by paged_flex_attention), sdpa, eager, flex_attention (transformers' own).

For each model, prompt length and batch (random token ids, no padding), each implementation
generates --new-tokens tokens greedily (do_sample=False, min_new_tokens = max_new_tokens, a
DynamicCache). Timestamps of every generated token (a stopping criterion that never stops) split
the time into prefill (start to first token, which includes the prompt's forward pass) and
decode (tokens/s over the rest); end-to-end is the whole generate call. Peak memory is the
process's peak RSS during the call (VmHWM, reset before each call through /proc/self/clear_refs).
Implementations run interleaved (one after the other per case, after a short warm-up generation
that also compiles flexjit's kernels and Inductor's); --reps repeats each case and reports
medians. The greedy tokens of every implementation are compared with the first one's
(`tokens_match`); eager is skipped where its score matrix would not fit (prompt 8192), and an
implementation that fails (transformers' flex_attention on CPU, say) is recorded with its error.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import compare_torch as ct  # noqa: E402  (load(), environment())

MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=131072),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0, max_position_embeddings=131072),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def make_model(name, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**MODELS[name])
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    log(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}, "
        f"built in {time.perf_counter() - t:.0f} s")
    return model


class Stamps:
    """A stopping criterion that records when each token was produced and never stops."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores, **kwargs):
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def generate(model, impl, ids, new_tokens):
    from transformers import StoppingCriteriaList
    import flexjit.hf
    # flexjit_paged: flexjit's attention with its PagedCache (K/V in pages, read in place).
    cache = flexjit.hf.PagedCache(model.config) if impl == "flexjit_paged" else None
    model.set_attn_implementation("flexjit" if impl == "flexjit_paged" else impl)
    stamps = Stamps()
    reset_peak_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, cache=cache,
                             stopping_criteria=StoppingCriteriaList([stamps]), output_logits=True,
                             return_dict_in_generate=True)
    t1 = time.perf_counter()
    n = len(stamps.t)
    r = dict(prefill_s=stamps.t[0] - t0, e2e_s=t1 - t0, new_tokens=n, peak_rss_mb=peak_rss_mb())
    r["decode_tok_s"] = (n - 1) * ids.shape[0] / (stamps.t[-1] - stamps.t[0]) if n > 1 else None
    # Per step, the gap between the two highest logits (a near-tie flips under any rounding change).
    margins = torch.stack([(l.float().topk(2, -1).values[:, 0] - l.float().topk(2, -1).values[:, 1])
                           for l in out.logits], 1)
    return out.sequences[:, ids.shape[1]:], r, margins


def run_model(name, args):
    import flexjit
    flexjit.register_transformers()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = make_model(name, dtype)
    vocab = MODELS[name]["vocab_size"]
    cases = []
    # Warm-up: a short generation per implementation (kernels, Inductor, allocator).
    warm = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(99))
    for impl in args.impls:
        try:
            generate(model, impl, warm, 4)
        except Exception as e:  # noqa: BLE001
            log(f"warm-up {impl}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for prompt in args.prompts:
        for batch in args.batches:
            ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(prompt + batch))
            case = dict(model=name, dtype=args.dtype, prompt=prompt, batch=batch, new_tokens=args.new_tokens,
                        impls={})
            runs = {impl: [] for impl in args.impls}
            tokens, margin = {}, {}
            for rep in range(args.reps):
                for impl in args.impls:
                    if impl == "eager" and prompt * prompt * batch * MODELS[name]["num_attention_heads"] * 4 > 8e9:
                        case["impls"][impl] = dict(skipped="eager's score matrix would take over 8 GB")
                        continue
                    if "error" in case["impls"].get(impl, {}):
                        continue
                    try:
                        toks, r, margins = generate(model, impl, ids, args.new_tokens)
                        runs[impl].append(r)
                        tokens.setdefault(impl, toks)
                        margin.setdefault(impl, margins)
                        log(f"{name} {args.dtype} prompt {prompt} batch {batch} {impl}: prefill {r['prefill_s']:.2f} s, "
                            f"decode {r['decode_tok_s'] or 0:.2f} tok/s, e2e {r['e2e_s']:.1f} s, "
                            f"peak {r['peak_rss_mb']:.0f} MB")
                    except Exception as e:  # noqa: BLE001
                        case["impls"][impl] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                        log(f"{name} prompt {prompt} batch {batch} {impl}: ERROR {case['impls'][impl]['error']}")
            first = next(iter(tokens.values()), None)
            for impl, rs in runs.items():
                if not rs:
                    continue
                med = {k: statistics.median([r[k] for r in rs]) for k in ("prefill_s", "e2e_s", "decode_tok_s",
                                                                          "peak_rss_mb")}
                case["impls"][impl] = dict(runs=rs, **med, tokens_match=bool(torch.equal(tokens[impl], first)))
                diff = (tokens[impl] != first).any(0).nonzero()
                if len(diff):
                    # Where the tokens part from the first implementation's, and how close that
                    # implementation's top two logits were there (bf16 random weights give flat logits).
                    step = int(diff[0])
                    case["impls"][impl]["first_diff"] = step
                    case["impls"][impl]["reference_margin_at_diff"] = float(margin[next(iter(tokens))][:, step].min())
            base = case["impls"].get("sdpa", {})
            for impl, r in case["impls"].items():
                if "decode_tok_s" in r and base.get("decode_tok_s"):
                    r["decode_vs_sdpa"] = r["decode_tok_s"] / base["decode_tok_s"]
                    r["prefill_vs_sdpa"] = base["prefill_s"] / r["prefill_s"]
            cases.append(case)
    return cases


def environment():
    """compare_torch's record of the run (date, commit, CPU, threads, load, ...) plus
    transformers' version and the machine's memory."""
    import transformers
    ct.load()
    env = ct.environment(torch.get_num_threads())
    env.update(transformers=transformers.__version__,
               mem_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    return env


def markdown(report):
    env = report["environment"]
    lines = [f"# End-to-end greedy generation, {env['date']}", "",
             f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
             f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}. {report['new_tokens']} new tokens, "
             f"medians of {report['reps']}.", "",
             "| model | prompt x batch | impl | prefill s | decode tok/s | e2e s | peak MB | decode vs SDPA | "
             "same tokens as the first |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in report["cases"]:
        for impl, r in c["impls"].items():
            head = f"| {c['model']} {c['dtype']} | {c['prompt']} x {c['batch']} | {impl} |"
            if "skipped" in r or "error" in r:
                lines.append(head + f" {r.get('skipped') or r.get('error')} | | | | | |")
                continue
            vs = f"{r['decode_vs_sdpa']:.2f}x" if "decode_vs_sdpa" in r else "—"
            same = "yes" if r["tokens_match"] else (
                f"from token {r['first_diff']} (top-2 logit gap there {r['reference_margin_at_diff']:.3f})")
            lines.append(head + f" {r['prefill_s']:.2f} | {r['decode_tok_s']:.2f} | {r['e2e_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {vs} | {same} |")
    return "\n".join(lines) + "\n"


def chart(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = report["cases"]
    impls = sorted({i for c in cases for i, r in c["impls"].items() if "decode_tok_s" in r})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    w = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        ys = [c["impls"].get(impl, {}).get("decode_tok_s") or 0 for c in cases]
        ax.bar([i + k * w for i in range(len(cases))], ys, w, label=impl)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{c['model']} {c['prompt']}x{c['batch']}" for c in cases], fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["1b"], choices=list(MODELS))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[2048])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--impls", nargs="+", default=["flexjit", "sdpa", "eager", "flex_attention"])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--chart")
    args = ap.parse_args(argv)
    report = dict(environment=environment(), new_tokens=args.new_tokens, reps=args.reps, cases=[])
    for name in args.models:
        report["cases"] += run_model(name, args)
    md = markdown(report)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.chart:
        chart(report, args.chart)
    bad = [f"{c['model']}/{c['prompt']}x{c['batch']}/{i}" for c in report["cases"] for i, r in c["impls"].items()
           if r.get("tokens_match") is False]
    if bad:
        log("greedy tokens differ: " + ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""flexjit's torch op against torch.compile(flex_attention) on every case of the comparison
suite in bench/compare_torch.py (same mods, buffers, params, dtypes and paths; smaller shapes),
and a smoke run of the benchmark script itself.

Each case costs one torch.compile of PyTorch's CPU flex-attention template (~13 s of C++
compilation on the 2-core VM; dtype, shapes and mods are all baked into the compiled kernel, so
no compiled function can be reused across cases). Inductor keeps its kernels in its usual
on-disk cache (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER), so a second run of
this file takes a fraction of the first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexjit

ROOT = Path(__file__).resolve().parents[2]

if flexjit.library_path() is None:
    pytest.skip(f"libflexjit_torch_ops.so not found (FLEXJIT_TORCH_OPS={os.environ.get('FLEXJIT_TORCH_OPS')!r}, "
                "else build/): cmake --build build --target flexjit_torch_ops", allow_module_level=True)

sys.path.insert(0, str(ROOT / "bench"))
import compare_torch as ct  # noqa: E402

ct.load(library_retries=2)

CASES = ct.make_suite("test")  # every suite case at small shapes


def test_suite_covers_the_contract():
    assert {c.mod for c in ct.SUITE} == {"noop", "causal", "alibi", "softcap", "sliding_window", "document",
                                         "prefix_lm"}
    assert {c.dtype for c in ct.SUITE} == {"fp32", "bf16"} and {c.path for c in ct.SUITE} == {"prefill", "decode"}
    assert len({c.name for c in ct.SUITE}) == len(ct.SUITE) == 28
    for c in ct.SUITE:
        assert (c.Lq == c.Lkv) if c.path == "prefill" else (c.Lq == 1 and c.gqa)
        assert ct.resized(c, "test").name == c.name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_torch_compile_flex_attention(case):
    mod = ct.make_mod(case)
    q, k, v = ct.make_inputs(case)
    out = ct.flexjit_call(case, mod, ct.flexjit_block_mask(case, mod))(q, k, v)
    # Without a BlockMask too: flexjit builds one from mask_mod for the call.
    out_no_bm = ct.flexjit_call(case, mod, None)(q, k, v)

    torch._dynamo.reset()  # one compile per case; also keeps clear of the recompile limit
    theirs = ct.compile_call(case, mod, ct.torch_block_mask(case, mod), ct.compiled_flex())(q, k, v)

    assert out.dtype == q.dtype and out.shape == (case.B, case.Hq, case.Lq, case.D)
    tol = ct.TOL[case.dtype]
    diff = (out.double() - theirs.double()).abs().max().item()
    assert diff <= tol, f"{case.name}: flexjit vs torch.compile(flex_attention) max abs diff {diff:.3g} > {tol}"
    diff = (out_no_bm.double() - theirs.double()).abs().max().item()
    assert diff <= tol, f"{case.name} (mask_mod without a BlockMask): max abs diff {diff:.3g} > {tol}"
    # And both against the float64 reference the benchmark uses.
    ref = ct.reference(case, mod, q, k, v, ct.dense_mask(case, mod), 1.0 / case.D ** 0.5)
    assert ct.max_abs_err(out, ref) <= tol
    assert ct.max_abs_err(theirs, ref) <= tol


def test_sdpa_and_unfused_baselines_agree():
    # The benchmark's other baselines on the reduced shapes (no torch.compile here: quick).
    for case in CASES:
        mod = ct.make_mod(case)
        q, k, v = ct.make_inputs(case)
        mask, scale = ct.dense_mask(case, mod), 1.0 / case.D ** 0.5
        ref = ct.reference(case, mod, q, k, v, mask, scale)
        how, kw = ct.sdpa_plan(case, mod, mask)
        if how is not None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=case.gqa, **kw)
            assert ct.max_abs_err(out, ref) <= ct.TOL[case.dtype], (case.name, how)
        else:
            assert case.mod == "softcap", case.name
        compute = torch.float32 if case.dtype == "bf16" else None
        out = ct.unfused(case, mod, q, k, v, mask, scale, ct.index_grids(case), compute)
        assert ct.max_abs_err(out, ref) <= ct.TOL[case.dtype], case.name


GALLERY = ct.make_suite("test", "gallery")


def test_gallery_suite_runs_the_same_callables_through_both_sides():
    # --suite gallery: every flexjit.gallery mod, both dtypes; flexjit gets the Python functions
    # themselves (traced), and agrees with the float64 reference and the unfused baseline built
    # from the same functions. (torch.compile on these is covered by test_callables.py's eager
    # PyTorch comparison; compiling 16 more cases here would cost minutes.)
    assert {c.mod for c in GALLERY} == set(ct.GALLERY_MODS) and len(GALLERY) == 2 * len(ct.GALLERY_MODS)
    assert {c.mod for c in GALLERY} >= {"causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap",
                                        "t5_relative_bias", "natten_2d"}
    for case in GALLERY:
        assert case.name == f"gallery/{case.dtype}/{case.mod}"
        mod = ct.make_mod(case)
        q, k, v = ct.make_inputs(case)
        mask, scale = ct.dense_mask(case, mod), 1.0 / case.D ** 0.5
        ref = ct.reference(case, mod, q, k, v, mask, scale)
        out = ct.flexjit_call(case, mod, ct.flexjit_block_mask(case, mod))(q, k, v)
        assert ct.max_abs_err(out, ref) <= ct.TOL[case.dtype], case.name
        compute = torch.float32 if case.dtype == "bf16" else None
        out = ct.unfused(case, mod, q, k, v, mask, scale, ct.index_grids(case), compute)
        assert ct.max_abs_err(out, ref) <= ct.TOL[case.dtype], case.name


def test_script_smoke(tmp_path):
    # The benchmark end to end on one tiny case. Inductor's usual cache (not a fresh one, as a
    # real run uses) keeps this from recompiling PyTorch's precompiled header every time.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    paths = {ext: tmp_path / f"out.{ext}" for ext in ("json", "md", "png")}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    cmd = [sys.executable, str(ROOT / "bench" / "compare_torch.py"), "--quick", "--reps", "1",
           "--filter", "prefill/fp32/causal", "--inductor-cache", cache_dir(), "--json", str(paths["json"]),
           "--markdown", str(paths["md"]), "--chart", str(paths["png"])]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[1/1] prefill/fp32/causal:" in run.stderr
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0, p
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(paths["json"].read_text())
    for key in ("torch", "cpu", "nproc", "date", "git_commit"):
        assert report["env"].get(key) is not None, key
    assert report["config"]["reps"] == 1 and report["config"]["quick"] is True
    [case] = report["cases"]
    assert case["name"] == "prefill/fp32/causal" and case["ok"] is True
    for impl in ("flexjit", "compile", "sdpa", "unfused"):
        r = case["impls"][impl]
        assert len(r["samples_ms"]) == 1 and r["median_ms"] > 0 and r["rate"] > 0, impl
        assert r["ok"] is True and r["max_abs_err"] <= ct.TOL["fp32"], impl
    assert case["impls"]["sdpa"]["how"] == "is_causal"
    for impl in ("flexjit", "compile"):
        r = case["impls"][impl]
        assert r["first_call_ms"] > 0 and r["first_result_ms"] == r["block_mask_ms"] + r["first_call_ms"]
    assert set(case["ratios"]) == {"flexjit/compile", "flexjit/sdpa", "flexjit/unfused", "first_call", "first_result"}
    assert case["work"]["unit"] == "GFLOP/s"
    assert "geomean flexjit/compile (all)" in report["summary"]
    md = paths["md"].read_text()
    assert "| prefill/fp32/causal |" in md and "**Summary.**" in md
    # The run inherits FLEXJIT_PREBUILT_DIR=off (conftest): reported as cold.
    assert report["env"]["flexjit_prebuilt"] is None and "**cold**" in md


def _prebuilt_tier_in_a_new_process(value):
    """compare_torch.prebuilt_tier() in a fresh process whose FLEXJIT_PREBUILT_DIR is `value`
    (None: unset): the kernel cache resolves its prebuilt directory once per process."""
    env = {k: v for k, v in os.environ.items() if k != "FLEXJIT_PREBUILT_DIR"}
    if value is not None:
        env["FLEXJIT_PREBUILT_DIR"] = value
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import compare_torch as ct; "
            "ct.load(); print(json.dumps(ct.prebuilt_tier()))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prebuilt_tier_is_reported(tmp_path):
    # The directory comes from the op library's own cache (flexjit.prebuilt_kernel_dir()), not
    # from a second copy of its lookup rules; the report words it.
    (tmp_path / "a.o").write_bytes(b"x")
    assert _prebuilt_tier_in_a_new_process(str(tmp_path)) == dict(dir=str(tmp_path), kernels=1)
    pre = dict(dir=str(tmp_path), kernels=1)
    assert "prebuilt tier" in ct.prebuilt_line(pre) and str(tmp_path) in ct.prebuilt_line(pre)
    assert "cold" in ct.prebuilt_line(None)
    for off in ("off", ""):  # every spelling of "off" is the C++ lookup's (Cache tests)
        assert _prebuilt_tier_in_a_new_process(off) is None
    beside = Path(flexjit.library_path()).resolve().parent / "flexjit-kernels"
    want = dict(dir=str(beside), kernels=len(list(beside.glob("*.o")))) if beside.is_dir() else None
    assert _prebuilt_tier_in_a_new_process(None) == want


def test_flexjit_bench_cli_runs_the_same_suite():
    """`flexjit bench` (the C++ side, no Python) must list exactly this suite's cases, in order
    (cli/bench_cmd.cpp keeps its own copy of the table)."""
    exe = ROOT / "build" / "flexjit"
    if not exe.is_file():
        pytest.skip("build/flexjit not built")
    listed = subprocess.run([str(exe), "bench", "--list"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [c.name for c in ct.SUITE]

"""scripts/gpu_report.py on hand-made gpu_check outputs (fixtures, not measurements): it reports only
what the files hold, and judges each row against the issues' bars."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def report(tmp_path, files):
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_report.py"), str(tmp_path), "--commit",
                           "abc1234", "--date", "2026-12-03"], capture_output=True, text=True)


CTX = dict(gpu="Fixture GPU", sm="sm_90", sm_count=132, torch="2.x", cuda="13.0", git="", copy_gbs=4000.0)


def test_nothing_measured_is_not_a_report(tmp_path):
    r = report(tmp_path, {"cuda_bench.json": {"skipped": "no GPU"}})
    assert r.returncode == 1 and "nothing to report" in r.stdout


def test_the_emulated_device_is_never_reported(tmp_path):
    kb = dict(device="flexjit emulated sm_90 (CPU emulator, not a GPU)", arch="sm_90", sm_count=132,
              copy_gbs=3.0, decode=[], prefill=[dict(mod="causal", L=256, B=1, H=2, engine="mma", block_m=64,
                                                      block_n=64, ms=900.0, tflops=0.0001, ok=True)])
    r = report(tmp_path, {"cuda_bench.json": kb})
    assert r.returncode == 1 and "not a GPU" in r.stdout and "TFLOP" not in r.stdout


def test_rows_are_judged_against_the_bars(tmp_path):
    prefill = dict(context=CTX, compile={"causal": {"cold": dict(compile_ms=1500.0), "disk": dict(compile_ms=30.0)}},
                   results=[dict(case="causal", L=4096, B=8, H=16, impl="torch.compile(flex)", ms=1.0, tflops=400.0),
                            dict(case="causal", L=4096, B=8, H=16, impl="flexjit", ms=1.5, tflops=267.0, ok=True),
                            dict(case="causal", L=4096, B=8, H=16, impl="flexjit(wgmma)", ms=1.1, tflops=364.0,
                                 ok=True)])
    decode = dict(context=CTX, results=[
        dict(B=64, kv=65536, impl="torch.compile(flex)", ms=10.0, gbs=1700.0, copy_fraction=0.43),
        dict(B=64, kv=65536, impl="flexjit", ms=6.0, gbs=2860.0, copy_fraction=0.72, speedup_vs_torch_compile=1.67,
             ok=True),
        dict(B=1, kv=4096, impl="flexjit paged16", ms=0.02, gbs=400.0, copy_fraction=0.1,
             speedup_vs_torch_compile=1.1, ok=False)])
    r = report(tmp_path, {"cuda_prefill_bench.json": prefill, "cuda_decode_bench.json": decode})
    assert r.returncode == 0, r.stderr
    t = r.stdout
    assert "Fixture GPU" in t and "2026-12-03" in t and "abc1234" in t
    assert "| causal | 4096 | 8 x 16 | 267 | 364 | 400 |  | 0.91x | yes |" in t  # the faster flexjit engine counts
    assert "cold (causal): 1500.0 ms (within the 2000 ms bar)" in t
    assert "disk (causal): 30.0 ms (over the 20 ms bar)" in t
    assert "| 64 | 65536 | flexjit | 6.000 | 2860 | 72% | 1.67x | 1.2x yes, 70% yes |" in t
    assert "| 1 | 4096 | flexjit paged16 |" in t and "1.2x no, MISMATCH |" in t
    assert "Kernels alone" not in t  # no cuda_bench.json: no such table


def test_a_check_split_over_two_calls_reports_as_one(tmp_path):
    first, second = tmp_path / "call1", tmp_path / "call2"
    first.mkdir()
    second.mkdir()
    (first / "gpu_check.json").write_text(json.dumps(dict(result="cuda selftest: ok (0 failures)", test_cuda_rc=-1)))
    (second / "gpu_check.json").write_text(json.dumps(dict(result="", test_cuda_rc=0)))
    (second / "cuda_decode_bench.json").write_text(json.dumps(dict(context=CTX, results=[
        dict(B=1, kv=4096, impl="flexjit", ms=0.01, gbs=1700.0, copy_fraction=0.43, speedup_vs_torch_compile=1.3,
             ok=True)])))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_report.py"), str(first), str(second), "--commit",
                        "abc1234"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Self-test: cuda selftest: ok (0 failures); test_cuda.py exit 0." in r.stdout
    assert "| 1 | 4096 | flexjit | 0.010 | 1700 | 43% | 1.30x | 1.2x yes |" in r.stdout


def test_the_kernel_bench_names_the_fastest_engine(tmp_path):
    kb = dict(device="Fixture GPU", arch="sm_90", sm_count=132, copy_gbs=4000.0, decode=[], prefill=[
        dict(mod="causal", L=4096, engine="mma", block_m=64, block_n=64, ms=2.0, tflops=100.0),
        dict(mod="causal", L=4096, engine="wgmma2", block_m=128, block_n=64, ms=1.0, tflops=200.0),
        dict(mod="alibi", L=4096, engine="mma", block_m=64, block_n=64, ms=3.0, tflops=100.0),
        dict(mod="alibi", L=4096, engine="wgmma2", block_m=128, block_n=64, ms=2.0, tflops=150.0)])
    (tmp_path / "gpu_check.json").write_text(json.dumps(dict(result="cuda selftest: ok (0 failures)")))
    r = report(tmp_path, {"cuda_bench.json": kb})
    assert r.returncode == 0, r.stderr
    assert "Fastest prefill kernel per case: wgmma2 128x64 2/2." in r.stdout
    assert "median 1.75x, range 1.50x-2.00x" in r.stdout
    assert "(they did)." in r.stdout


def test_the_kernel_bench_names_the_fastest_decode_variant(tmp_path):
    row = lambda v, ms, ok=True: dict(B=1, kv=65536, paged=False, variant=v, ms=ms, gbs=1.0, copy_fraction=0.5,
                                      partitions=16, ok=ok)
    kb = dict(device="Fixture GPU", arch="sm_90", sm_count=132, copy_gbs=4000.0, prefill=[],
              decode=[row("cost model", 2.0), row("BLOCK_N 64", 1.6), row("partitions x2", 1.0, ok=False)])
    r = report(tmp_path, {"cuda_bench.json": kb})
    assert r.returncode == 0, r.stderr
    assert "| 1 | 65536 | contiguous | BLOCK_N 64 | 1.600 |" in r.stdout
    assert "1.0 (WRONG output)" not in r.stdout and "| 1 (WRONG output) |" in r.stdout
    assert "Fastest decode variant per case: BLOCK_N 64 1/1." in r.stdout  # the wrong one wins nothing
    assert "Largest gain over the cost model: 1.25x (BLOCK_N 64 at B 1, KV 65536, contiguous)." in r.stdout

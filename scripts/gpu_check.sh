#!/usr/bin/env bash
# The GPU check in one script: builds the CUDA-only configuration (FLEXJIT_CPU_BACKEND=OFF: no
# LLVM, TBB, GoogleTest, json or CLI11 needed) with ninja when present, runs the CUDA self-test
# (every built-in mod compiled by NVRTC through the cache; on a GPU, kernels on odd shapes
# against the float64 reference, prefill and decode), the kernels' own benchmark
# (flexjit_cuda_bench: copy ceiling, decode GB/s, prefill TFLOP/s -> cuda_bench.json), and writes a
# log and a JSON summary into OUTDIR. Then, where
# python3 imports torch and torch sees a GPU, it builds the torch op library of that configuration
# (build-gpu-torch: flex_attention's CUDA kernel, no LLVM either), runs tests/python/test_cuda.py
# (when pytest is there) and bench/cuda_prefill_bench.py against PyTorch (cuda_prefill_bench.json
# and .log in OUTDIR) and bench/cuda_decode_bench.py (decoding against PyTorch's flex decoding:
# cuda_decode_bench.json). GPU_CHECK_PARTS picks parts (selftest, kbench, torch, bench; default
# all) so that the check fits 10-minute calls: e.g. GPU_CHECK_PARTS=selftest,kbench, then
# GPU_CHECK_PARTS=torch,bench in a second call (the builds are incremental); GPU_CHECK_TORCH_BENCH=0
# is the same as leaving out bench. GPU_CHECK_COMMIT names the commit for gpu_report.md.
# GPU_CHECK_KBENCH_ARGS passes --quick or --smoke to flexjit_cuda_bench.
# On a machine without a GPU it runs too and says that the GPU parts were skipped. With the
# emulated CUDA device of the full build's tests, its GPU branches run too (a rehearsal; nothing
# it measures is a GPU figure, and gpu_report.py refuses it):
#   FLEXJIT_CUDA_DRIVER=$PWD/build/tests/libflexjit_emulated_cuda.so FLEXJIT_NVRTC=$FLEXJIT_CUDA_DRIVER \
#   GPU_CHECK_PARTS=selftest,kbench GPU_CHECK_KBENCH_ARGS=--smoke scripts/gpu_check.sh /tmp/gpucheck-emu
#
#   scripts/gpu_check.sh OUTDIR [ARCH]     ARCH: sm_90 (H100/H200) by default, or the GPU's own
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUTDIR [ARCH]}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

say "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
  arch=${2:-sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')}
elif [[ -n "${FLEXJIT_CUDA_DRIVER:-}" ]]; then
  say "gpu_check: no nvidia-smi; FLEXJIT_CUDA_DRIVER=$FLEXJIT_CUDA_DRIVER stands in for the CUDA driver"
  arch=${2:-sm_90}
else
  say "gpu_check: no nvidia-smi: no GPU here; GPU runs will be SKIPPED"
  arch=${2:-sm_90}
fi
[[ "$arch" == "sm_" ]] && arch=sm_90
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
t0=$(date +%s)
if ! cmake -S . -B build-gpu "${gen[@]}" -DFLEXJIT_CPU_BACKEND=OFF -DFLEXJIT_WITH_TORCH=OFF \
       -DCMAKE_BUILD_TYPE=Release >>"$log" 2>&1 ||
   ! cmake --build build-gpu -j "$(nproc)" >>"$log" 2>&1; then
  say "gpu_check: BUILD FAILED (see $log)"
  printf '{"build": "failed", "arch": "%s"}\n' "$arch" > "$out/gpu_check.json"
  exit 1
fi
say "gpu_check: built in $(( $(date +%s) - t0 )) s"
# NVRTC: the toolkit's, else the torch wheel's.
if [[ -z "${FLEXJIT_NVRTC:-}" && ! -e /usr/local/cuda/lib64/libnvrtc.so ]]; then
  FLEXJIT_NVRTC=$(python3 -c 'import glob,os,site
for d in site.getsitepackages():
    for p in sorted(glob.glob(os.path.join(d,"nvidia","*","lib","libnvrtc.so.*"))): print(p); raise SystemExit' 2>/dev/null || true)
  [[ -n "$FLEXJIT_NVRTC" ]] && export FLEXJIT_NVRTC
fi
# GPU_CHECK_PARTS (default all): selftest, kbench (flexjit_cuda_bench), torch (op library +
# test_cuda.py), bench (the two torch benchmarks). Parts left out are reported as skipped.
parts=",${GPU_CHECK_PARTS:-selftest,kbench,torch,bench},"
[[ "${GPU_CHECK_TORCH_BENCH:-1}" == 0 ]] && parts=${parts//,bench,/,}
want() { [[ "$parts" == *",$1,"* ]]; }
say "gpu_check: parts${parts//,/ }"
rc=0
if want selftest; then
  ./build-gpu/flexjit_cuda_selftest "$arch" 2>&1 | tee "$out/selftest.txt" | tee -a "$log"
  rc=${PIPESTATUS[0]}
else
  echo "cuda selftest: not run (GPU_CHECK_PARTS)" > "$out/selftest.txt"
fi
# Optional (GPU_CHECK_SANITIZE=1; ~1-2 min more): the self-test's GPU cases again under
# compute-sanitizer's racecheck and memcheck, the hardware's word on what the CPU emulator checks.
sanitize_rc=-1
if [[ "${GPU_CHECK_SANITIZE:-0}" == 1 ]] && want selftest; then
  if command -v compute-sanitizer >/dev/null 2>&1 && [[ -z "$(grep -m1 'GPU runs: SKIPPED' "$out/selftest.txt")" ]]; then
    sanitize_rc=0
    for tool in racecheck memcheck; do
      timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 ./build-gpu/flexjit_cuda_selftest "$arch" \
        > "$out/sanitize_$tool.txt" 2>&1
      r=$?
      say "gpu_check: compute-sanitizer --tool $tool: exit $r ($(grep -c 'ERROR SUMMARY: 0 errors' "$out/sanitize_$tool.txt") clean summaries; $out/sanitize_$tool.txt)"
      [[ $r -ne 0 ]] && sanitize_rc=$r
    done
  else
    say "gpu_check: GPU_CHECK_SANITIZE=1 but no compute-sanitizer or no GPU: SKIPPED"
  fi
fi
# The kernels' own benchmark (no torch): the copy ceiling, decode GB/s, prefill TFLOP/s.
kbench_rc=-1
if want kbench; then
  timeout 300 ./build-gpu/flexjit_cuda_bench "$out/cuda_bench.json" ${GPU_CHECK_KBENCH_ARGS:-} 2>&1 |
    tee "$out/cuda_bench.log" | tee -a "$log"
  kbench_rc=${PIPESTATUS[0]}
  [[ $kbench_rc -eq 124 ]] && say "gpu_check: flexjit_cuda_bench ran past 300 s and was stopped"
fi

# ---- the torch op on the GPU: its own build directory, so a torch problem cannot stop the above ----
torch_op=skipped bench_rc=-1 decode_bench_rc=-1 pytest_rc=-1
if ! want torch && ! want bench; then
  say "gpu_check: torch op + benchmarks not run (GPU_CHECK_PARTS)"
elif ! python3 -c 'import torch' >/dev/null 2>&1; then
  say "gpu_check: torch op + benchmark SKIPPED: python3 cannot import torch"
elif ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  say "gpu_check: torch op + benchmark SKIPPED: torch sees no CUDA device (torch.cuda.is_available() is False)"
else
  t0=$(date +%s)
  if cmake -S . -B build-gpu-torch "${gen[@]}" -DFLEXJIT_CPU_BACKEND=OFF -DFLEXJIT_WITH_TORCH=ON \
       -DCMAKE_BUILD_TYPE=Release >>"$log" 2>&1 &&
     cmake --build build-gpu-torch -j "$(nproc)" --target flexjit_torch_ops >>"$log" 2>&1 &&
     [[ -f build-gpu-torch/libflexjit_torch_ops.so ]]; then
    torch_op=built
    say "gpu_check: torch op library built in $(( $(date +%s) - t0 )) s (build-gpu-torch/libflexjit_torch_ops.so)"
    export FLEXJIT_TORCH_OPS=$PWD/build-gpu-torch/libflexjit_torch_ops.so
    if ! want torch; then
      say "gpu_check: tests/python/test_cuda.py not run (GPU_CHECK_PARTS)"
    elif python3 -c 'import pytest' >/dev/null 2>&1; then
      FLEXJIT_CACHE_DIR="$(mktemp -d)" timeout 300 python3 -m pytest tests/python/test_cuda.py -q -rs \
        2>&1 | tee "$out/test_cuda.txt" | tee -a "$log"
      pytest_rc=${PIPESTATUS[0]}
    else
      say "gpu_check: tests/python/test_cuda.py SKIPPED: no pytest"
    fi
    if want bench; then
      timeout 480 python3 bench/cuda_prefill_bench.py --json "$out/cuda_prefill_bench.json" 2>&1 |
        tee "$out/cuda_prefill_bench.log" | tee -a "$log"
      bench_rc=${PIPESTATUS[0]}
      [[ $bench_rc -eq 124 ]] && say "gpu_check: the prefill benchmark ran past 480 s and was stopped"
      # Decoding against PyTorch's flex decoding (issue 10's 1.2x and 70%-of-copy bars).
      timeout 300 python3 bench/cuda_decode_bench.py --json "$out/cuda_decode_bench.json" 2>&1 |
        tee "$out/cuda_decode_bench.log" | tee -a "$log"
      decode_bench_rc=${PIPESTATUS[0]}
      [[ $decode_bench_rc -eq 124 ]] && say "gpu_check: the decode benchmark ran past 300 s and was stopped"
    else
      say "gpu_check: the torch benchmarks not run (GPU_CHECK_PARTS)"
    fi
  else
    torch_op=failed
    say "gpu_check: torch op library BUILD FAILED (see $log)"
  fi
fi

python3 - "$out" "$arch" "$rc" "$torch_op" "$pytest_rc" "$bench_rc" "$kbench_rc" "$sanitize_rc" "$decode_bench_rc" <<'PY'
import json, os, re, sys
out, arch, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch_op, pytest_rc, bench_rc, kbench_rc = sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
sanitize_rc, decode_bench_rc = int(sys.argv[8]), int(sys.argv[9])
lines = open(f"{out}/selftest.txt").read().splitlines()
gpu = [l.strip() for l in lines if l.strip().startswith("gpu ")]
summary = {"arch": arch, "selftest_rc": rc,
           "compiled_ok": sum(1 for l in lines if re.match(r"\s+\S+\s+ok\s", l)),
           "gpu_runs": gpu, "gpu_skipped": any("GPU runs: SKIPPED" in l for l in lines),
           "result": next((l for l in lines if l.startswith("cuda selftest:") and "(" in l and "failures" in l), ""),
           "kernel_bench_rc": kbench_rc, "sanitize_rc": sanitize_rc,
           "kernel_bench_json": "cuda_bench.json" if os.path.exists(f"{out}/cuda_bench.json") else None,
           "torch_op": torch_op, "test_cuda_rc": pytest_rc, "bench_rc": bench_rc,
           "bench_json": "cuda_prefill_bench.json" if os.path.exists(f"{out}/cuda_prefill_bench.json") else None,
           "decode_bench_rc": decode_bench_rc,
           "decode_bench_json": "cuda_decode_bench.json" if os.path.exists(f"{out}/cuda_decode_bench.json") else None}
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
# The README's GPU table from what was measured (nothing when the GPU parts were skipped). The GPU
# machine's copy of the tree has no .git: GPU_CHECK_COMMIT names the commit it is.
python3 scripts/gpu_report.py "$out" --commit "${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
  > "$out/gpu_report.md" 2>&1 && say "gpu_check: README table in $out/gpu_report.md"
# Any failure counts: the self-test, the op build, its test or the benchmark (2: a mismatch).
[[ $rc -ne 0 ]] && exit "$rc"
[[ $kbench_rc -gt 0 ]] && exit 1
[[ $torch_op == failed ]] && exit 1
[[ $pytest_rc -gt 0 ]] && exit 1
[[ $bench_rc -gt 0 ]] && exit "$bench_rc"
[[ $decode_bench_rc -gt 0 ]] && exit "$decode_bench_rc"
exit 0

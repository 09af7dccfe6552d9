#!/usr/bin/env bash
# The GPU check in one script: builds the CUDA-only configuration (FLEXJIT_CPU_BACKEND=OFF: no
# LLVM, TBB, GoogleTest, json or CLI11 needed) with ninja when present, runs the CUDA self-test
# (every built-in mod compiled by NVRTC through the cache; on a GPU, kernels on odd shapes
# against the float64 reference), and writes a log and a JSON summary into OUTDIR.
# On a machine without a GPU it runs too and says that the GPU parts were skipped.
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
else
  say "gpu_check: no nvidia-smi: no GPU here; GPU runs will be SKIPPED"
  arch=${2:-sm_90}
fi
[[ "$arch" == "sm_" ]] && arch=sm_90
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
t0=$(date +%s)
if ! cmake -S . -B build-gpu "${gen[@]}" -DFLEXJIT_CPU_BACKEND=OFF -DCMAKE_BUILD_TYPE=Release >>"$log" 2>&1 ||
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
./build-gpu/flexjit_cuda_selftest "$arch" 2>&1 | tee "$out/selftest.txt" | tee -a "$log"
rc=${PIPESTATUS[0]}
python3 - "$out" "$arch" "$rc" <<'PY'
import json, re, sys
out, arch, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(f"{out}/selftest.txt").read().splitlines()
gpu = [l.strip() for l in lines if l.strip().startswith("gpu ")]
summary = {"arch": arch, "selftest_rc": rc,
           "compiled_ok": sum(1 for l in lines if re.match(r"\s+\S+\s+ok\s", l)),
           "gpu_runs": gpu, "gpu_skipped": any("GPU runs: SKIPPED" in l for l in lines),
           "result": next((l for l in lines if l.startswith("cuda selftest:") and "(" in l and "failures" in l), "")}
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
exit "$rc"

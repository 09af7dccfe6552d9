#!/usr/bin/env bash
# Runs the whole test suite from a built tree (scripts/build.sh first): the C++ tests through
# ctest, the Python tests of the torch op library through pytest, then the C++ example built
# against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEXJIT_CACHE_DIR=${FLEXJIT_CACHE_DIR:-$PWD/build/test-cache}
# The CUDA compile tests need NVRTC (no GPU): the toolkit's, else the copy the torch wheel
# brings (nvidia-cuda-nvrtc). Without either they skip, saying so.
if [[ -z "${FLEXJIT_NVRTC:-}" && ! -e /usr/local/cuda/lib64/libnvrtc.so ]]; then
  nvrtc=$(${PYTHON:-python3} - <<'PY' 2>/dev/null || true
import glob, os, site
for d in site.getsitepackages():
    for p in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so.*"))):
        print(p); raise SystemExit
PY
)
  [[ -n "$nvrtc" ]] && export FLEXJIT_NVRTC=$nvrtc
fi
echo "test.sh: NVRTC for the CUDA compile tests: ${FLEXJIT_NVRTC:-/usr/local/cuda (or none: those tests skip)}"
# The emulated CUDA device's tests point FLEXJIT_NVRTC at its shim, which forwards to this one.
[[ -n "${FLEXJIT_NVRTC:-}" && -z "${FLEXJIT_EMULATED_REAL_NVRTC:-}" ]] && export FLEXJIT_EMULATED_REAL_NVRTC=$FLEXJIT_NVRTC
ctest --test-dir build --output-on-failure -j 2 "$@"
# The CUDA-only configuration (FLEXJIT_CPU_BACKEND=OFF: what a GPU host without LLVM builds) must
# build, and compile every built-in mod's CUDA kernel through the whole pipeline (no GPU needed).
cmake -S . -B build-cuda-only -DFLEXJIT_CPU_BACKEND=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-cuda-only -j 2 >/dev/null
./build-cuda-only/flexjit_cuda_selftest sm_90
${PYTHON:-python3} -m pytest -q tests/python
./scripts/example.sh

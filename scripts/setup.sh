#!/usr/bin/env bash
# Installs everything flexjit needs to build, test and benchmark, idempotently: a second run
# on a set-up machine does nothing but check. Debian 12 + PyPI only.
set -euo pipefail

APT_PACKAGES=(
  cmake g++ ccache                               # build
  llvm-19-dev libclang-19-dev libclang-cpp19-dev clang-19   # in-process C++ JIT (Clang + ORC)
  libtbb-dev                                     # CPU parallelism
  libgtest-dev libbenchmark-dev                  # tests and benchmarks
  nlohmann-json3-dev libcli11-dev                # JSON reports, the command line
  g++-aarch64-linux-gnu qemu-user-static         # Arm kernels linked and run under emulation (tests)
  libboost-context-dev                           # fibers for the CPU emulator of the CUDA kernels (tests)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# libtorch (C++ entry point, benchmark baselines) and Python torch (comparisons) come from the
# torch wheel on PyPI; numpy for .npy files in scripts and tests; pytest for the Python tests.
PY=${PYTHON:-python3}
if ! $PY -c "import torch, numpy, pytest, matplotlib" >/dev/null 2>&1; then
  echo "setup: pip installing torch numpy pytest matplotlib"
  $PY -m pip install -q torch numpy pytest matplotlib
fi
# transformers (5.x) for the Hugging Face attention backend's tests and the end-to-end benchmark;
# the library itself does not need it.
if ! $PY -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) != 5)" >/dev/null 2>&1; then
  echo "setup: pip installing transformers 5.x"
  $PY -m pip install -q "transformers>=5,<6"
fi
echo "setup: ok (LLVM $(/usr/lib/llvm-19/bin/llvm-config --version), torch $($PY -c 'import torch; print(torch.__version__)'))"

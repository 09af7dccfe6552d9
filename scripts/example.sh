#!/usr/bin/env bash
# Installs the built tree into build/install and builds + runs examples/cpp_api against the
# installed package (find_package(flexjit)), as a user would. Fails if the example's result
# differs from libtorch's scaled_dot_product_attention.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEXJIT_CACHE_DIR=${FLEXJIT_CACHE_DIR:-$PWD/build/test-cache}
cmake --install build --prefix build/install >/dev/null
TORCH_PREFIX=$(${PYTHON:-python3} -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S examples/cpp_api -B build/example -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$PWD/build/install;$TORCH_PREFIX" >/dev/null
cmake --build build/example -j "${FLEXJIT_BUILD_JOBS:-$(nproc)}"
./build/example/flexjit_example

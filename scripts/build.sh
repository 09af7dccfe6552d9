#!/usr/bin/env bash
# Configures and builds flexjit (Release) into build/. Extra args go to the configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${FLEXJIT_BUILD_JOBS:-$(nproc)}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j "$JOBS"

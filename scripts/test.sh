#!/usr/bin/env bash
# Runs the whole test suite from a built tree (scripts/build.sh first): the C++ tests through
# ctest, the Python tests of the torch op library through pytest, then the C++ example built
# against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEXJIT_CACHE_DIR=${FLEXJIT_CACHE_DIR:-$PWD/build/test-cache}
ctest --test-dir build --output-on-failure -j 2 "$@"
${PYTHON:-python3} -m pytest -q tests/python
./scripts/example.sh

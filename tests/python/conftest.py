"""pytest setup for the torch op tests: import flexjit from python/, keep the kernel cache in the
build tree (as the C++ tests do), and say in the header which op library is tested."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("FLEXJIT_CACHE_DIR", str(ROOT / "build" / "test-cache"))
# Tests that count compiles see only that cache, not the build's prebuilt kernels (jit/cache.h).
os.environ.setdefault("FLEXJIT_PREBUILT_DIR", "off")


def pytest_configure(config):
    # PyTorch's eager flex_attention (our reference) warns on every call that it is unfused.
    config.addinivalue_line("filterwarnings", "ignore:.*flex_attention called without torch.compile")


def pytest_report_header(config):
    import flexjit

    path = flexjit.library_path()
    return f"flexjit op library: {path or 'NOT FOUND (tests will be skipped)'}"

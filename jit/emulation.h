// Where a CUDA kernel's NVRTC text takes templates/cuda/emulate.cuh to run on the CPU emulator
// (tests/support/cuda_emulator): after its leading #define lines and comments (the spec macros,
// which emulate.cuh reads), before the first template file (a "// ---- " line) or code line.
// One rule for its two users: jit::make_emulation_source and the emulated CUDA device
// (tests/support/emulated_cuda_device.cpp), which sees only the text NVRTC compiled.
// Header-only, no dependencies.
#pragma once

#include <string>

namespace flexjit::jit {

inline std::string with_emulation_prelude(const std::string& nvrtc_source, const std::string& prelude_name,
                                          const std::string& prelude) {
  size_t at = 0;
  while (at < nvrtc_source.size()) {
    const size_t end = nvrtc_source.find('\n', at);
    const size_t next = end == std::string::npos ? nvrtc_source.size() : end + 1;
    const std::string line = nvrtc_source.substr(at, next - at);
    const bool leading = line == "\n" || line.compare(0, 8, "#define ") == 0 ||
                         (line.compare(0, 2, "//") == 0 && line.compare(0, 8, "// ---- ") != 0);
    if (!leading) break;
    at = next;
  }
  return nvrtc_source.substr(0, at) + "// ---- " + prelude_name + " ----\n" + prelude + "\n" + nvrtc_source.substr(at);
}

}  // namespace flexjit::jit

// CUDA compilation: one CUDA C++ translation unit (text) -> PTX and CUBIN for one GPU arch, with
// NVRTC loaded at run time (dlopen), so a machine without the CUDA toolkit builds and runs every
// CPU path, and one with NVRTC but no GPU can still compile (and cache) kernels for a fleet.
//
// No CUDA header appears here or in nvrtc.cpp: the few NVRTC entry points are declared with
// their C ABI and resolved by name.
#pragma once

#include <string>
#include <vector>

namespace flexjit::jit {

struct CudaCompileResult {
  std::string arch;   // "sm_90"
  std::string ptx;    // always produced (the driver JIT-compiles it where the CUBIN does not fit)
  std::string cubin;  // empty when not asked for
  std::string log;    // NVRTC's log: warnings and, with ptxas_verbose, ptxas's resource report
  double compile_ms = 0;
};

// Whether libnvrtc can be loaded; when not, `why` says what was tried. Never throws.
bool nvrtc_available(std::string* why = nullptr);

// "13.0" (major.minor of the loaded NVRTC; "13.0+<name>" when the library loaded through
// FLEXJIT_NVRTC names itself, as the emulated CUDA device's shim does); part of every CUDA cache
// key. Throws flexjit::Error if NVRTC is unavailable.
std::string nvrtc_version();

// The architectures this NVRTC can target, as "sm_75" ... (from nvrtcGetSupportedArchs).
std::vector<std::string> nvrtc_supported_archs();

// Compiles `source` (named `source_name` in diagnostics) for `arch` ("sm_80", "sm_90", ...;
// "sm_90a" for wgmma). The source must be self-contained: no include paths are passed.
// ptxas_verbose adds ptxas's per-kernel register / shared memory / spill report to the log.
// Throws flexjit::Error with NVRTC's log (file:line: error ...) when the source does not
// compile, or naming the arch when NVRTC does not support it.
CudaCompileResult compile_cuda(const std::string& source, const std::string& source_name,
                               const std::string& arch, bool want_cubin = true,
                               bool ptxas_verbose = false);

// A compiled CUDA kernel as one byte string, for the disk cache: "flexjit-cuda-v1\n", then
// "cubin N\n" and "ptx M\n", then the N CUBIN bytes and the M PTX bytes. unpack returns false
// (and leaves `out` alone) for anything else, e.g. a truncated file.
std::string pack_cuda_binary(const CudaCompileResult& r);
bool unpack_cuda_binary(const std::string& bytes, CudaCompileResult* out);

// Spill bytes (stores + loads) per kernel read from a ptxas_verbose log, for "no spills" checks:
// {kernel name, spill store bytes + spill load bytes, stack frame bytes}.
struct PtxasUsage {
  std::string kernel;
  int registers = 0;
  long spill_bytes = 0;
  long stack_frame = 0;
};
std::vector<PtxasUsage> parse_ptxas_usage(const std::string& log);

}  // namespace flexjit::jit

// The whole JIT path in one readable function: mods + spec -> a callable kernel.
//
//   plan (key, symbol) -> memory cache -> disk cache -> make_source (codegen + template)
//   -> compile (Clang -> object) -> load (ORC LLJIT)
//
// FLEXJIT_DUMP=src keeps each generated translation unit next to its cache entry.
#pragma once

#include <string>
#include <vector>

#include "jit/instantiate.h"

namespace flexjit::jit {

struct KernelHandle {
  void* fn = nullptr;
  std::string cache;       // "miss", "memory" or "disk"
  double compile_ms = 0;   // codegen + Clang + load when cache == "miss"
  double load_ms = 0;      // object load when cache == "disk"
  double lookup_us = 0;    // time spent in get_kernel for this call
  std::string symbol;
  std::string key;
  std::string source_path; // when the source was dumped
};

// Thread-safe. One compile per key per process (and per cache dir across processes).
// Throws flexjit::Error when the mods do not compile, with the generated source's path.
KernelHandle get_kernel(const KernelSpec& spec, const ModSet& mods);

// Several kernels at once, misses compiled in parallel; throws the first error after all finish.
struct KernelRequest {
  KernelSpec spec;
  const ModSet* mods;
};
std::vector<KernelHandle> get_kernels(const std::vector<KernelRequest>& requests);

// A CUDA kernel (spec.backend == Backend::Cuda) as CUBIN + PTX for spec.arch, from the disk cache
// or compiled now by NVRTC (and then stored): plan -> disk cache (<key>.bin) -> make_source ->
// NVRTC. Nothing is loaded: that needs a GPU and belongs to the CUDA runtime. Works on machines
// with NVRTC and no GPU (`flexjit cache warm --device cuda`). Throws flexjit::Error with NVRTC's
// log and the kept source's path (<cache>/failed/<key>.cu) when the kernel does not compile.
struct CudaBinary {
  std::string symbol, key, arch;
  std::string cubin, ptx;
  std::string cache;        // "miss" or "disk"
  double compile_ms = 0;    // make_source + NVRTC, when cache == "miss"
  std::string source_path;  // when kept (FLEXJIT_DUMP=src)
};
CudaBinary get_cuda_binary(const KernelSpec& spec, const ModSet& mods);

}  // namespace flexjit::jit

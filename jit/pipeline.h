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

}  // namespace flexjit::jit

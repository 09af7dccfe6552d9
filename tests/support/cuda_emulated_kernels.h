// CUDA kernels compiled for the CPU emulator (tests/support/cuda_emulator.h): a kernel's own
// NVRTC text with templates/cuda/emulate.cuh (jit::make_emulation_source), compiled and loaded by
// the CPU JIT once per process per cache key. Header-only, for the *_emulated_test executables.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "jit/compile.h"
#include "jit/instantiate.h"
#include "tests/support/cuda_emulator.h"

namespace flexjit::testing {

// The address of the kernel's entry `symbol` (the main entry when empty; decode kernels also
// have jit::cuda_merge_symbol's), cast by the caller to void (*)(Args) with the kernel's
// parameter block passed by value.
inline void* emulated_entry(const jit::KernelSpec& spec, const ModSet& mods, const std::string& symbol = "") {
  static std::map<std::pair<std::string, std::string>, void*> entries;
  static std::map<std::string, std::string> objects;
  const jit::Instantiation inst = jit::plan(spec, mods);
  const std::string name = symbol.empty() ? inst.symbol : symbol;
  auto it = entries.find({inst.key, name});
  if (it != entries.end()) return it->second;
  auto obj = objects.find(inst.key);
  if (obj == objects.end()) {
    const std::string src = jit::make_emulation_source(spec, mods, inst.symbol);
    obj = objects.emplace(inst.key, jit::compile_cpp_to_object(src, inst.symbol + ".emulated.cpp").object).first;
  }
  void* fn = jit::load_object(obj->second, name);
  entries.emplace(std::make_pair(inst.key, name), fn);
  return fn;
}

// A launch of `grid` x `threads` with `smem` bytes of dynamic shared memory whose cp.async sources
// must lie in `readable`.
inline cuda_emulator::Launch emulated_launch(const unsigned (&grid)[3], unsigned threads, int smem,
                                             std::vector<cuda_emulator::Range> readable = {}) {
  cuda_emulator::Launch l;
  for (int i = 0; i < 3; ++i) l.grid[i] = grid[i];
  l.block_threads = threads;
  l.smem_bytes = smem;
  l.readable = std::move(readable);
  return l;
}

}  // namespace flexjit::testing

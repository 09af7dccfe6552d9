#include "jit/pipeline.h"

#include <chrono>
#include <shared_mutex>
#include <unordered_map>

#include "jit/cache.h"
#include "jit/compile.h"
#include "jit/executor.h"

namespace flexjit::jit {
namespace {

// The front memo: spec + mod signature -> handle. It lets a repeat call skip hashing (the
// content key is a SHA-256 over several KB), which keeps repeat-call overhead in microseconds.
struct FrontMemo {
  std::shared_mutex mu;
  std::unordered_map<std::string, KernelHandle> map;
};
FrontMemo& memo() {
  static FrontMemo m;
  return m;
}

double us_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

namespace {

std::string memo_key_of(const KernelSpec& spec, const ModSet& mods) {
  std::string key = spec.str();
  if (spec.kind == KernelKind::Mods || spec.kind == KernelKind::ModsGrad) {  // a Prefill kernel does not depend on the mods
    key += '\n';
    key += mods.signature();
  }
  return key;
}

bool memo_lookup(const std::string& memo_key, std::chrono::steady_clock::time_point t0, KernelHandle* out) {
  std::shared_lock lock(memo().mu);
  auto it = memo().map.find(memo_key);
  if (it == memo().map.end()) return false;
  *out = it->second;
  out->cache = "memory";
  out->compile_ms = out->load_ms = 0;
  out->lookup_us = us_since(t0);
  return true;
}

KernelHandle get_kernel_slow(const KernelSpec& spec, const ModSet& mods, const std::string& memo_key,
                             std::chrono::steady_clock::time_point t0) {
  // A FLEXJIT_CPU_TARGET that cannot be compiled for, or run here, is the user's setting, not a
  // kernel's compile failure: say so before any source is generated.
  if (!cpu_target_error().empty()) throw Error(cpu_target_error());
  Instantiation inst = plan(spec, mods);
  CachedKernel ck = KernelCache::global().get_or_compile(
      inst.key, inst.symbol, [&] { return make_source(spec, mods, inst.symbol); });
  KernelHandle h;
  h.fn = ck.fn;
  h.cache = cache_hit_name(ck.hit);
  h.compile_ms = ck.compile_ms;
  h.load_ms = ck.load_ms;
  h.symbol = inst.symbol;
  h.key = inst.key;
  h.source_path = ck.source_path;
  {
    std::unique_lock lock(memo().mu);
    memo().map.emplace(memo_key, h);
  }
  h.lookup_us = us_since(t0);
  return h;
}

}  // namespace

KernelHandle get_kernel(const KernelSpec& spec, const ModSet& mods) {
  auto t0 = std::chrono::steady_clock::now();
  std::string memo_key = memo_key_of(spec, mods);
  KernelHandle h;
  if (memo_lookup(memo_key, t0, &h)) return h;
  return get_kernel_slow(spec, mods, memo_key, t0);
}

std::vector<KernelHandle> get_kernels(const std::vector<KernelRequest>& requests) {
  auto t0 = std::chrono::steady_clock::now();
  std::vector<KernelHandle> out(requests.size());
  std::vector<size_t> misses;
  std::vector<std::string> keys(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    keys[i] = memo_key_of(requests[i].spec, *requests[i].mods);
    if (!memo_lookup(keys[i], t0, &out[i])) misses.push_back(i);
  }
  // Misses (say a new shape's attention kernel and a new mod set) compile side by side
  // (jit/executor.h).
  run_side_by_side(int(misses.size()), [&](int j) {
    const size_t i = misses[size_t(j)];
    out[i] = get_kernel_slow(requests[i].spec, *requests[i].mods, keys[i], t0);
  });
  return out;
}

}  // namespace flexjit::jit

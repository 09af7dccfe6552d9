// Where a compile's independent pieces run side by side: the parts of a split translation unit
// (jit/compile.h) and the kernels one call misses (jit/pipeline.h).
//
// By default the first piece runs on the calling thread and the others on threads of their own.
// A caller that owns a thread pool installs it for the duration of a call with ScopedExecutor:
// the torch layer installs at::parallel_for, so a compile that starts right after a torch op
// runs on torch's OpenMP threads, which are still spinning from that op, instead of beside them
// on the same cores (on a 2-core host a spinning worker held a new mod's second compile part
// back by ~10 ms). The executor is per thread: pieces that themselves fan out from a pool
// thread use the default.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace flexjit::jit {

// Runs body(begin, end) over disjoint ranges covering [0, n), possibly in parallel, and returns
// when all are done (the signature of AttentionOptions::parallel_for).
using Executor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;

// Installs `e` (null: the default) on this thread until destroyed, restoring the previous one.
class ScopedExecutor {
 public:
  explicit ScopedExecutor(const Executor* e);
  ~ScopedExecutor();
  ScopedExecutor(const ScopedExecutor&) = delete;
  ScopedExecutor& operator=(const ScopedExecutor&) = delete;

 private:
  const Executor* previous_;
};

// Runs piece(i) for every i in [0, n) and returns when all have run: on this thread's executor
// if one is installed, else the first here and the others on threads of their own. A piece that
// throws has its first exception rethrown here after every piece has finished.
void run_side_by_side(int n, const std::function<void(int)>& piece);

// Runs job(i) for every i in [0, n) on a bounded pool: min(hardware threads, n, max_threads when
// > 0) threads, at least one, each taking the next index until none is left; returns the pool's
// size. For batches of independent compiles (`flexjit cache warm`, the CUDA self-test and bench),
// where run_side_by_side's thread per piece would start them all at once. job must not throw.
inline unsigned for_each_on_cores(size_t n, const std::function<void(size_t)>& job, unsigned max_threads = 0) {
  unsigned t = std::max(1u, std::thread::hardware_concurrency());
  if (max_threads > 0) t = std::min(t, max_threads);
  t = unsigned(std::max<size_t>(1, std::min<size_t>(t, n)));
  std::atomic<size_t> next{0};
  std::vector<std::thread> pool;
  for (unsigned i = 0; i < t; ++i)
    pool.emplace_back([&] {
      for (size_t j = next++; j < n; j = next++) job(j);
    });
  for (std::thread& th : pool) th.join();
  return t;
}

}  // namespace flexjit::jit

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

#include <cstdint>
#include <functional>

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

}  // namespace flexjit::jit

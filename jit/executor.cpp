#include "jit/executor.h"

#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace flexjit::jit {
namespace {
thread_local const Executor* t_executor = nullptr;
}  // namespace

ScopedExecutor::ScopedExecutor(const Executor* e) : previous_(t_executor) { t_executor = e; }
ScopedExecutor::~ScopedExecutor() { t_executor = previous_; }

void run_side_by_side(int n, const std::function<void(int)>& piece) {
  if (n <= 0) return;
  std::exception_ptr error;
  std::mutex mu;
  auto run = [&](int i) {
    try {
      piece(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  };
  const Executor* e = t_executor;
  if (n == 1) {
    run(0);
  } else if (e != nullptr && *e) {
    // A piece sees no executor (it may run on this thread, or on a pool thread whose executor
    // is its own business), so nested fan-outs use threads of their own.
    (*e)(n, [&](int64_t begin, int64_t end) {
      ScopedExecutor inner(nullptr);
      for (int64_t i = begin; i < end; ++i) run(int(i));
    });
  } else {
    std::vector<std::thread> helpers;
    helpers.reserve(size_t(n - 1));
    for (int i = 1; i < n; ++i) helpers.emplace_back(run, i);
    run(0);
    for (auto& t : helpers) t.join();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace flexjit::jit

// jit/executor.h: where a compile's side-by-side pieces run.
// LABELS: unit
#include "jit/executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

namespace flexjit::jit {
namespace {

TEST(Executor, DefaultRunsTheFirstPieceHereAndTheOthersOnThreadsOfTheirOwn) {
  std::mutex mu;
  std::vector<std::thread::id> ids(4);
  run_side_by_side(4, [&](int i) {
    std::lock_guard<std::mutex> lock(mu);
    ids[size_t(i)] = std::this_thread::get_id();
  });
  EXPECT_EQ(ids[0], std::this_thread::get_id());
  EXPECT_EQ(std::set<std::thread::id>(ids.begin(), ids.end()).size(), 4u);
  int ran = 0;
  run_side_by_side(0, [&](int) { ++ran; });
  run_side_by_side(1, [&](int) { ++ran; });
  EXPECT_EQ(ran, 1);
}

TEST(Executor, InstalledExecutorGetsEveryPieceOnceAndIsScoped) {
  std::vector<int64_t> fanouts;
  const Executor serial = [&](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    fanouts.push_back(n);
    body(0, n / 2);
    body(n / 2, n);
  };
  std::vector<int> seen(5, 0);
  {
    ScopedExecutor scope(&serial);
    run_side_by_side(5, [&](int i) { ++seen[size_t(i)]; });
    // Nested fan-outs inside a piece do not reuse the pool (a pool thread's executor is its own).
    run_side_by_side(2, [&](int) { run_side_by_side(3, [](int) {}); });
    {
      ScopedExecutor none(nullptr);
      run_side_by_side(2, [](int) {});
    }
    run_side_by_side(2, [](int) {});
  }
  run_side_by_side(2, [](int) {});  // restored: threads again
  EXPECT_EQ(seen, std::vector<int>(5, 1));
  EXPECT_EQ(fanouts, (std::vector<int64_t>{5, 2, 2}));
}

TEST(Executor, FirstErrorIsRethrownAfterEveryPieceRan) {
  std::atomic<int> ran{0};
  auto pieces = [&](int i) {
    ++ran;
    if (i == 1) throw std::runtime_error("piece 1 failed");
  };
  EXPECT_THROW(run_side_by_side(3, pieces), std::runtime_error);
  EXPECT_EQ(ran.load(), 3);
  const Executor serial = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) { body(0, n); };
  ScopedExecutor scope(&serial);
  ran = 0;
  try {
    run_side_by_side(3, pieces);
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "piece 1 failed");
  }
  EXPECT_EQ(ran.load(), 3);
}

}  // namespace
}  // namespace flexjit::jit

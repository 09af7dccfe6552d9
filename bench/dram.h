// This machine's DRAM read bandwidth, measured in the benchmark's own run: decode is memory
// bound, so its GB/s only mean something next to what the memory gives at that moment (on a
// shared VM that drifts by 1.5x within minutes, so a benchmark measures it per case).
#pragma once

#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace flexjit::bench {

// Reads `bytes` (default 1 GiB; anything far past the caches) of one buffer with `threads`
// threads, each a contiguous slice summed as 64-bit integers (4 independent chains, which GCC
// vectorises without fast-math); returns the median GB/s of `reps` passes. The buffer is
// written once first, so every page is backed by memory and no pass counts page faults.
inline double measure_dram_read_gbps(int threads, int reps = 5, size_t bytes = size_t(1) << 30) {
  constexpr size_t kMax = size_t(1) << 30;
  static std::unique_ptr<uint64_t[]> buf;
  if (!buf) {
    buf.reset(new uint64_t[kMax / 8]);
    std::memset(buf.get(), 1, kMax);
  }
  const size_t kBytes = std::min(bytes, kMax);
  const size_t words = kBytes / 8;
  std::vector<double> gbps;
  volatile uint64_t sink = 0;
  tbb::task_arena arena(std::max(1, threads));
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    arena.execute([&] {
      const size_t chunks = size_t(std::max(1, threads));
      tbb::parallel_for(size_t(0), chunks, [&](size_t c) {
        const uint64_t* p = buf.get() + c * (words / chunks);
        const size_t n = words / chunks;
        uint64_t a = 0, b = 0, d = 0, e = 0;
        for (size_t i = 0; i + 4 <= n; i += 4) {
          a += p[i];
          b += p[i + 1];
          d += p[i + 2];
          e += p[i + 3];
        }
        sink = sink + a + b + d + e;
      });
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    gbps.push_back(double(kBytes) / s * 1e-9);
  }
  std::sort(gbps.begin(), gbps.end());
  return gbps[gbps.size() / 2];
}

}  // namespace flexjit::bench

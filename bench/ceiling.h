// The instruction ceilings a CPU benchmark reports against, measured on this host in the same
// run (not taken from a table): the peak GFLOP/s of 512-bit FMAs, 256-bit FMAs and AVX512-BF16's
// vdpbf16ps, each on every benchmark thread at once. Each thread runs kChains independent
// accumulator chains (enough to cover the latency of two pipes) for a fixed instruction count;
// the rate is the FLOPs of all threads over the wall time of the slowest.
//
// An instruction the host lacks reports 0 (not measured). AMX is not measured here (no host we
// have run on so far had it; its engine reports against nothing rather than a made-up peak).
#pragma once

#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "jit/compile.h"

namespace flexjit::bench {

struct Ceilings {
  double fma512 = 0;  // GFLOP/s, vfmadd231ps zmm (2 FLOPs x 16 lanes)
  double fma256 = 0;  // GFLOP/s, vfmadd231ps ymm (2 FLOPs x 8 lanes)
  double dpbf16 = 0;  // GFLOP/s, vdpbf16ps zmm (2 FLOPs x 2 pairs x 16 lanes)
};

namespace detail {

constexpr int kChains = 12;
constexpr int64_t kSteps = 20'000'000;  // per chain; ~0.1-0.2 s per thread

// Twelve accumulators as named variables (an array round-trips through memory under GCC),
// each step one instruction per chain; FP contraction and reassociation cannot fold the chains.
#define FJB_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

__attribute__((target("avx512f"), noinline)) inline float run_fma512(int64_t steps) {
#define FJB_INIT(i) __m512 acc##i = _mm512_set1_ps(float(i));
#define FJB_STEP(i) acc##i = _mm512_fmadd_ps(acc##i, a, b);
#define FJB_SUM(i) sum = _mm512_add_ps(sum, acc##i);
  FJB_CHAINS(FJB_INIT)
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  for (int64_t s = 0; s < steps; ++s) {
    FJB_CHAINS(FJB_STEP)
  }
  __m512 sum = _mm512_setzero_ps();
  FJB_CHAINS(FJB_SUM)
  return _mm512_reduce_add_ps(sum);
#undef FJB_INIT
#undef FJB_STEP
#undef FJB_SUM
}

__attribute__((target("avx2,fma"), noinline)) inline float run_fma256(int64_t steps) {
#define FJB_INIT(i) __m256 acc##i = _mm256_set1_ps(float(i));
#define FJB_STEP(i) acc##i = _mm256_fmadd_ps(acc##i, a, b);
#define FJB_SUM(i) sum = _mm256_add_ps(sum, acc##i);
  FJB_CHAINS(FJB_INIT)
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  for (int64_t s = 0; s < steps; ++s) {
    FJB_CHAINS(FJB_STEP)
  }
  __m256 sum = _mm256_setzero_ps();
  FJB_CHAINS(FJB_SUM)
  float out[8];
  _mm256_storeu_ps(out, sum);
  return out[0] + out[7];
#undef FJB_INIT
#undef FJB_STEP
#undef FJB_SUM
}

__attribute__((target("avx512f,avx512bf16"), noinline)) inline float run_dpbf16(int64_t steps) {
#define FJB_INIT(i) __m512 acc##i = _mm512_set1_ps(float(i));
#define FJB_STEP(i) acc##i = _mm512_dpbf16_ps(acc##i, a, b);
#define FJB_SUM(i) sum = _mm512_add_ps(sum, acc##i);
  FJB_CHAINS(FJB_INIT)
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // (1.0, 1.0) in bf16
  const __m512bh b = (__m512bh)_mm512_set1_epi32(0x33803380);  // tiny, so sums stay finite
  for (int64_t s = 0; s < steps; ++s) {
    FJB_CHAINS(FJB_STEP)
  }
  __m512 sum = _mm512_setzero_ps();
  FJB_CHAINS(FJB_SUM)
  return _mm512_reduce_add_ps(sum);
#undef FJB_INIT
#undef FJB_STEP
#undef FJB_SUM
}
#undef FJB_CHAINS

// GFLOP/s of `fn` on `threads` threads at once; flops_per_step counts one step of all chains.
template <typename Fn>
double measure(Fn fn, int threads, double flops_per_step) {
  std::vector<std::thread> pool;
  std::vector<float> sink(size_t(threads), 0.0f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[size_t(t)] = fn(kSteps); });
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float keep = sink[0];
  (void)keep;
  return double(threads) * double(kSteps) * flops_per_step / s * 1e-9;
}

// Best of three: the VM is noisy, and a ceiling is what the hardware can do.
template <typename Fn>
double best_of_3(Fn fn, int threads, double flops_per_step) {
  double best = 0;
  for (int r = 0; r < 3; ++r) best = std::max(best, measure(fn, threads, flops_per_step));
  return best;
}

}  // namespace detail

// Measured once per process (about a second on 2 cores).
inline const Ceilings& ceilings(int threads) {
  static const Ceilings c = [threads] {
    Ceilings r;
    const int n = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    using namespace detail;
    if (jit::host_has_feature("avx512f")) r.fma512 = best_of_3(run_fma512, n, kChains * 32.0);
    if (jit::host_has_feature("avx2") && jit::host_has_feature("fma"))
      r.fma256 = best_of_3(run_fma256, n, kChains * 16.0);
    if (jit::host_has_feature("avx512bf16")) r.dpbf16 = best_of_3(run_dpbf16, n, kChains * 64.0);
    return r;
  }();
  return c;
}

// The ceiling of the instruction an engine's inner loop runs on the compile target: vdpbf16ps
// for "dpbf16", 512- or 256-bit FMAs for "fma" (and the decode kernel's "dot", which uses FMAs
// except for bf16 on AVX512-BF16 targets); 0 when not measured (AMX).
inline double engine_ceiling(const Ceilings& c, const std::string& engine, bool bf16) {
  const bool avx512 = jit::target_has_feature("avx512f");
  if (engine == "dpbf16" || (engine == "dot" && bf16 && jit::target_has_feature("avx512bf16"))) return c.dpbf16;
  if (engine == "fma" || engine == "dot") return avx512 ? c.fma512 : c.fma256;
  return 0;
}

// Counters of a flexjit run: the engine and compile target as the label ("dpbf16@znver4"),
// engine_ceiling_gflops and pct_of_engine_ceiling (when the engine's instruction was measured).
inline void set_engine_counters(benchmark::State& state, double flops, const std::string& engine, bool bf16,
                                int threads) {
  using benchmark::Counter;
  state.SetLabel(engine + "@" + jit::cpu_target_name());
  const double ceil = engine_ceiling(ceilings(threads), engine, bf16);
  if (ceil <= 0) return;
  state.counters["engine_ceiling_gflops"] = ceil;
  state.counters["pct_of_engine_ceiling"] = Counter(flops * 1e-9 / ceil * 100.0, Counter::kIsIterationInvariantRate);
}

// The measured ceilings and the compile target, in the JSON "context".
inline void add_ceiling_context(int threads) {
  const Ceilings& c = ceilings(threads);
  benchmark::AddCustomContext("flexjit_cpu_target", jit::cpu_target_name());
  benchmark::AddCustomContext("flexjit_ceiling_fma512_gflops", std::to_string(int(c.fma512)));
  benchmark::AddCustomContext("flexjit_ceiling_fma256_gflops", std::to_string(int(c.fma256)));
  benchmark::AddCustomContext("flexjit_ceiling_dpbf16_gflops", std::to_string(int(c.dpbf16)));
}

}  // namespace flexjit::bench

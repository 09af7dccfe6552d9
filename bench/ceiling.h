// The instruction ceilings a CPU benchmark reports against, measured on this host in the same
// run (not taken from a table): the peak GFLOP/s of 512-bit FMAs, 256-bit FMAs, AVX512-BF16's
// vdpbf16ps and AMX-BF16's tdpbf16ps, each on every benchmark thread at once. Each thread runs
// kChains independent accumulator chains (enough to cover the latency of two pipes; AMX: four
// accumulator tiles, as the prefill engine holds) for a fixed instruction count; the rate is the
// FLOPs of all threads over the wall time of the slowest.
//
// An instruction the host (or, for AMX, the OS) lacks reports 0 (not measured).
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
#include "runtime/attention.h"

namespace flexjit::bench {

struct Ceilings {
  double fma512 = 0;  // GFLOP/s, vfmadd231ps zmm (2 FLOPs x 16 lanes)
  double fma256 = 0;  // GFLOP/s, vfmadd231ps ymm (2 FLOPs x 8 lanes)
  double dpbf16 = 0;  // GFLOP/s, vdpbf16ps zmm (2 FLOPs x 2 pairs x 16 lanes)
  double amx = 0;     // GFLOP/s, tdpbf16ps on 16 x 64-byte tiles (2 FLOPs x 16 x 16 x 32)
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

// AMX: four 16 x 16 fp32 accumulator tiles fed by two A and two B tiles (the prefill engine's
// 2 x 2 blocking), loaded once; each step is four independent tdpbf16ps. The caller has been
// granted the tile state (flexjit::amx_available()).
constexpr int64_t kAmxSteps = 1'000'000;  // ~0.1 s per thread at 16 cycles per instruction
__attribute__((target("amx-tile,amx-bf16"), noinline)) inline float run_amx(int64_t steps) {
  struct alignas(64) Config {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
  } cfg = {};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  alignas(64) unsigned short a[16 * 32], b[16 * 32];  // bf16 1.0 and a tiny value: sums stay finite
  for (int i = 0; i < 16 * 32; ++i) {
    a[i] = 0x3f80;
    b[i] = 0x3380;
  }
  alignas(64) float out[16 * 16];
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0];
}

// GFLOP/s of `fn` on `threads` threads at once; flops_per_step counts one step of all chains.
template <typename Fn>
double measure(Fn fn, int threads, double flops_per_step, int64_t steps) {
  std::vector<std::thread> pool;
  std::vector<float> sink(size_t(threads), 0.0f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[size_t(t)] = fn(steps); });
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float keep = sink[0];
  (void)keep;
  return double(threads) * double(steps) * flops_per_step / s * 1e-9;
}

// Best of three: the VM is noisy, and a ceiling is what the hardware can do.
template <typename Fn>
double best_of_3(Fn fn, int threads, double flops_per_step, int64_t steps = kSteps) {
  double best = 0;
  for (int r = 0; r < 3; ++r) best = std::max(best, measure(fn, threads, flops_per_step, steps));
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
    // Linux grants the tile state per process; amx_available() asks once (FLEXJIT_AMX=0 makes
    // it say no, and the AMX ceiling then reads 0 like an absent instruction).
    if (amx_available()) r.amx = best_of_3(run_amx, n, 4 * 2.0 * 16 * 16 * 32, kAmxSteps);
    return r;
  }();
  return c;
}

// The ceiling of the instruction an engine's inner loop runs on the compile target: vdpbf16ps
// for "dpbf16", 512- or 256-bit FMAs for "fma" (and the decode kernel's "dot", which uses FMAs
// except for bf16 on AVX512-BF16 targets), tdpbf16ps for "amx": all of it for bf16, a third for
// fp16, whose every product is three bf16 products (templates/cpu/prefill_amx.h); 0 when not
// measured.
inline double engine_ceiling(const Ceilings& c, const std::string& engine, DType dtype) {
  const bool avx512 = jit::target_has_feature("avx512f");
  const bool bf16 = dtype == DType::BF16;
  if (engine == "dpbf16" || (engine == "dot" && bf16 && jit::target_has_feature("avx512bf16"))) return c.dpbf16;
  if (engine == "fma" || engine == "dot") return avx512 ? c.fma512 : c.fma256;
  if (engine == "amx") return dtype == DType::F16 ? c.amx / 3 : c.amx;
  return 0;
}

// Counters of a flexjit run: the engine and compile target as the label ("dpbf16@znver4"),
// engine_ceiling_gflops and pct_of_engine_ceiling (when the engine's instruction was measured).
inline void set_engine_counters(benchmark::State& state, double flops, const std::string& engine, DType dtype,
                                int threads) {
  using benchmark::Counter;
  state.SetLabel(engine + "@" + jit::cpu_target_name());
  const double ceil = engine_ceiling(ceilings(threads), engine, dtype);
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
  benchmark::AddCustomContext("flexjit_ceiling_amx_gflops", std::to_string(int(c.amx)));
}

}  // namespace flexjit::bench

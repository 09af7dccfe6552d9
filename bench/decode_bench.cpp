// Decode (one query token per sequence against a long KV cache) throughput: flexjit's flash
// decoding against the alternatives, in the same process and run, on the same inputs.
//
//   decode/<dtype>/<shape>/KV<L>/<layout>/<impl>
//     dtype   bf16, fp32 (q, caches and out)
//     shape   llama8b_b1, llama8b_b4   Llama-3.1-8B's attention: Hq 32, Hkv 8, D 128, B 1 / 4
//             llama70b_b1              Llama-3.1-70B's: Hq 64, Hkv 8 (GQA group 8), D 128, B 1
//             mqa_b1                   MQA: Hq 32, Hkv 1, D 128, B 1
//     L       4096, 8192, 16384, 32768 keys per sequence
//     layout  contig                   k, v [B, Hkv, L, D]
//             paged                    k_cache, v_cache [pages, 16, Hkv, D], shuffled block table
//     impl    flexjit     the planner's knobs (tuned if `flexjit tune` stored a bucket, else the
//                         cost model; counter `tuned`)
//             model       the cost model's knobs, whatever the tuning database holds
//             p128        PARTITION_SIZE=128, the fixed default the tuner is measured against
//             nosplit     one partition per sequence (PARTITION_SIZE >= L): no split-KV
//             dot         bf16 only: USE_AMX=0, the dot engine, where the runtime would pick the
//                         AMX engine (8+ query rows per KV head on an AMX host; else the same)
//             prefill     contig only: FORCE_USE_FLEX_ATTENTION, the prefill kernel with the GQA
//                         group packed in one tile (what decode calls ran before split-KV)
//             sdpa        contig only: at::scaled_dot_product_attention(enable_gqa=true)
//   dram/read             this machine's DRAM read bandwidth (bench/dram.h), at the start
//
// Counters: GB/s of K and V read (bench/flops.h decode_bytes); dram_GBps and pct_of_dram, paired:
// before every timed call a 256 MiB DRAM read runs (outside the timing) with the same threads,
// and pct_of_dram is the median over calls of (this call's GB/s) / (the read just before it)
// -- this VM's memory bandwidth drifts by 1.5x within minutes, so only side-by-side numbers
// compare; and for flexjit impls the knobs the call used. Every flexjit impl's output is checked
// against the float64 reference before it is timed (an impl that disagrees is reported as an
// error, not timed).
//
// Flags (besides Google Benchmark's): --threads=N (flexjit's TBB arena, libtorch's intra-op
// threads and the DRAM measurement; default all hardware threads). The README's run uses
// --benchmark_repetitions=3 --benchmark_report_aggregates_only=true; python3 scripts/bench_report.py
// decode.json turns the JSON into a table.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench/dram.h"
#include "bench/flops.h"
#include "runtime/attention.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"

#if FLEXJIT_BENCH_TORCH
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/version.h>
#endif

namespace flexjit::bench {
namespace {

int g_threads = 0;
constexpr int64_t kPageSize = 16;
constexpr int kCalls = 20;  // timed calls per benchmark (and repetition)

struct Shape {
  const char* name;
  int64_t B, Hq, Hkv, D;
};
constexpr Shape kShapes[] = {{"llama8b_b1", 1, 32, 8, 128},
                             {"llama8b_b4", 4, 32, 8, 128},
                             {"llama70b_b1", 1, 64, 8, 128},
                             {"mqa_b1", 1, 32, 1, 128}};

struct Case {
  DType dtype;
  Shape shape;
  int64_t L;
  bool paged;
  std::string name(const std::string& impl) const {
    return std::string("decode/") + dtype_name(dtype) + "/" + shape.name + "/KV" + std::to_string(L) + "/" +
           (paged ? "paged" : "contig") + "/" + impl;
  }
  bool same_data(const Case& o) const {
    return dtype == o.dtype && std::string(shape.name) == o.shape.name && L == o.L;
  }
};

// Inputs of one (dtype, shape, L), shared by both layouts and every impl: the contiguous K/V, the
// same keys in a paged cache, the reference output, the DRAM bandwidth measured when made.
struct CaseData {
  Case c;
  OwnedTensor q, k, v, out, k_cache, v_cache, block_table, seq_lens;
  RefResult ref;
#if FLEXJIT_BENCH_TORCH
  at::Tensor tq, tk, tv;
#endif
};

int threads() { return g_threads > 0 ? g_threads : int(std::thread::hardware_concurrency()); }

CaseData& case_data(const Case& c) {
  static std::unique_ptr<CaseData> cached;
  if (cached && cached->c.same_data(c)) return *cached;
  cached.reset();
  auto d = std::make_unique<CaseData>();
  d->c = c;
  const Shape& s = c.shape;
  d->q = OwnedTensor::make("q", c.dtype, {s.B, s.Hq, 1, s.D});
  d->k = OwnedTensor::make("k", c.dtype, {s.B, s.Hkv, c.L, s.D});
  d->v = OwnedTensor::make("v", c.dtype, {s.B, s.Hkv, c.L, s.D});
  d->out = OwnedTensor::make("out", c.dtype, {s.B, s.Hq, 1, s.D});
  fill_random(d->q.view, 1);
  fill_random(d->k.view, 2);
  fill_random(d->v.view, 3);
  // The paged copy: pages of 16 keys in a shuffled order (as a serving engine's allocator leaves them).
  const int64_t per_seq = c.L / kPageSize, pages = s.B * per_seq;
  d->k_cache = OwnedTensor::make("k_cache", c.dtype, {pages, kPageSize, s.Hkv, s.D});
  d->v_cache = OwnedTensor::make("v_cache", c.dtype, {pages, kPageSize, s.Hkv, s.D});
  d->block_table = OwnedTensor::make("block_table", DType::I32, {s.B, per_seq});
  d->seq_lens = OwnedTensor::make("seq_lens", DType::I32, {s.B});
  std::vector<int32_t> order(static_cast<size_t>(pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(7));
  const int64_t es = dtype_size(c.dtype), row = s.D * es;
  for (int64_t b = 0; b < s.B; ++b) {
    d->seq_lens.data<int32_t>()[b] = int32_t(c.L);
    for (int64_t p = 0; p < per_seq; ++p) {
      const int32_t page = order[size_t(b * per_seq + p)];
      d->block_table.data<int32_t>()[b * per_seq + p] = page;
      for (int64_t slot = 0; slot < kPageSize; ++slot)
        for (int64_t h = 0; h < s.Hkv; ++h) {
          const int64_t src = ((b * s.Hkv + h) * c.L + p * kPageSize + slot) * row;
          const int64_t dst = ((int64_t(page) * kPageSize + slot) * s.Hkv + h) * row;
          std::memcpy(d->k_cache.bytes->data() + dst, d->k.bytes->data() + src, size_t(row));
          std::memcpy(d->v_cache.bytes->data() + dst, d->v.bytes->data() + src, size_t(row));
        }
    }
  }
  ModSet none;
  d->ref = reference_attention(d->q.view, d->k.view, d->v.view, none, ModBindings{}, 1.0 / std::sqrt(double(s.D)));
#if FLEXJIT_BENCH_TORCH
  const at::ScalarType st = c.dtype == DType::F32 ? at::kFloat : at::kBFloat16;
  d->tq = at::from_blob(d->q.view.data, {s.B, s.Hq, 1, s.D}, st);
  d->tk = at::from_blob(d->k.view.data, {s.B, s.Hkv, c.L, s.D}, st);
  d->tv = at::from_blob(d->v.view.data, {s.B, s.Hkv, c.L, s.D}, st);
#endif
  cached = std::move(d);
  return *cached;
}

enum class Impl { kFlexjit, kModel, kP128, kNoSplit, kPrefill, kDot };

AttentionReport run_flexjit(CaseData& d, const Case& c, Impl impl) {
  AttentionOptions opt;
  opt.num_threads = g_threads;
  opt.enable_gqa = true;
  if (impl == Impl::kModel) opt.use_tuning = false;
  if (impl == Impl::kP128) opt.partition_size = 128;
  if (impl == Impl::kNoSplit) opt.partition_size = d.c.L;
  if (impl == Impl::kPrefill) opt.force_prefill = true;
  if (impl == Impl::kDot) opt.use_amx = 0;
  ModSet none;
  AttentionReport rep;
  if (c.paged)  // d holds both layouts of the keys; d.c is the case that made it
    paged_flex_attention(d.q.view, d.k_cache.view, d.v_cache.view, d.block_table.view, d.seq_lens.view, d.out.view,
                         nullptr, none, ModBindings{}, opt, &rep);
  else
    flex_attention(d.q.view, d.k.view, d.v.view, d.out.view, nullptr, none, ModBindings{}, nullptr, opt, &rep);
  return rep;
}

double kv_bytes(const CaseData& d) {
  const Shape& s = d.c.shape;
  return decode_bytes(s.B, s.Hq, s.Hkv, 1, d.c.L, s.D, s.D, dtype_size(d.c.dtype));
}

// The timing loop: before each call a DRAM read (untimed), so every call has its own yardstick.
template <typename F>
void timed_paired(benchmark::State& state, const CaseData& d, F&& call) {
  std::vector<double> ratios, drams;
  for (auto _ : state) {
    state.PauseTiming();
    const double dram = measure_dram_read_gbps(threads(), 1, size_t(256) << 20);
    state.ResumeTiming();
    const auto t0 = std::chrono::steady_clock::now();
    call();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    drams.push_back(dram);
    ratios.push_back(kv_bytes(d) / s * 1e-9 / dram);
  }
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x.empty() ? 0.0 : x[x.size() / 2];
  };
  using benchmark::Counter;
  state.counters["GBps"] = Counter(kv_bytes(d) * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["pct_of_dram"] = median(ratios) * 100.0;
  state.counters["dram_GBps"] = median(drams);
}

double max_error(const CaseData& d) {
  std::vector<double> got = to_doubles(d.out.view);
  double e = 0;
  for (size_t i = 0; i < got.size(); ++i) e = std::max(e, std::fabs(got[i] - d.ref.out[i]));
  return e;
}

void bm_flexjit(benchmark::State& state, Case c, Impl impl) {
  try {
    CaseData& d = case_data(c);
    AttentionReport rep = run_flexjit(d, c, impl);  // compiles; the output the check reads
    const double err = max_error(d), tol = c.dtype == DType::F32 ? 1e-4 : 2e-2;
    if (!(err <= tol)) {
      state.SkipWithError(("flexjit output differs from the float64 reference by " + std::to_string(err) +
                           "; not timed").c_str());
      return;
    }
    timed_paired(state, d, [&] { run_flexjit(d, c, impl); });
    state.counters["max_abs_err"] = err;
    state.counters["partition_size"] = double(rep.partition_size);
    state.counters["num_partitions"] = double(rep.num_partitions);
    state.counters["block_n"] = rep.block_n;
    state.counters["tuned"] = rep.tuning == "tuned" ? 1 : 0;
    state.counters["amx"] = rep.engine == "amx" ? 1 : 0;
    state.SetLabel(rep.path + " " + rep.tuning + " " + rep.engine);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

#if FLEXJIT_BENCH_TORCH
void bm_sdpa(benchmark::State& state, Case c) {
  try {
    c10::InferenceMode guard;
    CaseData& d = case_data(c);
    auto run = [&] {
      return at::scaled_dot_product_attention(d.tq, d.tk, d.tv, {}, 0.0, false, std::nullopt, /*enable_gqa=*/true);
    };
    at::Tensor o = run();
    double err = 0;
    at::Tensor o64 = o.to(at::kDouble).contiguous();
    for (int64_t i = 0; i < o.numel(); ++i) err = std::max(err, std::fabs(o64.data_ptr<double>()[i] - d.ref.out[size_t(i)]));
    timed_paired(state, d, [&] {
      at::Tensor r = run();
      benchmark::DoNotOptimize(r.data_ptr());
    });
    state.counters["max_abs_err"] = err;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}
#endif

void bm_dram(benchmark::State& state) {
  double gbps = 0;
  for (auto _ : state) gbps = measure_dram_read_gbps(threads(), 3);
  state.counters["GBps"] = gbps;
}

void register_all() {
  benchmark::RegisterBenchmark("dram/read", bm_dram)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
  for (DType dtype : {DType::BF16, DType::F32})
    for (const Shape& s : kShapes)
      for (int64_t L : {4096, 8192, 16384, 32768})
        for (bool paged : {false, true}) {
          Case c{dtype, s, L, paged};
          // A fixed number of calls: each is preceded by its own DRAM read (~8 ms, untimed), which
          // Google Benchmark's time-based iteration count would multiply for the short cases.
          auto reg = [&](const std::string& impl, Impl i) {
            benchmark::RegisterBenchmark(c.name(impl).c_str(), bm_flexjit, c, i)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime()
                ->Iterations(kCalls);
          };
          reg("flexjit", Impl::kFlexjit);
          reg("model", Impl::kModel);
          reg("p128", Impl::kP128);
          reg("nosplit", Impl::kNoSplit);
          if (dtype == DType::BF16) reg("dot", Impl::kDot);
          if (!paged) {
            reg("prefill", Impl::kPrefill);
#if FLEXJIT_BENCH_TORCH
            benchmark::RegisterBenchmark(c.name("sdpa").c_str(), bm_sdpa, c)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime()
                ->Iterations(kCalls);
#endif
          }
        }
}

}  // namespace
}  // namespace flexjit::bench

int main(int argc, char** argv) {
  using namespace flexjit::bench;
  g_threads = take_threads_flag(&argc, argv);
#if FLEXJIT_BENCH_TORCH
  at::set_num_threads(threads());
  benchmark::AddCustomContext("flexjit_torch_version", TORCH_VERSION);
#endif
  add_context(__FILE__, threads());
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

// Prefill (forward attention, Lq == Lkv) throughput: flexjit against libtorch in the same process
// and run, on the same inputs.
//
//   prefill/<dtype>/D<D>/L<L>/<mods>/<impl>
//     dtype  fp32, bf16, fp16    D  64, 128          L  1024, 2048, 4096, 8192    B=1, H=8
//     mods   none, causal, alibi, causal_alibi
//     impl   flexjit   flexjit::flex_attention (TensorView API); kernel compiled before timing,
//                      the causal BlockMask built once outside the timing loop
//            sdpa      at::scaled_dot_product_attention (is_causal for causal; ALiBi as an fp32
//                      [1, H, L, L] attn_mask bias built outside the timing loop)
//            unfused   matmul -> * scale -> + bias -> softmax -> matmul; for bf16 the scores are
//                      upcast to fp32 for bias and softmax and P cast back for the second matmul
//                      (the same for fp16)
//
// The bias is fp32 for every dtype, as flexjit evaluates mods in fp32: ALiBi's bias reaches
// slope * (L - 1), where bf16's spacing is 4 to 8, and a bf16 bias (or bf16 scores plus bias)
// moves outputs by ~0.5 at L >= 1024; SDPA's CPU kernel takes an fp32 mask with bf16 inputs at
// the same speed.
//
// Counters: GFLOP/s over the *effective* FLOPs (bench/flops.h: only blocks the BlockMask visits
// count; every impl of a case is credited with the same count, so rate ratios are time ratios),
// pct_of_ceiling against the 2-core fp32 FMA peak, and at L <= 2048 max_abs_err: the max abs
// difference of each impl's output from an fp32 SDPA on the same (rounded) inputs. A flexjit
// kernel that disagrees is reported as an error, not timed.
//
// Flags (besides Google Benchmark's): --threads=N sets both flexjit's TBB arena and libtorch's
// intra-op threads (default: all hardware threads). A single pass takes about 10 minutes on an
// idle 2-core machine; the README's run (--benchmark_repetitions=3
// --benchmark_report_aggregates_only=true --benchmark_out=prefill.json
// --benchmark_out_format=json) about three times that.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench/ceiling.h"
#include "bench/flops.h"
#include "runtime/attention.h"
#include "runtime/block_mask.h"
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

constexpr int64_t kBatch = 1;
constexpr int64_t kHeads = 8;
// Unfused attention materialises [B, H, L, L] scores, softmax and bias: at L = 8192 that is
// 3 x 2 GiB in fp32 on a shared 23 GiB machine and ~30 s a pass, so it is not run there.
constexpr int64_t kUnfusedMaxL = 4096;
// Outputs are checked against an fp32 SDPA up to this length (the check costs a pass), and the
// torch baselines get an untimed full-size warm-up call (that same pass).
constexpr int64_t kCheckMaxL = 2048;

int g_threads = 0;  // --threads; 0 = all hardware threads

enum class Mods { kNone, kCausal, kAlibi, kCausalAlibi };

const char* mods_name(Mods m) {
  switch (m) {
    case Mods::kNone:
      return "none";
    case Mods::kCausal:
      return "causal";
    case Mods::kAlibi:
      return "alibi";
    case Mods::kCausalAlibi:
      return "causal_alibi";
  }
  return "?";
}
bool has_causal(Mods m) { return m == Mods::kCausal || m == Mods::kCausalAlibi; }
bool has_alibi(Mods m) { return m == Mods::kAlibi || m == Mods::kCausalAlibi; }

struct Case {
  DType dtype = DType::F32;
  int64_t D = 64;
  int64_t L = 1024;
  Mods mods = Mods::kNone;

  std::string name(const char* impl) const {
    return std::string("prefill/") + dtype_name(dtype) + "/D" + std::to_string(D) + "/L" +
           std::to_string(L) + "/" + mods_name(mods) + "/" + impl;
  }
  bool operator==(const Case& o) const {
    return dtype == o.dtype && D == o.D && L == o.L && mods == o.mods;
  }
};

// Everything a case needs, built once and shared by its flexjit, sdpa and unfused benchmarks
// (and their repetitions, which run back to back): inputs, mods, BlockMask, torch bias.
struct CaseData {
  Case c;
  OwnedTensor q, k, v, out;
  std::vector<OwnedTensor> storage;  // the mods' buffers (ALiBi slopes)
  ModSet mods;
  ModBindings bind;
  std::optional<runtime::BlockMask> mask;
  double density = 1.0;
  double flops = 0;  // effective FLOPs of one call
#if FLEXJIT_BENCH_TORCH
  at::Tensor tq, tk, tv;  // views of q, k, v (no copies)
  at::Tensor bias;        // [1 or H, L, L] fp32 additive bias; undefined for no mods
  at::Tensor reference;   // fp32 SDPA output, made on first use (L <= kCheckMaxL)
#endif
};

// Binds the case's mods on `shape` (ALiBi slopes from the registry's example maker, the same
// slopes the torch bias is built from).
void make_mods(Mods m, const ShapeInfo& shape, std::vector<OwnedTensor>* storage, ModSet* mods,
               ModBindings* bind) {
  TracedMod sm, mm;
  if (has_alibi(m)) sm = instantiate_example(find_mod("alibi"), shape, storage);
  if (has_causal(m)) mm = instantiate_example(find_mod("causal"), shape, storage);
  auto [set, b] = combine(has_alibi(m) ? &sm : nullptr, has_causal(m) ? &mm : nullptr);
  *mods = std::move(set);
  *bind = std::move(b);
}

CaseData& case_data(const Case& c) {
  static std::unique_ptr<CaseData> cached;
  if (cached && cached->c == c) return *cached;
  cached.reset();  // free the previous case's memory first
  auto d = std::make_unique<CaseData>();
  d->c = c;
  d->q = OwnedTensor::make("q", c.dtype, {kBatch, kHeads, c.L, c.D});
  d->k = OwnedTensor::make("k", c.dtype, {kBatch, kHeads, c.L, c.D});
  d->v = OwnedTensor::make("v", c.dtype, {kBatch, kHeads, c.L, c.D});
  d->out = OwnedTensor::make("out", c.dtype, {kBatch, kHeads, c.L, c.D});
  fill_random(d->q.view, 1);
  fill_random(d->k.view, 2);
  fill_random(d->v.view, 3);
  make_mods(c.mods, ShapeInfo{kBatch, kHeads, kHeads, c.L, c.L}, &d->storage, &d->mods, &d->bind);
  if (d->mods.has_mask_mod()) {
    d->mask = runtime::create_block_mask(d->mods, d->bind, kBatch, kHeads, c.L, c.L);
    d->density = d->mask->density();
  }
  d->flops = prefill_effective_flops(kBatch, kHeads, c.L, c.L, c.D, c.D, d->density);
#if FLEXJIT_BENCH_TORCH
  at::ScalarType st = c.dtype == DType::F32 ? at::kFloat : c.dtype == DType::BF16 ? at::kBFloat16 : at::kHalf;
  auto wrap = [&](OwnedTensor& t) {
    return at::from_blob(t.view.data, {kBatch, kHeads, c.L, c.D}, at::TensorOptions().dtype(st));
  };
  d->tq = wrap(d->q);
  d->tk = wrap(d->k);
  d->tv = wrap(d->v);
  if (c.mods != Mods::kNone) {
    // bias[h, i, j] = slopes[h] * (j - i) for ALiBi (what the registry's "alibi" computes), and
    // -inf above the diagonal for causal. fp32 for every dtype (see the top of the file).
    at::Tensor pos = at::arange(c.L, at::kFloat);
    at::Tensor rel = pos.view({1, c.L}) - pos.view({c.L, 1});  // [L, L]: j - i
    at::Tensor bias = at::zeros({1, c.L, c.L}, at::kFloat);
    if (has_alibi(c.mods)) {
      at::Tensor slopes = at::from_blob(d->storage.at(0).view.data, {kHeads}, at::kFloat);
      bias = slopes.view({kHeads, 1, 1}) * rel.unsqueeze(0);  // [H, L, L]
    }
    if (has_causal(c.mods)) bias.masked_fill_(rel.unsqueeze(0) > 0, -INFINITY);
    d->bias = bias;
  }
#endif
  cached = std::move(d);
  return *cached;
}

void run_flexjit(CaseData& d) {
  AttentionOptions opt;
  opt.num_threads = g_threads;
  flex_attention(d.q.view, d.k.view, d.v.view, d.out.view, nullptr, d.mods, d.bind,
                 d.mask ? &*d.mask : nullptr, opt);
}

// Compiles (or loads) the kernel for the case's dtype, D and mods with a tiny call: the kernel
// does not depend on L, so the timed calls find it in memory whatever the filter selected.
// Returns the engine that ran (the timed calls take the same one).
std::string warm_up_flexjit(const Case& c) {
  Case tiny = c;
  tiny.L = 128;
  ShapeInfo shape{kBatch, kHeads, kHeads, tiny.L, tiny.L};
  OwnedTensor q = OwnedTensor::make("q", c.dtype, {kBatch, kHeads, tiny.L, c.D});
  fill_random(q.view, 4);
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {kBatch, kHeads, tiny.L, c.D});
  std::vector<OwnedTensor> storage;
  ModSet mods;
  ModBindings bind;
  make_mods(c.mods, shape, &storage, &mods, &bind);
  std::optional<runtime::BlockMask> mask;
  if (mods.has_mask_mod()) mask = runtime::create_block_mask(mods, bind, 1, 1, tiny.L, tiny.L);
  AttentionOptions opt;
  opt.num_threads = g_threads;
  AttentionReport rep;
  flex_attention(q.view, q.view, q.view, out.view, nullptr, mods, bind, mask ? &*mask : nullptr,
                 opt, &rep);
  return rep.engine;
}

#if FLEXJIT_BENCH_TORCH

at::Tensor run_sdpa(const CaseData& d) {
  // Causal alone uses SDPA's own causal path; with ALiBi the -inf is already in the bias (SDPA
  // rejects is_causal together with an attn_mask).
  if (d.c.mods == Mods::kCausal)
    return at::scaled_dot_product_attention(d.tq, d.tk, d.tv, {}, 0.0, /*is_causal=*/true);
  std::optional<at::Tensor> mask;
  if (d.bias.defined()) mask = d.bias.unsqueeze(0);  // [1, H or 1, L, L]
  return at::scaled_dot_product_attention(d.tq, d.tk, d.tv, mask, 0.0, false);
}

at::Tensor run_unfused(const CaseData& d) {
  const double scale = 1.0 / std::sqrt(double(d.c.D));
  // [B, H, L, L] scores; .to(kFloat) is a no-op for fp32 and the usual fp32 softmax for bf16.
  at::Tensor s = at::matmul(d.tq, d.tk.transpose(-2, -1)).to(at::kFloat).mul_(scale);
  if (d.bias.defined()) s.add_(d.bias);
  at::Tensor p = at::softmax(s, -1).to(d.tv.scalar_type());
  return at::matmul(p, d.tv);
}

// Max |out - SDPA(fp32)| on the case's inputs (the same rounded values every impl read).
double max_error(CaseData& d, const at::Tensor& out) {
  if (!d.reference.defined()) {
    at::Tensor q = d.tq.to(at::kFloat), k = d.tk.to(at::kFloat), v = d.tv.to(at::kFloat);
    if (d.c.mods == Mods::kCausal) {
      d.reference = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
    } else {
      std::optional<at::Tensor> mask;
      if (d.bias.defined()) mask = d.bias.unsqueeze(0);
      d.reference = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false);
    }
  }
  return (out.to(at::kFloat) - d.reference).abs().max().item<double>();
}

#endif  // FLEXJIT_BENCH_TORCH

void bm_flexjit(benchmark::State& state, Case c) {
  try {
    const std::string engine = warm_up_flexjit(c);
    CaseData& d = case_data(c);
#if FLEXJIT_BENCH_TORCH
    if (c.L <= kCheckMaxL) {
      run_flexjit(d);  // the output the check reads
      c10::InferenceMode guard;
      at::Tensor out = at::from_blob(d.out.view.data, d.tq.sizes(), d.tq.scalar_type());
      double err = max_error(d, out);
      double tol = c.dtype == DType::F32 ? 1e-4 : c.dtype == DType::F16 ? 5e-3 : 2e-2;
      if (!(err <= tol)) {
        state.SkipWithError(("flexjit output differs from fp32 SDPA by " + std::to_string(err) +
                             " (tolerance " + std::to_string(tol) + "); not timed")
                                .c_str());
        return;
      }
      state.counters["max_abs_err"] = err;
    }
#endif
    for (auto _ : state) run_flexjit(d);
    set_flop_counters(state, d.flops);
    set_engine_counters(state, d.flops, engine, c.dtype, g_threads);
    state.counters["density"] = d.density;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

#if FLEXJIT_BENCH_TORCH

void bm_torch(benchmark::State& state, Case c, bool fused) {
  try {
    c10::InferenceMode guard;
    CaseData& d = case_data(c);
    auto run = [&] { return fused ? run_sdpa(d) : run_unfused(d); };
    // Warm-up (oneDNN primitives, allocator) at full size only where a call is short: a
    // multi-second call gains nothing measurable from it, and it would cost a pass per repetition.
    // It is also the output the accuracy counter reads.
    if (c.L <= kCheckMaxL) state.counters["max_abs_err"] = max_error(d, run());
    for (auto _ : state) {
      at::Tensor o = run();
      benchmark::DoNotOptimize(o.data_ptr());
    }
    set_flop_counters(state, d.flops);
    state.counters["density"] = d.density;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_unfused_skipped(benchmark::State& state) {
  state.SkipWithError(("skipped: unfused materialises [B, H, L, L] scores, softmax and bias (3 x " +
                       std::to_string(kBatch * kHeads * 8192LL * 8192 * 4 >> 30) +
                       " GiB in fp32 at L=8192); it runs up to L=" + std::to_string(kUnfusedMaxL))
                          .c_str());
}

#endif  // FLEXJIT_BENCH_TORCH

void register_all() {
  for (DType dtype : {DType::F32, DType::BF16, DType::F16})
    for (int64_t D : {64, 128})
      for (int64_t L : {1024, 2048, 4096, 8192})
        for (Mods m : {Mods::kNone, Mods::kCausal, Mods::kAlibi, Mods::kCausalAlibi}) {
          Case c{dtype, D, L, m};
          // One timed iteration of a multi-second case is already far above timer noise; the
          // default 0.5 s minimum gives the short cases several.
          benchmark::RegisterBenchmark(c.name("flexjit").c_str(), bm_flexjit, c)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
#if FLEXJIT_BENCH_TORCH
          benchmark::RegisterBenchmark(c.name("sdpa").c_str(), bm_torch, c, true)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
          if (L <= kUnfusedMaxL) {
            benchmark::RegisterBenchmark(c.name("unfused").c_str(), bm_torch, c, false)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
          } else {
            benchmark::RegisterBenchmark(c.name("unfused").c_str(), bm_unfused_skipped)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime()
                ->Iterations(1);
          }
#endif
        }
}

}  // namespace
}  // namespace flexjit::bench

int main(int argc, char** argv) {
  using namespace flexjit::bench;
  g_threads = take_threads_flag(&argc, argv);
  int threads = g_threads > 0 ? g_threads : int(std::thread::hardware_concurrency());
#if FLEXJIT_BENCH_TORCH
  at::set_num_threads(threads);
  benchmark::AddCustomContext("flexjit_torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("flexjit_torch_version", TORCH_VERSION);
#else
  benchmark::AddCustomContext("flexjit_torch", "off: built without FLEXJIT_WITH_TORCH");
#endif
  add_context(__FILE__, threads);
  add_ceiling_context(threads);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

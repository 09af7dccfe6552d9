// `flexjit demo`: the README's main job. Runs a few real mods on realistic shapes through the
// whole pipeline (trace/parse -> codegen -> Clang/ORC -> cache -> TBB), prefill and a paged
// decode step, checks each against the float64 reference on sampled rows, and prints
// compile/run times and the cache state.
#include <chrono>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "jit/cache.h"
#include "runtime/attention.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"

namespace flexjit::cli {
namespace {

struct DemoArgs {
  int64_t L = 1024;
  int threads = 0;
};

struct Case {
  const char* title;
  const char* score_mod;  // registered name or ""
  const char* mask_mod;
  DType dtype;
};

void fill(OwnedTensor& t, uint64_t seed) {
  fill_random(t.view, seed);
}

// One decode step of Llama-3.1-8B's attention against a paged KV cache: each sequence's new
// token attends to its cached keys (pages of 16 in a shuffled order), causal + ALiBi at absolute
// positions, split into partitions the planner picks; checked against the float64 reference.
bool demo_paged_decode(const DemoArgs& a) {
  const int64_t B = 2, Hq = 32, Hkv = 8, D = 128, ps = 16;
  const int64_t lens[B] = {a.L * 4 + 7, a.L * 2 + 100};
  int64_t max_pages = 0, pages = 0;
  for (int64_t l : lens) max_pages = std::max(max_pages, (l + ps - 1) / ps), pages += (l + ps - 1) / ps;
  OwnedTensor q = OwnedTensor::make("q", DType::BF16, {B, Hq, 1, D});
  OwnedTensor kc = OwnedTensor::make("k_cache", DType::BF16, {pages, ps, Hkv, D});
  OwnedTensor vc = OwnedTensor::make("v_cache", DType::BF16, {pages, ps, Hkv, D});
  OwnedTensor table = OwnedTensor::make("block_table", DType::I32, {B, max_pages});
  OwnedTensor seq = OwnedTensor::make("seq_lens", DType::I32, {B});
  fill(q, 4);
  fill(kc, 5);
  fill(vc, 6);
  for (int64_t b = 0, next = 0; b < B; ++b) {
    seq.data<int32_t>()[b] = int32_t(lens[b]);
    for (int64_t j = 0; j < max_pages; ++j)  // a fixed scatter of the pages over the cache
      table.data<int32_t>()[b * max_pages + j] = j < (lens[b] + ps - 1) / ps ? int32_t((next++ * 7919) % pages) : -1;
  }
  ShapeInfo shape{B, Hq, Hkv, lens[0], lens[0]};
  std::vector<OwnedTensor> storage;
  TracedMod sm = instantiate_example(find_mod("alibi"), shape, &storage);
  TracedMod mm = find_mod("causal").mod;
  auto [mods, bind] = combine(&sm, &mm);
  OwnedTensor out = OwnedTensor::make("out", DType::BF16, {B, Hq, 1, D});
  AttentionOptions opt;
  opt.enable_gqa = true;
  opt.num_threads = a.threads;
  AttentionReport first, second;
  paged_flex_attention(q.view, kc.view, vc.view, table.view, seq.view, out.view, nullptr, mods, bind, opt, &first);
  paged_flex_attention(q.view, kc.view, vc.view, table.view, seq.view, out.view, nullptr, mods, bind, opt, &second);
  RefResult ref = reference_paged_attention(q.view, kc.view, vc.view, table.view, seq.view, mods, bind,
                                            1.0 / std::sqrt(double(D)));
  const double err = max_abs_error(out.view, ref, {0});
  const double gbps = double(Hkv) * double(lens[0] + lens[1]) * 2.0 * double(D) * 2.0 / (second.kernel_ms * 1e6);
  std::printf("\npaged decode step, Llama-3.1-8B attention (B=2 Hq=32 Hkv=8 D=128 bf16, %lld and %lld cached keys "
              "in pages of 16, causal + ALiBi at absolute positions):\n  %s kernel, cache %s, compile %.1f ms, "
              "run %.2f / %.2f ms (%.1f GB/s of K+V), PARTITION_SIZE=%lld (%lld partitions, %s), max_err %.2g%s\n",
              (long long)lens[0], (long long)lens[1], first.path.c_str(), first.cache.c_str(), first.compile_ms,
              first.kernel_ms, second.kernel_ms, gbps, (long long)second.partition_size,
              (long long)second.num_partitions, second.tuning.c_str(), err, err <= 2e-2 ? "" : "  FAIL");
  return err <= 2e-2;
}

void run_demo(const DemoArgs& a) {
  const int64_t B = 2, Hq = 12, Hkv = 4, L = a.L, D = 64;
  std::printf("flexjit demo: B=%lld Hq=%lld Hkv=%lld (GQA group 3) L=%lld D=%lld, kernel cache at %s\n",
              (long long)B, (long long)Hq, (long long)Hkv, (long long)L, (long long)D,
              jit::KernelCache::global().dir().c_str());
  const Case cases[] = {
      {"causal + ALiBi", "alibi", "causal", DType::F32},
      {"tanh softcap", "softcap", "", DType::F32},
      {"document mask", "", "document", DType::F32},
      {"sliding window + ALiBi (bf16)", "alibi", "sliding_window", DType::BF16},
  };
  std::printf("\n%-32s %-6s %-7s %10s %10s %10s %9s %10s\n", "case", "dtype", "cache", "compile_ms", "1st_run_ms",
              "2nd_run_ms", "GFLOP/s", "max_err");
  bool all_ok = true;
  for (const Case& c : cases) {
    OwnedTensor q = OwnedTensor::make("q", c.dtype, {B, Hq, L, D});
    OwnedTensor k = OwnedTensor::make("k", c.dtype, {B, Hkv, L, D});
    OwnedTensor v = OwnedTensor::make("v", c.dtype, {B, Hkv, L, D});
    OwnedTensor out = OwnedTensor::make("out", c.dtype, {B, Hq, L, D});
    fill(q, 1);
    fill(k, 2);
    fill(v, 3);
    ShapeInfo shape{B, Hq, Hkv, L, L};
    std::vector<OwnedTensor> storage;
    TracedMod sm, mm;
    if (*c.score_mod) sm = instantiate_example(find_mod(c.score_mod), shape, &storage);
    if (*c.mask_mod) mm = instantiate_example(find_mod(c.mask_mod), shape, &storage);
    auto [mods, bind] = combine(*c.score_mod ? &sm : nullptr, *c.mask_mod ? &mm : nullptr);
    AttentionOptions opt;
    opt.enable_gqa = true;
    opt.num_threads = a.threads;
    runtime::BlockMask mask;
    const runtime::BlockMask* mp = nullptr;
    if (mods.has_mask_mod()) {
      mask = runtime::create_block_mask(mods, bind, B, Hq, L, L);
      mp = &mask;
    }
    AttentionReport first, second;
    flex_attention(q.view, k.view, v.view, out.view, nullptr, mods, bind, mp, opt, &first);
    flex_attention(q.view, k.view, v.view, out.view, nullptr, mods, bind, mp, opt, &second);
    std::vector<int64_t> rows = {0, 1, 17, L / 2, L - 1};
    RefResult ref = reference_attention(q.view, k.view, v.view, mods, bind, 1.0 / std::sqrt(double(D)), false, rows);
    double err = max_abs_error(out.view, ref, rows);
    double tol = c.dtype == DType::F32 ? 1e-4 : 2e-2;
    all_ok &= err <= tol;
    double density = mp ? mp->density() : 1.0;
    double gflops = 4.0 * double(B * Hq) * double(L) * double(L) * double(D) * density / (second.kernel_ms * 1e6);
    std::printf("%-32s %-6s %-7s %10.1f %10.2f %10.2f %9.1f %10.2g%s\n", c.title, dtype_name(c.dtype),
                first.cache.c_str(), first.compile_ms, first.kernel_ms, second.kernel_ms, gflops, err,
                err <= tol ? "" : "  FAIL");
  }
  all_ok &= demo_paged_decode(a);
  // The BlockMask builder never materialises a dense mask: a 128k x 128k causal mask.
  {
    TracedMod causal = find_mod("causal").mod;
    auto [mods, bind] = combine(nullptr, &causal);
    runtime::BlockMaskBuildStats st;
    runtime::BlockMask m = runtime::create_block_mask(mods, bind, 1, 1, 131072, 131072, 128, 128, &st);
    std::printf("\n128k x 128k causal BlockMask: %.1f ms, %.2f MB, %lld blocks decided by interval analysis, "
                "%lld evaluated exactly\n", st.ms, double(m.bytes()) / 1e6, (long long)st.decided_by_interval,
                (long long)st.evaluated);
  }
  auto stats = jit::KernelCache::global().stats();
  std::printf("kernel cache: %ld compiles, %ld disk hits, %ld memory hits this run (run the demo again to see "
              "disk hits)\n", stats.compiles, stats.disk_hits, stats.memory_hits);
  std::printf("%s\n", all_ok ? "demo: all checks passed" : "demo: SOME CHECKS FAILED");
  if (!all_ok) throw Error("demo: a result differed from the float64 reference beyond tolerance");
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto a = std::make_shared<DemoArgs>();
  auto* cmd = app.add_subcommand("demo", "Run a few mods end to end, checked against a float64 reference");
  cmd->add_option("--seq-len", a->L, "sequence length (default 1024)");
  cmd->add_option("--threads", a->threads, "worker threads (default: all cores)");
  cmd->callback([a] { run_demo(*a); });
}

}  // namespace flexjit::cli

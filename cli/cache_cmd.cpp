#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "cli/mods_from_args.h"
#include "jit/cache.h"
#include "runtime/attention.h"
#include "score_mods/registry.h"

namespace flexjit::cli {
namespace {

struct WarmArgs {
  std::vector<std::string> dtypes{"fp32", "bf16"};
  std::vector<int> head_dims{64, 128};
  std::vector<int> gqa{1};
  std::vector<int64_t> lq{1, 4096};
};

// Compiles (or finds) the attention kernel that a call of each shape would use, by making that
// call on zero inputs with one key: the kernel choice (blocks, engine, GQA packing) is then the
// runtime's own, and a later real call with any KV length and any mods finds it in the cache,
// so only its small mods kernel is left to compile. Shapes run on all cores at once.
void warm(const WarmArgs& w) {
  struct Job {
    DType dtype;
    int d, group;
    int64_t lq;
  };
  std::vector<Job> jobs;
  for (const auto& dt : w.dtypes)
    for (int d : w.head_dims)
      for (int g : w.gqa)
        for (int64_t lq : w.lq) {
          if (d < 1 || d > 256) throw Error("cache warm --head-dim " + std::to_string(d) + ": use 1..256");
          if (g < 1) throw Error("cache warm --gqa " + std::to_string(g) + ": use a group size >= 1");
          if (lq < 1) throw Error("cache warm --lq " + std::to_string(lq) + ": use a query length >= 1");
          jobs.push_back({parse_dtype(dt), d, g, lq});
        }
  std::atomic<size_t> next{0};
  std::mutex out_mu;
  int failures = 0;
  auto worker = [&] {
    for (size_t i; (i = next++) < jobs.size();) {
      const Job& j = jobs[i];
      OwnedTensor q = OwnedTensor::make("q", j.dtype, {1, j.group, j.lq, j.d});
      OwnedTensor kv = OwnedTensor::make("kv", j.dtype, {1, 1, 1, j.d});
      OwnedTensor out = OwnedTensor::make("out", j.dtype, {1, j.group, j.lq, j.d});
      AttentionOptions opt;
      opt.enable_gqa = j.group > 1;
      opt.num_threads = 1;  // the jobs themselves use the cores
      AttentionReport rep;
      std::string line = std::string(dtype_name(j.dtype)) + " D=" + std::to_string(j.d) +
                         " GQA=" + std::to_string(j.group) + " Lq=" + std::to_string(j.lq) + ": ";
      try {
        auto t0 = std::chrono::steady_clock::now();
        flex_attention(q.view, kv.view, kv.view, out.view, nullptr, ModSet{}, ModBindings{}, nullptr, opt, &rep);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        char buf[64];
        std::snprintf(buf, sizeof(buf), " (%.0f ms)", ms);
        line += (rep.cache == "miss" ? "compiled" : rep.cache == "disk" ? "on disk" : "in memory") +
                std::string(buf) + " " + rep.symbol + " BLOCK " + std::to_string(rep.block_m) + "x" +
                std::to_string(rep.block_n) + (rep.amx ? " AMX" : "");
      } catch (const std::exception& e) {
        line += std::string("failed: ") + e.what();
        std::lock_guard<std::mutex> lock(out_mu);
        ++failures;
      }
      std::lock_guard<std::mutex> lock(out_mu);
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    }
  };
  const unsigned n = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), unsigned(jobs.size())));
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  std::printf("%zu attention kernels ready in %s\n", jobs.size() - failures, jit::KernelCache::global().dir().c_str());
  if (failures) throw Error(std::to_string(failures) + " of " + std::to_string(jobs.size()) + " kernels failed (see above)");
}

}  // namespace

void add_cache_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("cache", "Inspect, clear or pre-fill the on-disk kernel cache (FLEXJIT_CACHE_DIR)");
  auto action = std::make_shared<std::string>("list");
  auto w = std::make_shared<WarmArgs>();
  cmd->add_option("action", *action, "list | clear | dir | warm (compile the attention kernels of common shapes ahead of the first call)")
      ->check(CLI::IsMember({"list", "clear", "dir", "warm"}));
  cmd->add_option("--dtype", w->dtypes, "warm: dtypes (default fp32,bf16)")->delimiter(',');
  cmd->add_option("--head-dim", w->head_dims, "warm: head dims D = Dv (default 64,128)")->delimiter(',');
  cmd->add_option("--gqa", w->gqa, "warm: GQA group sizes Hq/Hkv (default 1)")->delimiter(',');
  cmd->add_option("--lq", w->lq, "warm: query lengths, which pick the block sizes (default 1,4096: decode and prefill)")
      ->delimiter(',');
  cmd->callback([action, w] {
    auto& cache = jit::KernelCache::global();
    if (*action == "warm") {
      warm(*w);
    } else if (*action == "dir") {
      std::printf("%s\n", cache.dir().c_str());
    } else if (*action == "clear") {
      std::printf("removed %zu entries from %s\n", cache.clear_disk(), cache.dir().c_str());
    } else {
      auto entries = cache.list();
      long total = 0;
      for (const auto& e : entries) {
        std::printf("%s  %8ld bytes\n", e.key.c_str(), e.bytes);
        total += e.bytes;
      }
      std::printf("%zu kernels, %ld bytes in %s\n", entries.size(), total, cache.dir().c_str());
    }
  });
}

}  // namespace flexjit::cli

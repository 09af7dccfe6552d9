#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "cli/commands.h"
#include "cli/mods_from_args.h"
#include "jit/cache.h"
#include "jit/executor.h"
#include "jit/nvrtc.h"
#include "jit/pipeline.h"
#include "runtime/attention.h"
#include "runtime/cuda_decode.h"
#include "score_mods/registry.h"

namespace flexjit::cli {
namespace {

struct WarmArgs {
  std::string device = "cpu";
  std::string arch;            // cuda: sm_80, sm_90, ...
  std::string score_mod, mask_mod;  // cuda: the kernels inline their mods (names or text)
  std::vector<std::string> dtypes{"fp32", "bf16"};
  std::vector<int> head_dims{64, 128};
  std::vector<int> gqa{1};
  std::vector<int64_t> lq{1, 4096};
  bool prune = false;  // remove the cache's other entries (the build's prebuilt directory)
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
  std::mutex out_mu;
  int failures = 0;
  std::set<std::string> keys;  // every kernel these shapes use (guarded by out_mu)
  auto compile = [&](size_t i) {
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
      {
        std::lock_guard<std::mutex> lock(out_mu);
        for (const auto& k : rep.kernels) keys.insert(k.key);
      }
      line += (rep.cache == "miss"       ? "compiled"
               : rep.cache == "disk"     ? "on disk"
               : rep.cache == "prebuilt" ? "prebuilt (" + jit::KernelCache::global().prebuilt_dir() + ")"
                                         : "in memory") +
              std::string(buf) + " " + rep.symbol + " BLOCK " + std::to_string(rep.block_m) + "x" +
              std::to_string(rep.block_n) + " " + rep.engine;
    } catch (const std::exception& e) {
      line += std::string("failed: ") + e.what();
      std::lock_guard<std::mutex> lock(out_mu);
      ++failures;
    }
    std::lock_guard<std::mutex> lock(out_mu);
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  jit::for_each_on_cores(jobs.size(), compile);
  std::printf("%zu attention kernels ready in %s\n", jobs.size() - failures, jit::KernelCache::global().dir().c_str());
  if (failures) throw Error(std::to_string(failures) + " of " + std::to_string(jobs.size()) + " kernels failed (see above)");
  if (w.prune) {
    // Entries these shapes did not use: kernels of older templates, codegen or another CPU.
    auto& cache = jit::KernelCache::global();
    size_t removed = 0;
    for (const auto& e : cache.list()) {
      if (keys.count(e.key)) continue;
      std::error_code ec;
      for (const char* ext : {".o", ".meta", ".cpp"}) std::filesystem::remove(cache.dir() + "/" + e.key + ext, ec);
      ++removed;
    }
    std::printf("pruned %zu other entries from %s\n", removed, cache.dir().c_str());
  }
}

// CUDA kernels for a GPU this machine may not have: NVRTC compiles each (dtype, D, GQA group)
// with the given mods for `arch` into the disk cache, as CUBIN + PTX. CUDA kernels inline their
// mods, so each mod set is its own kernel.
void warm_cuda(const WarmArgs& w) {
  if (w.arch.empty())
    throw Error("cache warm --device cuda needs --arch (the GPU's, e.g. sm_80 for A100, sm_90 for H100/H200)");
  std::string why;
  if (!jit::nvrtc_available(&why)) throw Error("cache warm --device cuda: " + why);
  ModArgs ma;
  ma.score_mod = w.score_mod;
  ma.mask_mod = w.mask_mod;
  ResolvedMods rm = resolve_mods(ma, ShapeInfo{});
  if (!rm.mods.buffers.empty() && rm.mods.buffers.size() > 8)
    throw Error("cache warm --device cuda: a CUDA mod set reads at most 8 buffers");
  std::string mods_text = rm.describe;
  while (!mods_text.empty() && mods_text.back() == ' ') mods_text.pop_back();
  int failures = 0, jobs = 0;
  for (const auto& dt : w.dtypes)
    for (int d : w.head_dims)
      for (int g : w.gqa)
        for (bool decode : {false, true}) {
        if (g < 1) throw Error("cache warm --gqa " + std::to_string(g) + ": use a group size >= 1");
        // --lq picks the kernels as a call would: Lq > 16 the prefill kernel, Lq <= 16 the decode one.
        if (std::none_of(w.lq.begin(), w.lq.end(), [&](int64_t lq) { return decode ? lq <= 16 : lq > 16; })) continue;
        jit::KernelSpec spec;
        if (decode) {
          spec = cuda_decode_kernel_spec(parse_dtype(dt), d, d, g, cuda_device_info_for_arch(w.arch));
        } else {
          // The engine a call would get: wgmma where FLEXJIT_CUDA_WGMMA=1 and the arch / D allow it.
          const CudaDeviceInfo dev = cuda_device_info_for_arch(w.arch);
          spec = cuda_prefill_kernel_spec(parse_dtype(dt), d, d, g, dev, 0, 0,
                                          cuda_resolve_wgmma(-1, parse_dtype(dt), d, d, dev, 0, 0));
        }
        ++jobs;
        std::string line = "cuda " + w.arch + " " + dtype_name(spec.dtype) + " D=" + std::to_string(d) +
                           " GQA=" + std::to_string(g) + (decode ? " decode" : "") +
                           (spec.engine == PrefillEngine::Wgmma ? " wgmma" : "") + ": ";
        try {
          jit::CudaBinary b = jit::get_cuda_binary(spec, rm.mods);
          char buf[160];
          std::snprintf(buf, sizeof(buf), "%s (%.0f ms) %s, CUBIN %zu bytes, PTX %zu bytes",
                        b.cache == "miss" ? "compiled" : "on disk", b.compile_ms, b.symbol.c_str(), b.cubin.size(),
                        b.ptx.size());
          line += buf;
        } catch (const std::exception& e) {
          line += std::string("failed: ") + e.what();
          ++failures;
        }
        std::printf("%s\n", line.c_str());
        std::fflush(stdout);
        }
  std::printf("%d CUDA kernels for %s (%s) ready in %s (NVRTC %s; no GPU needed, none used)\n", jobs - failures,
              w.arch.c_str(), mods_text.empty() ? "no mods" : mods_text.c_str(),
              jit::KernelCache::global().dir().c_str(), jit::nvrtc_version().c_str());
  if (failures) throw Error(std::to_string(failures) + " of " + std::to_string(jobs) + " kernels failed (see above)");
}

}  // namespace

void add_cache_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("cache", "Inspect, clear or pre-fill the on-disk kernel cache (FLEXJIT_CACHE_DIR)");
  auto action = std::make_shared<std::string>("list");
  auto w = std::make_shared<WarmArgs>();
  cmd->add_option("action", *action, "list | clear | dir | warm (compile the attention kernels of common shapes ahead of the first call)")
      ->check(CLI::IsMember({"list", "clear", "dir", "warm"}));
  auto* dtype_opt = cmd->add_option("--dtype", w->dtypes, "warm: dtypes (default fp32,bf16; with --device cuda bf16)")
                        ->delimiter(',');
  cmd->add_option("--head-dim", w->head_dims, "warm: head dims D = Dv (default 64,128)")->delimiter(',');
  cmd->add_option("--gqa", w->gqa, "warm: GQA group sizes Hq/Hkv (default 1)")->delimiter(',');
  cmd->add_option("--lq", w->lq, "warm: query lengths, which pick the block sizes (default 1,4096: decode and prefill)")
      ->delimiter(',');
  cmd->add_flag("--prune", w->prune,
                "warm (cpu): afterwards remove every other entry from the cache directory (for a directory that "
                "holds only warmed kernels, like the build's prebuilt tier)");
  cmd->add_option("--device", w->device, "warm: cpu (default) or cuda (NVRTC only, no GPU needed)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--arch", w->arch, "warm --device cuda: the GPU arch to compile for (sm_80, sm_86, sm_89, sm_90, ...)");
  cmd->add_option("--score-mod", w->score_mod, "warm --device cuda: the score_mod (CUDA kernels inline their mods)");
  cmd->add_option("--mask-mod", w->mask_mod, "warm --device cuda: the mask_mod");
  cmd->callback([action, w, dtype_opt] {
    auto& cache = jit::KernelCache::global();
    if (*action == "warm" && w->device == "cuda") {
      if (w->prune) throw Error("cache warm: --prune goes with CPU kernels, not --device cuda");
      WarmArgs cw = *w;
      if (dtype_opt->count() == 0) cw.dtypes = {"bf16"};  // CUDA kernels take bf16 or fp16
      warm_cuda(cw);
    } else if (*action == "warm") {
      if (!w->arch.empty() || !w->score_mod.empty() || !w->mask_mod.empty())
        throw Error("cache warm: --arch, --score-mod and --mask-mod go with --device cuda (CPU attention kernels "
                    "are mod-free)");
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
      // The read-only prebuilt tier (jit/cache.h), if there is one: counted, never listed or cleared here.
      if (!cache.prebuilt_dir().empty()) {
        std::error_code ec;
        size_t n = 0;
        for (const auto& e : std::filesystem::directory_iterator(cache.prebuilt_dir(), ec))
          if (e.path().extension() == ".o") ++n;
        std::printf("prebuilt tier (read-only, FLEXJIT_PREBUILT_DIR=off ignores it): %zu kernels in %s\n", n,
                    cache.prebuilt_dir().c_str());
      }
    }
  });
}

}  // namespace flexjit::cli

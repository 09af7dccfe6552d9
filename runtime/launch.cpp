#include "runtime/launch.h"

#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "jit/compile.h"

namespace flexjit::runtime {

void run_items(const AttentionOptions& opt, int64_t items, bool zigzag,
               const std::function<void(int64_t, int64_t)>& run) {
  if (items <= 0) return;
  if (opt.parallel_for) {
    if (!zigzag) {
      opt.parallel_for(items, run);
      return;
    }
    opt.parallel_for(items, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t item = i % 2 == 0 ? i / 2 : items - 1 - i / 2;
        run(item, item + 1);
      }
    });
    return;
  }
  auto go = [&] {
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, items, 1),
                      [&](const tbb::blocked_range<int64_t>& r) { run(r.begin(), r.end()); },
                      tbb::simple_partitioner());
  };
  // An arena only when the count differs from TBB's default (creating one costs tens of us).
  if (opt.num_threads > 0 && opt.num_threads != tbb::info::default_concurrency()) {
    tbb::task_arena arena(opt.num_threads);
    arena.execute(go);
  } else {
    go();
  }
}

void record_kernels(AttentionReport& rep, const std::vector<jit::KernelHandle>& kernels, double kernels_ms) {
  rep.cache = "memory";
  rep.target = jit::cpu_target_name();
  rep.kernels.clear();
  rep.load_ms = 0;
  for (size_t i = 0; i < kernels.size(); ++i) {
    const jit::KernelHandle& h = kernels[i];
    // The summary is the costliest source any kernel came from: miss > disk > prebuilt > memory.
    auto rank = [](const std::string& c) { return c == "miss" ? 3 : c == "disk" ? 2 : c == "prebuilt" ? 1 : 0; };
    if (rank(h.cache) > rank(rep.cache)) rep.cache = h.cache;
    rep.load_ms += h.load_ms;
    rep.kernels.push_back(
        {i == 0 ? "attention" : "mods", h.cache, h.compile_ms, h.load_ms, h.symbol, h.key, h.source_path});
  }
  rep.compile_ms = rep.cache == "miss" ? kernels_ms : 0;
  rep.lookup_us = kernels_ms * 1000;
  if (!kernels.empty()) {
    rep.symbol = kernels[0].symbol;
    rep.key = kernels[0].key;
    rep.source_path = kernels[0].source_path;
  }
}

void record_prefill(AttentionReport& rep, const PrefillKernels& pk, int bm, int bn, const std::string& tuning,
                    int gqa_group, PrefillEngine engine, DType dtype) {
  record_kernels(rep, pk.kernels, pk.ms);
  rep.block_m = bm;
  rep.block_n = bn;
  rep.tuning = tuning;
  rep.gqa_group = gqa_group;
  rep.engine = engine_name(engine);
  rep.dtype = dtype_name(dtype);
}

}  // namespace flexjit::runtime

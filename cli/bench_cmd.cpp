// `flexjit bench`: the C++ side of bench/compare_torch.py's suite, without Python or libtorch.
// The same cases (prefill and decode; fp32 and bf16; noop, causal, alibi, softcap,
// sliding_window, document, prefix_lm) and shapes, timed through flexjit's runtime: the first
// call of each case (cold: a private, fresh kernel cache unless --warm-cache), then the median
// of --reps timed calls, and a check of sampled rows against the float64 reference.
//
// Keep the suite in step with bench/compare_torch.py (tests/python/test_compare_torch.py
// compares `flexjit bench --list` with it). Buffer contents (ALiBi slopes, document ids) are
// flexjit's built-in examples, so document lengths differ from the Python suite's.
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/npy.h"
#include "jit/cache.h"
#include "runtime/attention.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"

namespace flexjit::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct BenchArgs {
  bool quick = false;
  bool list = false;
  bool warm_cache = false;
  std::string filter;
  int reps = 5;
  int threads = 0;
  std::string json;
};

struct Shape {
  int64_t B, Hq, Hkv, Lq, Lkv, D;
};

struct Case {
  std::string path, dtype, mod;
  Shape s;
  std::string name() const { return path + "/" + dtype + "/" + mod; }
};

const char* const kMods[] = {"noop", "causal", "alibi", "softcap", "sliding_window", "document", "prefix_lm"};

std::vector<Case> suite(bool quick) {
  const Shape prefill = quick ? Shape{1, 4, 4, 256, 256, 64} : Shape{1, 8, 8, 2048, 2048, 64};
  const Shape decode = quick ? Shape{2, 4, 2, 1, 512, 64} : Shape{4, 8, 2, 1, 8192, 64};
  std::vector<Case> cases;
  for (const char* path : {"prefill", "decode"})
    for (const char* dtype : {"fp32", "bf16"})
      for (const char* mod : kMods)
        cases.push_back({path, dtype, mod, std::string(path) == "prefill" ? prefill : decode});
  return cases;
}

bool selected(const Case& c, const std::string& filter) {
  if (filter.empty()) return true;
  size_t at = 0;
  while (at <= filter.size()) {  // comma-separated alternatives, like compare_torch.py
    size_t end = filter.find(',', at);
    if (end == std::string::npos) end = filter.size();
    std::string alt = filter.substr(at, end - at);
    if (!alt.empty() && c.name().find(alt) != std::string::npos) return true;
    at = end + 1;
  }
  return false;
}

// The case's mods. Prefill uses the built-ins (query i is position i). Decode's one query is
// the last position, so it writes the same mods as text over q_idx + int(off), off = Lkv - Lq.
struct CaseMods {
  ModSet mods;
  ModBindings bind;
  std::vector<OwnedTensor> storage;
};

CaseMods make_mods(const Case& c) {
  CaseMods r;
  const Shape& s = c.s;
  ShapeInfo shape{s.B, s.Hq, s.Hkv, std::max(s.Lq, s.Lkv), s.Lkv};  // buffers over all positions
  auto example = [&](const char* name) { return instantiate_example(find_mod(name), shape, &r.storage); };
  auto buffer = [&](const char* name) {
    for (const OwnedTensor& t : r.storage)
      if (t.name == name) return t;
    throw Error(std::string("bench: no example buffer ") + name);
  };
  TracedMod sm, mm;
  bool has_s = false, has_m = false;
  if (c.path == "prefill") {
    const std::map<std::string, std::pair<const char*, const char*>> builtins = {
        {"noop", {"", ""}},           {"causal", {"", "causal"}},
        {"alibi", {"alibi", "causal"}}, {"softcap", {"softcap", ""}},
        {"sliding_window", {"", "sliding_window"}}, {"document", {"", "document"}},
        {"prefix_lm", {"", "prefix_lm"}}};
    auto [score, mask] = builtins.at(c.mod);
    if (*score) sm = example(score), has_s = true;
    if (*mask) mm = example(mask), has_m = true;
  } else {
    const std::string q = "(q_idx + int(off))";
    std::vector<std::pair<std::string, double>> params = {{"off", double(s.Lkv - s.Lq)}};
    std::vector<OwnedTensor> bufs;
    std::string score, mask;
    if (c.mod == "causal") mask = q + " >= kv_idx";
    if (c.mod == "alibi") {
      example("alibi");
      bufs.push_back(buffer("slopes"));
      score = "score + slopes[h] * float(kv_idx - " + q + ")";
      mask = q + " >= kv_idx";
    }
    if (c.mod == "softcap") score = "softcap";
    if (c.mod == "sliding_window") {
      mask = q + " >= kv_idx && " + q + " - kv_idx < window";
      params.push_back({"window", 256});
    }
    if (c.mod == "document") {
      example("document");
      bufs.push_back(buffer("doc"));
      mask = "doc[" + q + "] == doc[kv_idx]";
    }
    if (c.mod == "prefix_lm") {
      mask = "kv_idx < prefix || " + q + " >= kv_idx";
      params.push_back({"prefix", 64});
    }
    if (score == "softcap") {
      sm = example("softcap"), has_s = true;
    } else if (!score.empty()) {
      sm = parse_mod(score, ModKind::Score, bufs, params), has_s = true;
    }
    if (!mask.empty()) mm = parse_mod(mask, ModKind::Mask, bufs, params), has_m = true;
  }
  auto [set, bind] = combine(has_s ? &sm : nullptr, has_m ? &mm : nullptr);
  r.mods = std::move(set);
  r.bind = std::move(bind);
  return r;
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

nlohmann::json run_case(const Case& c, const BenchArgs& a) {
  const Shape& s = c.s;
  const DType dt = c.dtype == "fp32" ? DType::F32 : DType::BF16;
  OwnedTensor q = OwnedTensor::make("q", dt, {s.B, s.Hq, s.Lq, s.D});
  OwnedTensor k = OwnedTensor::make("k", dt, {s.B, s.Hkv, s.Lkv, s.D});
  OwnedTensor v = OwnedTensor::make("v", dt, {s.B, s.Hkv, s.Lkv, s.D});
  OwnedTensor out = OwnedTensor::make("out", dt, {s.B, s.Hq, s.Lq, s.D});
  fill_random(q.view, 1);
  fill_random(k.view, 2);
  fill_random(v.view, 3);
  CaseMods m = make_mods(c);
  AttentionOptions opt;
  opt.enable_gqa = s.Hq != s.Hkv;
  opt.num_threads = a.threads;

  // First call: what a user's first call costs (BlockMask build + compiles + run), timed whole.
  runtime::BlockMask mask;
  const runtime::BlockMask* mp = nullptr;
  AttentionReport first;
  runtime::BlockMaskBuildStats st;
  auto t0 = Clock::now();
  if (m.mods.has_mask_mod()) {
    mask = runtime::create_block_mask(m.mods, m.bind, 1, 1, s.Lq, s.Lkv, 128, 128, &st);
    mp = &mask;
  }
  const double mask_ms = ms_since(t0);
  flex_attention(q.view, k.view, v.view, out.view, nullptr, m.mods, m.bind, mp, opt, &first);
  const double first_ms = ms_since(t0);

  std::vector<double> samples;
  AttentionReport rep;
  flex_attention(q.view, k.view, v.view, out.view, nullptr, m.mods, m.bind, mp, opt, &rep);  // warm-up
  for (int i = 0; i < a.reps; ++i) {
    auto t1 = Clock::now();
    flex_attention(q.view, k.view, v.view, out.view, nullptr, m.mods, m.bind, mp, opt, &rep);
    samples.push_back(ms_since(t1));
  }
  const double med = median(samples);

  std::vector<int64_t> rows = {0, s.Lq / 2, s.Lq - 1};
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  RefResult ref = reference_attention(q.view, k.view, v.view, m.mods, m.bind, 1.0 / std::sqrt(double(s.D)), false,
                                      rows);
  const double err = max_abs_error(out.view, ref, rows);
  const double tol = dt == DType::F32 ? 1e-3 : 3e-2;  // compare_torch.py's TOL

  // Work actually done: the BlockMask's visited fraction (block granularity).
  const double density = mp ? mp->density() : 1.0;
  const double flop = 4.0 * double(s.B * s.Hq) * double(s.Lq) * double(s.Lkv) * double(s.D) * density;
  const double kv_bytes = 2.0 * double(s.B * s.Hkv) * double(s.Lkv) * double(s.D) * double(dtype_size(dt)) * density;
  nlohmann::json j;
  j["name"] = c.name();
  j["path"] = c.path;
  j["dtype"] = c.dtype;
  j["mod"] = c.mod;
  j["shape"] = {{"B", s.B}, {"Hq", s.Hq}, {"Hkv", s.Hkv}, {"Lq", s.Lq}, {"Lkv", s.Lkv}, {"D", s.D}};
  j["first_call_ms"] = first_ms;
  j["first_call_block_mask_ms"] = mask_ms;
  // The BlockMask build may have compiled the mods kernel the call then found in memory.
  j["first_call_cache"] = st.classify_cache == "miss" ? "miss" : first.cache;
  j["first_call_compile_ms"] = first.compile_ms;
  j["samples_ms"] = samples;
  j["median_ms"] = med;
  j["density"] = density;
  j["gflops"] = flop / (med * 1e6);
  j["gbps"] = kv_bytes / (med * 1e6);
  j["max_abs_err"] = err;
  j["tolerance"] = tol;
  j["ok"] = err <= tol;
  j["knobs"] = {{"BLOCK_M", rep.block_m}, {"BLOCK_N", rep.block_n}, {"GQA_GROUP", rep.gqa_group}, {"PACK_GQA", rep.pack_gqa}, {"AMX", rep.engine == "amx"}, {"ENGINE", rep.engine}};
  return j;
}

void run_bench(const BenchArgs& a) {
  std::vector<Case> cases;
  for (const Case& c : suite(a.quick))
    if (selected(c, a.filter)) cases.push_back(c);
  if (a.list) {
    for (const Case& c : cases) std::printf("%s\n", c.name().c_str());
    return;
  }
  if (cases.empty()) throw Error("bench: --filter '" + a.filter + "' matches no case; see flexjit bench --list");
  if (a.reps < 1) throw Error("bench: --reps must be at least 1");

  // A private cache, set before anything asks for KernelCache::global(): first calls are cold
  // compiles and the user's cache is neither read nor filled, nor are the build's prebuilt
  // kernels used (jit/cache.h).
  std::string tmp;
  if (!a.warm_cache) {
    char dir[] = "/tmp/flexjit-bench-XXXXXX";
    if (!mkdtemp(dir)) throw Error("bench: cannot create a temporary cache directory under /tmp");
    tmp = dir;
    setenv("FLEXJIT_CACHE_DIR", dir, 1);
    setenv("FLEXJIT_PREBUILT_DIR", "off", 1);
  }
  nlohmann::json results = nlohmann::json::array();
  bool all_ok = true;
  std::printf("%-28s %10s %8s %10s %10s %9s %9s %9s\n", "case", "first_ms", "cache", "median_ms", "GFLOP/s",
              "GB/s", "max_err", "BMxBN");
  for (size_t i = 0; i < cases.size(); ++i) {
    nlohmann::json j;
    try {
      j = run_case(cases[i], a);
    } catch (const Error& e) {
      j = {{"name", cases[i].name()}, {"error", e.what()}, {"ok", false}};
    }
    all_ok &= j["ok"].get<bool>();
    if (j.contains("error")) {
      std::printf("%-28s error: %s\n", cases[i].name().c_str(), j["error"].get<std::string>().c_str());
    } else {
      std::printf("%-28s %10.1f %8s %10.2f %10.1f %9.2f %9.2g %6dx%d%s\n", cases[i].name().c_str(),
                  j["first_call_ms"].get<double>(), j["first_call_cache"].get<std::string>().c_str(),
                  j["median_ms"].get<double>(), j["gflops"].get<double>(), j["gbps"].get<double>(),
                  j["max_abs_err"].get<double>(), j["knobs"]["BLOCK_M"].get<int>(), j["knobs"]["BLOCK_N"].get<int>(),
                  j["ok"].get<bool>() ? "" : "  FAIL");
    }
    std::fflush(stdout);
    results.push_back(j);
  }
  if (!tmp.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(tmp, ec);
  }
  if (!a.json.empty()) {
    nlohmann::json doc = {{"suite", a.quick ? "quick" : "full"}, {"reps", a.reps}, {"threads", a.threads},
                          {"cold_first_calls", !a.warm_cache}, {"cases", results}};
    OutputFiles files;  // temp + rename: a failed write leaves nothing behind
    files.add_text("--json", a.json, doc.dump(2) + "\n");
    files.commit();
  }
  if (!all_ok) throw Error("bench: a case failed or differed from the float64 reference beyond tolerance");
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand(
      "bench", "Time the compare_torch suite (prefill + decode, fp32 + bf16, 7 mods) through flexjit, no Python");
  cmd->add_flag("--quick", a->quick, "small shapes (a smoke test)");
  cmd->add_flag("--list", a->list, "print the case names and exit");
  cmd->add_option("--filter", a->filter, "only cases whose name contains this (commas: alternatives)");
  cmd->add_option("--reps", a->reps, "timed calls per case (default 5); the median is reported");
  cmd->add_option("--threads", a->threads, "worker threads (default: all cores)");
  cmd->add_option("--json", a->json, "write every sample, median and check here");
  cmd->add_flag("--warm-cache", a->warm_cache,
                "use the normal kernel cache and the build's prebuilt kernels (first calls may then be disk or "
                "prebuilt hits) instead of a fresh cache and none");
  cmd->callback([a] { run_bench(*a); });
}

}  // namespace flexjit::cli

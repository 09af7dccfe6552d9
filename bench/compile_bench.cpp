// JIT compile latency, benchmarked like a kernel: what a first call, a repeat call and a first
// call in a new process cost for a prefill call with a score_mod (fp32, HEAD_DIM=128, ALiBi),
// and what building a long-context BlockMask costs. A call needs two kernels: the attention
// kernel (compiled once per shape, for every mod) and the mod set's kernels (compiled once per
// mod set, for every shape); both new, they compile in parallel.
//
//   compile/fp32/D128/alibi/cold_new_mod       a mod never seen, on a shape already compiled:
//                                              jit::get_kernels compiles the mods kernel only
//   compile/fp32/D128/alibi/cold_new_shape     a shape and a mod never seen: both kernels
//                                              compile, side by side
//   compile/fp32/D128/alibi/cold_stages_mods   the mods kernel's compile stage by stage
//   compile/fp32/D128/alibi/cold_stages_attention  the attention kernel's, stage by stage
//                                              (make_source, Clang frontend / O3 / codegen, load)
//   compile/fp32/D128/alibi/memory_hit         a repeat jit::get_kernels (front memo)
//   compile/fp32/D128/alibi/memory_hit_call_L1 a whole flex_attention call at L=1: validation,
//                                              kernel lookup, mod binding and TBB dispatch
//   compile/fp32/D128/alibi/disk_hit_load      a fresh jit::KernelCache on the warm directory:
//                                              read + checksum + JIT link of both cached objects
//   compile/fp32/D128/alibi/disk_hit_process   a new process (this binary, --disk-hit-child)
//                                              from spawn to callable kernels from the warm disk
//                                              cache; counters split it into exec + dynamic
//                                              loading and main() -> kernel
//   compile/fp32/D128/alibi/disk_hit_process_cli  the same through `flexjit run` (no libtorch),
//                                              spawn to exit of a tiny call
//   blockmask/causal/L131072/build             create_block_mask for a 128k x 128k causal mask
//
// Targets (README): memory hit <= 20 us, disk hit load <= 30 ms, 128k BlockMask well under 1 s.
// Each run uses a private, fresh FLEXJIT_CACHE_DIR (removed at exit), never the user's cache.
#include <benchmark/benchmark.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "bench/flops.h"
#include "jit/cache.h"
#include "jit/compile.h"
#include "jit/pipeline.h"
#include "runtime/attention.h"
#include "runtime/block_mask.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"

extern char** environ;

namespace flexjit::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kHeadDim = 128;
constexpr int64_t kHeads = 8;
constexpr const char* kAlibiText = "score + slopes[h] * (kv_idx - q_idx)";

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// gqa_group only changes `hq / GQA_GROUP` in the kernel: a distinct value is a new shape key
// that costs what any new shape costs to compile.
jit::KernelSpec prefill_spec(int gqa_group = 1) {
  jit::KernelSpec spec;
  spec.kind = jit::KernelKind::Prefill;
  spec.dtype = DType::F32;
  spec.head_dim = spec.head_dim_v = kHeadDim;
  spec.gqa_group = gqa_group;
  default_blocks(kHeadDim, spec.dtype, /*q_len=*/4096, &spec.block_m, &spec.block_n);
  return spec;
}

jit::KernelSpec mods_spec() {
  jit::KernelSpec spec;
  spec.kind = jit::KernelKind::Mods;
  return spec;
}

// What flex_attention asks the pipeline for: the attention kernel and the mods kernel.
std::vector<jit::KernelHandle> get_call_kernels(const ModSet& mods, int gqa_group = 1) {
  return jit::get_kernels({{prefill_spec(gqa_group), &mods}, {mods_spec(), &mods}});
}

// The ALiBi score_mod as user text (parsed, with its slopes buffer), optionally plus a constant
// so that the mod IR, hence the cache key, is new: `score + slopes[...] ... + 1.000000e-06`.
struct AlibiMod {
  OwnedTensor slopes = OwnedTensor::make("slopes", DType::F32, {kHeads});
  TracedMod traced;
  ModSet mods;
  ModBindings bind;

  explicit AlibiMod(long unique = 0) {
    for (int64_t h = 0; h < kHeads; ++h) slopes.data<float>()[h] = float(std::exp2(-(h + 1.0)));
    std::string text = kAlibiText;
    if (unique) {
      char c[32];
      std::snprintf(c, sizeof c, " + %.6e", 1e-6 * double(unique));
      text += c;
    }
    traced = parse_mod(text, ModKind::Score, {slopes}, {});
    auto [m, b] = combine(&traced, nullptr);
    mods = std::move(m);
    bind = std::move(b);
  }
};

long next_unique() {
  static long n = 0;
  return ++n;
}

// ---- cold: keys never seen, through the pipeline the runtime calls ----

// new_shape: each iteration also asks for an attention kernel never seen (a new GQA group).
void bm_cold(benchmark::State& state, bool new_shape) {
  try {
    // The first compile of a process also pays one-time set-up (LLVM target init, the LLJIT;
    // host detection already ran for the context): measured once, reported apart, and the timed
    // compiles are the steady state.
    static const double first_ms = [&] {
      AlibiMod first(next_unique());
      auto t0 = Clock::now();
      std::vector<jit::KernelHandle> h = get_call_kernels(first.mods);
      if (h[1].cache != "miss") throw Error("the first compile was not a cache miss: " + h[1].cache);
      return ms_since(t0);
    }();
    state.counters["first_in_process_ms"] = first_ms;
    static int next_group = 1000;
    double mods_ms = 0, attention_ms = 0;
    for (auto _ : state) {
      AlibiMod mod(next_unique());  // parse: not timed
      const int group = new_shape ? ++next_group : 1;
      auto t0 = Clock::now();
      std::vector<jit::KernelHandle> h = get_call_kernels(mod.mods, group);
      state.SetIterationTime(ms_since(t0) / 1e3);
      if (h[1].cache != "miss" || (h[0].cache == "miss") != new_shape) {
        state.SkipWithError(("unexpected cache states: attention " + h[0].cache + ", mods " + h[1].cache).c_str());
        return;
      }
      mods_ms += h[1].compile_ms;
      attention_ms += h[0].compile_ms;
    }
    using benchmark::Counter;
    state.counters["mods_compile_ms"] = Counter(mods_ms, Counter::kAvgIterations);
    if (new_shape) state.counters["attention_compile_ms"] = Counter(attention_ms, Counter::kAvgIterations);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_cold_stages(benchmark::State& state, jit::KernelKind kind) {
  try {
    static int next_group = 5000;
    double source = 0, frontend = 0, optimize = 0, codegen = 0, load = 0, object_kb = 0;
    for (auto _ : state) {
      AlibiMod mod(next_unique());
      const jit::KernelSpec spec = kind == jit::KernelKind::Mods ? mods_spec() : prefill_spec(++next_group);
      auto t0 = Clock::now();
      jit::Instantiation inst = jit::plan(spec, mod.mods);
      std::string src = jit::make_source(spec, mod.mods, inst.symbol);
      source += ms_since(t0);
      jit::CompileResult r = jit::compile_cpp_to_object(src, inst.symbol + ".cpp");
      auto t1 = Clock::now();
      void* fn = jit::load_object(r.object, inst.symbol);
      load += ms_since(t1);
      state.SetIterationTime(ms_since(t0) / 1e3);
      benchmark::DoNotOptimize(fn);
      frontend += r.frontend_ms;
      optimize += r.optimize_ms;
      codegen += r.codegen_ms;
      object_kb += double(r.object.size()) / 1024.0;
    }
    using benchmark::Counter;
    state.counters["plan_source_ms"] = Counter(source, Counter::kAvgIterations);
    state.counters["frontend_ms"] = Counter(frontend, Counter::kAvgIterations);
    state.counters["optimize_ms"] = Counter(optimize, Counter::kAvgIterations);
    state.counters["codegen_ms"] = Counter(codegen, Counter::kAvgIterations);
    state.counters["load_ms"] = Counter(load, Counter::kAvgIterations);
    state.counters["object_KiB"] = Counter(object_kb, Counter::kAvgIterations);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- memory hit: a repeat call ----

void bm_memory_hit(benchmark::State& state) {
  try {
    AlibiMod mod;
    get_call_kernels(mod.mods);  // compile (or load) once
    double lookup_us = 0;
    for (auto _ : state) {
      std::vector<jit::KernelHandle> h = get_call_kernels(mod.mods);
      benchmark::DoNotOptimize(h[1].fn);
      lookup_us += h[1].lookup_us;
    }
    state.counters["lookup_us"] = benchmark::Counter(lookup_us, benchmark::Counter::kAvgIterations);
    state.counters["target_us"] = 20;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_memory_hit_call(benchmark::State& state) {
  try {
    AlibiMod mod;
    OwnedTensor q = OwnedTensor::make("q", DType::F32, {1, kHeads, 1, kHeadDim});
    OwnedTensor out = OwnedTensor::make("out", DType::F32, {1, kHeads, 1, kHeadDim});
    fill_random(q.view, 1);
    AttentionReport rep;
    flex_attention(q.view, q.view, q.view, out.view, nullptr, mod.mods, mod.bind);
    for (auto _ : state) {
      flex_attention(q.view, q.view, q.view, out.view, nullptr, mod.mods, mod.bind, nullptr, {},
                     &rep);
    }
    if (rep.cache != "memory") {
      state.SkipWithError("expected memory hits");
      return;
    }
    state.counters["last_lookup_us"] = rep.lookup_us;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- disk hit: in this process, and in a new one ----

void bm_disk_hit_load(benchmark::State& state) {
  try {
    AlibiMod mod;
    get_call_kernels(mod.mods);  // makes sure both entries are on disk
    const jit::Instantiation insts[2] = {jit::plan(prefill_spec(), mod.mods), jit::plan(mods_spec(), mod.mods)};
    const std::string dir = jit::KernelCache::global().dir();
    double load_ms = 0;
    for (auto _ : state) {
      // A fresh cache has an empty memory level: the lookup reads the disk. Each load adds a
      // JITDylib to the process-wide LLJIT (~25 KB); a few dozen are harmless.
      jit::KernelCache cache(dir);
      auto t0 = Clock::now();
      for (const jit::Instantiation& inst : insts) {
        jit::CachedKernel ck = cache.get_or_compile(inst.key, inst.symbol, [&]() -> std::string {
          throw Error("disk_hit_load: the warm cache entry was not found; nothing should compile");
        });
        if (ck.hit != jit::CacheHit::Disk) {
          state.SkipWithError("expected a disk hit");
          return;
        }
        load_ms += ck.load_ms;
      }
      state.SetIterationTime(ms_since(t0) / 1e3);
    }
    state.counters["load_ms"] = benchmark::Counter(load_ms, benchmark::Counter::kAvgIterations);
    state.counters["target_ms"] = 30;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// Child mode: the first get_kernel of a new process, from the warm FLEXJIT_CACHE_DIR it
// inherits. Prints one line as soon as the kernel is callable; the parent stops its clock there.
int disk_hit_child() {
  auto t0 = Clock::now();
  try {
    AlibiMod mod;
    std::vector<jit::KernelHandle> h = get_call_kernels(mod.mods);
    const bool disk = h[0].cache == "disk" && h[1].cache == "disk";
    std::printf("cache=%s load_ms=%.4f main_to_kernel_ms=%.4f\n", disk ? "disk" : "not-disk",
                h[0].load_ms + h[1].load_ms, ms_since(t0));
    std::fflush(stdout);
    return disk ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("error=%s\n", e.what());
    return 2;
  }
}

struct Spawned {
  double ms = 0;      // spawn -> first line read (first_line_only) or -> exit
  std::string out;    // what it printed (the first line only, if first_line_only)
  std::string error;  // set when it could not start or did not exit with 0
};

// Runs `args` (args[0] a path) with this process's environment and stdout on a pipe.
Spawned spawn_and_read(const std::vector<std::string>& args, bool first_line_only) {
  Spawned r;
  int fds[2];
  if (pipe(fds) != 0) {
    r.error = "pipe failed";
    return r;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&fa, fds[0]);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  auto t0 = Clock::now();
  int rc = posix_spawn(&pid, args[0].c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    r.error = "cannot start " + args[0] + ": " + std::strerror(rc);
    return r;
  }
  char c;
  while (read(fds[0], &c, 1) == 1 && !(first_line_only && c == '\n')) r.out += c;
  if (first_line_only) r.ms = ms_since(t0);
  close(fds[0]);  // a child still writing gets SIGPIPE only after its line: it has none left
  int status = 0;
  waitpid(pid, &status, 0);
  if (!first_line_only) r.ms = ms_since(t0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    r.error = args[0] + " failed (wait status " + std::to_string(status) + "): " + r.out;
  return r;
}

std::string self_exe() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, size_t(n)) : std::string();
}

// This binary links whatever bench/CMakeLists.txt gives every benchmark (libtorch included when
// FLEXJIT_WITH_TORCH is on), so exec_to_main_ms is mostly dynamic loading of those libraries;
// main_to_kernel_ms and load_ms are flexjit's own part.
void bm_disk_hit_process(benchmark::State& state) {
  try {
    AlibiMod mod;
    get_call_kernels(mod.mods);  // the entries the children load
    const std::vector<std::string> args = {self_exe(), "--disk-hit-child"};
    double load = 0, main_to_kernel = 0, exec_to_main = 0;
    for (auto _ : state) {
      Spawned r = spawn_and_read(args, /*first_line_only=*/true);
      double load_ms = 0, main_ms = 0;
      if (r.error.empty() &&
          std::sscanf(r.out.c_str(), "cache=disk load_ms=%lf main_to_kernel_ms=%lf", &load_ms,
                      &main_ms) != 2)
        r.error = "the child did not report a disk hit: " + r.out;
      if (!r.error.empty()) {
        state.SkipWithError(r.error.c_str());
        return;
      }
      state.SetIterationTime(r.ms / 1e3);
      load += load_ms;
      main_to_kernel += main_ms;
      exec_to_main += r.ms - main_ms;
    }
    using benchmark::Counter;
    state.counters["load_ms"] = Counter(load, Counter::kAvgIterations);
    state.counters["main_to_kernel_ms"] = Counter(main_to_kernel, Counter::kAvgIterations);
    state.counters["exec_to_main_ms"] = Counter(exec_to_main, Counter::kAvgIterations);
    state.counters["target_load_ms"] = 30;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// A float32 .npy file (format 1.0) of `shape`, filled with 0.5: the CLI's inputs.
void write_npy(const std::string& path, const std::vector<int64_t>& shape) {
  std::string dims;
  int64_t n = 1;
  for (int64_t d : shape) {
    dims += std::to_string(d) + ", ";
    n *= d;
  }
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // pad so data starts 64-byte aligned
  header += '\n';
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw Error("compile_bench: cannot write " + path);
  const unsigned char magic[] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  const uint16_t len = uint16_t(header.size());  // little-endian host
  std::fwrite(magic, 1, sizeof magic, f);
  std::fwrite(&len, 2, 1, f);
  std::fwrite(header.data(), 1, header.size(), f);
  std::vector<float> data(size_t(n), 0.5f);
  std::fwrite(data.data(), 4, data.size(), f);
  std::fclose(f);
}

// What a user without torch sees: `flexjit run` (the CLI, which links no libtorch) on a tiny
// call with the registered ALiBi mod, spawn to exit, its kernel from the warm disk cache (the
// first, untimed run puts it there). The run itself (L=1) and the .npy I/O take well under 1 ms.
void bm_disk_hit_process_cli(benchmark::State& state) {
  try {
    std::string bench_dir = self_exe();
    bench_dir = bench_dir.substr(0, bench_dir.find_last_of('/'));
    const std::string cli = bench_dir + "/../flexjit";
    if (access(cli.c_str(), X_OK) != 0) {
      state.SkipWithError(("no CLI at " + cli + ": build the flexjit target").c_str());
      return;
    }
    const std::string dir = jit::KernelCache::global().dir();
    write_npy(dir + "/bench_q.npy", {1, kHeads, 1, kHeadDim});
    const std::vector<std::string> args = {cli,           "run",
                                           "--q",         dir + "/bench_q.npy",
                                           "--k",         dir + "/bench_q.npy",
                                           "--v",         dir + "/bench_q.npy",
                                           "--out",       dir + "/bench_out.npy",
                                           "--score-mod", "alibi",
                                           "--report",    dir + "/bench_report.json"};
    Spawned warm = spawn_and_read(args, false);
    if (!warm.error.empty()) {
      state.SkipWithError(warm.error.c_str());
      return;
    }
    double load = 0;
    for (auto _ : state) {
      Spawned r = spawn_and_read(args, false);
      std::ifstream f(dir + "/bench_report.json");
      std::string report((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      size_t at = report.find("\"load_ms\":");
      if (r.error.empty() &&
          (report.find("\"cache\": \"disk\"") == std::string::npos || at == std::string::npos))
        r.error = "the CLI did not report a disk hit: " + report;
      if (!r.error.empty()) {
        state.SkipWithError(r.error.c_str());
        return;
      }
      state.SetIterationTime(r.ms / 1e3);
      load += std::strtod(report.c_str() + at + 10, nullptr);
    }
    state.counters["load_ms"] = benchmark::Counter(load, benchmark::Counter::kAvgIterations);
    state.counters["target_load_ms"] = 30;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- BlockMask ----

void bm_block_mask_causal_128k(benchmark::State& state) {
  try {
    constexpr int64_t kL = 131072;
    TracedMod causal = find_mod("causal").mod;
    auto [mods, bind] = combine(nullptr, &causal);
    runtime::create_block_mask(mods, bind, 1, 1, kL, kL);  // the mods kernel: compiled here
    runtime::BlockMask m;
    runtime::BlockMaskBuildStats st;
    for (auto _ : state) m = runtime::create_block_mask(mods, bind, 1, 1, kL, kL, 128, 128, &st);
    state.counters["bytes"] = double(m.bytes());
    state.counters["MiB"] = double(m.bytes()) / (1 << 20);
    state.counters["density"] = m.density();
    state.counters["decided_by_interval"] = double(st.decided_by_interval);
    state.counters["evaluated"] = double(st.evaluated);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void register_all() {
  const std::string p = "compile/fp32/D" + std::to_string(kHeadDim) + "/alibi/";
  using benchmark::RegisterBenchmark;
  RegisterBenchmark((p + "cold_new_mod").c_str(), bm_cold, false)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(10);
  RegisterBenchmark((p + "cold_new_shape").c_str(), bm_cold, true)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(5);
  RegisterBenchmark((p + "cold_stages_mods").c_str(), bm_cold_stages, jit::KernelKind::Mods)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(10);
  RegisterBenchmark((p + "cold_stages_attention").c_str(), bm_cold_stages, jit::KernelKind::Prefill)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(5);
  RegisterBenchmark((p + "memory_hit").c_str(), bm_memory_hit)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark((p + "memory_hit_call_L1").c_str(), bm_memory_hit_call)
      ->Unit(benchmark::kMicrosecond)
      ->UseRealTime();
  RegisterBenchmark((p + "disk_hit_load").c_str(), bm_disk_hit_load)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(20);
  RegisterBenchmark((p + "disk_hit_process").c_str(), bm_disk_hit_process)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(10);
  RegisterBenchmark((p + "disk_hit_process_cli").c_str(), bm_disk_hit_process_cli)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->Iterations(10);
  RegisterBenchmark("blockmask/causal/L131072/build", bm_block_mask_causal_128k)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

}  // namespace
}  // namespace flexjit::bench

int main(int argc, char** argv) {
  using namespace flexjit::bench;
  if (argc == 2 && std::strcmp(argv[1], "--disk-hit-child") == 0) return disk_hit_child();

  // A private cache directory, set before anything asks for KernelCache::global(): cold
  // compiles stay cold and the user's cache is neither used nor filled.
  char dir[] = "/tmp/flexjit-compile-bench-XXXXXX";
  if (!mkdtemp(dir)) {
    std::perror("compile_bench: mkdtemp");
    return 1;
  }
  setenv("FLEXJIT_CACHE_DIR", dir, 1);
  setenv("FLEXJIT_PREBUILT_DIR", "off", 1);  // nor the build's prebuilt kernels

  add_context(__FILE__, int(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("flexjit_cache_dir", dir);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return 0;
}

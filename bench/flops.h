// What the benchmark numbers mean: the FLOP and byte formulas every flexjit benchmark reports
// with, the machine ceilings they are compared to, and the run context (git SHA, CPU, threads,
// LLVM) written into each JSON file. One place, so a rate in one benchmark means the same thing
// as a rate in another and the report script can compare them.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "jit/compile.h"

namespace flexjit::bench {

// ---- machine ceilings (shared/TOOLCHAIN.md, 2-core VM) ----

// fp32 AVX-512 FMA peak: ~135 GFLOP/s per core. The "% of ceiling" counters use the 2-core
// figure for every dtype, so fp32 and bf16 runs are read against the same yardstick.
constexpr double kFp32PeakGflopsPerCore = 135.0;
constexpr double kFp32PeakGflops2Cores = 2 * kFp32PeakGflopsPerCore;  // 270
// DRAM read bandwidth with 2 cores reading, for the memory-bound decode path.
constexpr double kDramReadGBps2Cores = 19.5;

// ---- prefill (forward attention over the full Lq x Lkv score matrix) ----

// Dense FLOPs of one attention forward: S = Q K^T is B*Hq*Lq*Lkv dot products of length D
// (2*D FLOPs each: a multiply and an add), O = P V is B*Hq*Lq*Dv dot products of length Lkv
// (2*Lkv FLOPs each). Together 2 * B * Hq * Lq * Lkv * (D + Dv), i.e. 4 * B*Hq*Lq*Lkv*D when
// Dv == D. Softmax, scaling and the score/mask mods are not counted (O(Lq*Lkv), not
// O(Lq*Lkv*D)): the convention of FlashAttention and PyTorch's FlexAttention benchmarks.
// GQA does not change the count (every query head still does its own products).
inline double prefill_flops(int64_t B, int64_t Hq, int64_t Lq, int64_t Lkv, int64_t D, int64_t Dv) {
  return 2.0 * double(B) * double(Hq) * double(Lq) * double(Lkv) * double(D + Dv);
}

// "Effective" FLOPs: only the work inside visited (not fully masked) blocks counts, so a causal
// or sparse run is not credited with products it rightly skips. `density` is
// BlockMask::density() (visited blocks / all blocks; 1 without a mask). With 128 x 128 blocks a
// causal mask at L = 1024 visits 36 of 64 blocks (density 0.5625), at L = 8192 0.5039; the
// diagonal blocks count whole although half of each is masked, as in FlexAttention's own
// benchmarks. Baselines of the same case are credited with the same effective count, so a rate
// ratio between implementations is exactly their time ratio.
inline double prefill_effective_flops(int64_t B, int64_t Hq, int64_t Lq, int64_t Lkv, int64_t D,
                                      int64_t Dv, double density) {
  return prefill_flops(B, Hq, Lq, Lkv, D, Dv) * density;
}

// ---- decode (one or a few query rows against a long KV cache: memory bound) ----

// Bytes a decode step must move at least: K and V of every visited KV position once (each KV
// head is shared by its GQA group, so Hkv, not Hq), plus Q and O (small). `elem` is the dtype
// size in bytes; `density` as above. Rate = bytes / time, compared with kDramReadGBps2Cores.
inline double decode_bytes(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lkv, int64_t D,
                           int64_t Dv, int elem, double density = 1.0) {
  const double kv = double(B) * double(Hkv) * double(Lkv) * double(D + Dv) * density;
  const double qo = double(B) * double(Hq) * double(Lq) * double(D + Dv);
  return (kv + qo) * double(elem);
}

// ---- counters ----

// GFLOP/s and % of the 2-core fp32 ceiling for a benchmark whose every iteration does
// `flops` FLOPs. Rates are over wall time (benchmarks use UseRealTime()).
inline void set_flop_counters(benchmark::State& state, double flops) {
  using benchmark::Counter;
  state.counters["GFLOP/s"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["pct_of_ceiling"] =
      Counter(flops * 1e-9 / kFp32PeakGflops2Cores * 100.0, Counter::kIsIterationInvariantRate);
  state.counters["GFLOP"] = Counter(flops * 1e-9);
}

// ---- run context (benchmark::AddCustomContext, lands in the JSON "context") ----

namespace detail {

inline std::string first_line_of_command(const std::string& cmd) {
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[512];
    if (fgets(buf, sizeof buf, p)) out = buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

// The value of "name=" in compiler_identity()'s ';'-separated fields ("" if absent).
inline std::string identity_field(const std::string& name) {
  const std::string& id = jit::compiler_identity();
  std::string tag = ";" + name + "=";
  size_t at = id.find(tag);
  if (at == std::string::npos) return "";
  at += tag.size();
  return id.substr(at, id.find(';', at) - at);
}

}  // namespace detail

// Records git SHA (with "-dirty" when the tree has changes), CPU model, thread count, LLVM
// version and the CPU name LLVM targets. `source_file` is a file inside the repository
// (pass __FILE__) so the SHA is found whatever the working directory.
inline void add_context(const char* source_file, int threads) {
  std::string dir = source_file;
  dir = dir.substr(0, dir.find_last_of('/') + 1) + ".";
  std::string git = "git -C '" + dir + "' ";
  std::string sha = detail::first_line_of_command(git + "rev-parse --short HEAD 2>/dev/null");
  if (sha.empty()) sha = "unknown";
  if (!detail::first_line_of_command(git + "status --porcelain --untracked-files=no 2>/dev/null")
           .empty())
    sha += "-dirty";
  std::string cpu = "unknown";
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  benchmark::AddCustomContext("flexjit_git_sha", sha);
  benchmark::AddCustomContext("flexjit_cpu_model", cpu);
  benchmark::AddCustomContext("flexjit_hardware_threads",
                              std::to_string(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("flexjit_threads", std::to_string(threads));
  benchmark::AddCustomContext("flexjit_llvm", detail::identity_field("llvm"));
  benchmark::AddCustomContext("flexjit_llvm_cpu", detail::identity_field("cpu"));
  benchmark::AddCustomContext("flexjit_device", "cpu");
  benchmark::AddCustomContext("flexjit_fp32_ceiling_gflops",
                              std::to_string(int(kFp32PeakGflops2Cores)));
}

// Removes --threads=N from argv (Google Benchmark rejects flags it does not know) and returns N
// (0 when absent: all hardware threads).
inline int take_threads_flag(int* argc, char** argv) {
  int threads = 0, out = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::string(argv[i]).rfind("--threads=", 0) == 0)
      threads = std::atoi(argv[i] + 10);
    else
      argv[out++] = argv[i];
  }
  *argc = out;
  return threads;
}

}  // namespace flexjit::bench

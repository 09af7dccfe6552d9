// LABELS: errors slow
// The `flexjit run` (contiguous and paged KV) and `flexjit tune` commands end to end: .npy files in, .npy files and a JSON report out, the
// output checked against flexjit's float64 reference on the same inputs; and bad input, which
// must exit non-zero (never by a signal) with a `flexjit: error: ...` line naming the problem,
// leaving no partial output behind.
#include <fcntl.h>
#include <gtest/gtest.h>

#include "jit/nvrtc.h"
#include "runtime/cuda_driver.h"

#include <algorithm>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "jit/parser.h"
#include "runtime/attention.h"
#include "runtime/reference.h"
#include "runtime/varlen.h"
#include "score_mods/registry.h"
#include "tests/tolerances.h"

extern char** environ;

namespace flexjit {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- .npy files

void write_npy(const fs::path& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t bytes, bool fortran = false) {
  std::string shp = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    shp += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
  shp += ")";
  std::string header = "{'descr': '" + descr +
                       "', 'fortran_order': " + std::string(fortran ? "True" : "False") +
                       ", 'shape': " + shp + ", }";
  header += std::string(63 - (10 + header.size()) % 64, ' ') + "\n";
  std::ofstream f(path, std::ios::binary);
  const char pre[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(pre, 8);
  uint16_t n = uint16_t(header.size());
  f.write(reinterpret_cast<const char*>(&n), 2);
  f << header;
  f.write(static_cast<const char*>(data), std::streamsize(bytes));
}

void write_f32(const fs::path& path, const OwnedTensor& t) {
  ASSERT_EQ(t.view.dtype, DType::F32);
  write_npy(path, "<f4", std::vector<int64_t>(t.view.sizes, t.view.sizes + t.view.rank),
            t.bytes->data(), t.bytes->size());
}

struct Npy {
  std::string descr;
  std::vector<int64_t> shape;
  std::vector<float> data;  // when descr is <f4
};

Npy read_npy(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Npy r;
  if (all.size() < 10 || all.compare(0, 6, "\x93NUMPY") != 0) return r;
  size_t hlen = uint8_t(all[8]) | (uint8_t(all[9]) << 8);
  std::string h = all.substr(10, hlen);
  size_t d = h.find("'descr': '");
  r.descr = h.substr(d + 10, h.find('\'', d + 10) - d - 10);
  size_t s = h.find("'shape': (") + 10;
  std::stringstream ss(h.substr(s, h.find(')', s) - s));
  std::string item;
  while (std::getline(ss, item, ','))
    if (item.find_first_not_of(' ') != std::string::npos) r.shape.push_back(std::stoll(item));
  if (r.descr == "<f4") {
    r.data.resize((all.size() - 10 - hlen) / 4);
    std::memcpy(r.data.data(), all.data() + 10 + hlen, r.data.size() * 4);
  }
  return r;
}

OwnedTensor random_f32(const std::string& name, std::vector<int64_t> sizes, uint64_t seed) {
  OwnedTensor t = OwnedTensor::make(name, DType::F32, std::move(sizes));
  fill_random(t.view, seed);
  return t;
}

// ---------------------------------------------------------------- running the binary

fs::path find_flexjit() {
  std::vector<fs::path> candidates;
  std::error_code ec;
  fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    candidates.push_back(self.parent_path().parent_path() /
                         "flexjit");                     // build/tests/x -> build/flexjit
  candidates.push_back(fs::current_path() / "flexjit");  // ctest runs in the build dir
  candidates.push_back(fs::current_path() / "build" / "flexjit");
  for (const auto& c : candidates)
    if (fs::exists(c) && ::access(c.c_str(), X_OK) == 0) return c;
  return {};
}

struct Result {
  bool exited = false;  // false: killed by a signal
  int code = -1;
  int signal = 0;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Environment variables a test sets for its child processes, restored (or unset again) when the
// test ends, an early ASSERT return included.
class ScopedEnv {
 public:
  ScopedEnv() = default;
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->was_set) ::setenv(it->name.c_str(), it->value.c_str(), 1);
      else ::unsetenv(it->name.c_str());
    }
  }
  void set(const std::string& name, const std::string& value) {
    save(name);
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  void unset(const std::string& name) {
    save(name);
    ::unsetenv(name.c_str());
  }

 private:
  struct Saved {
    std::string name;
    bool was_set;
    std::string value;
  };
  void save(const std::string& name) {
    for (const auto& s : saved_)
      if (s.name == name) return;  // the first value is the one to restore
    const char* v = std::getenv(name.c_str());
    saved_.push_back({name, v != nullptr, v ? v : ""});
  }
  std::vector<Saved> saved_;
};

// A paged decode call (Cli::write_paged_case writes its files): q [2, 6, 2, D], caches of 12 pages
// of 16 keys (Hkv 2) whose pages no sequence uses hold NaN, a shuffled block table, lengths {70, 20}.
struct PagedCase {
  static constexpr int64_t B = 2, Hq = 6, Hkv = 2, ps = 16, pages = 12, max_pages = 6;
  static constexpr int32_t table[B * max_pages] = {7, 2, 9, 0, 11, -1, 4, 1, -1, -1, -1, -1};
  static constexpr int32_t lens[B] = {70, 20};
  int64_t D = 0;
  OwnedTensor q, kc, vc;
  std::vector<std::string> args;
};

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    exe_ = find_flexjit();
    if (exe_.empty()) GTEST_SKIP() << "build/flexjit not found (build the `flexjit` target)";
    dir_ = fs::temp_directory_path() /
           ("flexjit_cli_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    if (!std::getenv("FLEXJIT_CACHE_DIR"))
      ::setenv("FLEXJIT_CACHE_DIR", (fs::temp_directory_path() / "fj-tests-cache").c_str(), 0);
  }
  void TearDown() override {
    if (!dir_.empty() && !std::getenv("FLEXJIT_KEEP_TEST_FILES")) fs::remove_all(dir_);
  }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  Result run(const std::vector<std::string>& args) { return run_sub("run", args); }

  Result run_sub(const std::string& subcommand, const std::vector<std::string>& args) {
    return wait_sub(start_sub(subcommand, args, "std"), "std");
  }

  // Starts `flexjit <subcommand> args...` without waiting; its stdout and stderr go to
  // <tag>out.txt / <tag>err.txt in the temp dir. -1 when it could not start.
  pid_t start_sub(const std::string& subcommand, const std::vector<std::string>& args, const std::string& tag) {
    std::vector<std::string> argv_s = {via_path_ ? exe_.filename().string() : exe_.string(), subcommand};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::string out = path(tag + "out.txt"), err = path(tag + "err.txt");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addchdir_np(&fa, dir_.c_str());
    pid_t pid = 0;
    // via_path_: spawned as a bare name found on PATH (argv[0] without a directory).
    int rc = via_path_ ? posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ)
                       : posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      ADD_FAILURE() << "posix_spawn failed: " << std::strerror(rc);
      return -1;
    }
    return pid;
  }

  Result wait_sub(pid_t pid, const std::string& tag) {
    Result r;
    if (pid < 0) return r;
    int status = 0;
    waitpid(pid, &status, 0);
    r.exited = WIFEXITED(status);
    r.code = r.exited ? WEXITSTATUS(status) : -1;
    r.signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    std::string out = path(tag + "out.txt"), err = path(tag + "err.txt");
    r.out = slurp(out);
    r.err = slurp(err);
    fs::remove(out);
    fs::remove(err);
    return r;
  }

  // Writes q, k, v as float32 .npy files in the temp dir.
  void write_qkv(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v) {
    write_f32(dir_ / "q.npy", q);
    write_f32(dir_ / "k.npy", k);
    write_f32(dir_ / "v.npy", v);
  }
  std::vector<std::string> qkv_args(const std::string& out = "O.npy") {
    return {"--q", path("q.npy"), "--k", path("k.npy"), "--v", path("v.npy"), "--out", path(out)};
  }

  // Every file in the temp dir other than the inputs.
  std::vector<std::string> outputs() const {
    std::vector<std::string> r;
    for (const auto& e : fs::directory_iterator(dir_)) {
      std::string n = e.path().filename().string();
      if (n != "q.npy" && n != "k.npy" && n != "v.npy" && n.rfind("in_", 0) != 0) r.push_back(n);
    }
    return r;
  }

  // Writes a PagedCase's files (q.npy, kc.npy, vc.npy, bt.npy, sl.npy); its `args` are the CLI's
  // paged inputs and --out O.npy.
  PagedCase write_paged_case(int64_t D, uint64_t seed) {
    PagedCase c;
    c.D = D;
    c.q = random_f32("q", {c.B, c.Hq, 2, D}, seed);
    c.kc = random_f32("kc", {c.pages, c.ps, c.Hkv, D}, seed + 1);
    c.vc = random_f32("vc", {c.pages, c.ps, c.Hkv, D}, seed + 2);
    for (int64_t p : {3, 5, 6, 8, 10})
      for (int64_t i = 0; i < c.ps * c.Hkv * D; ++i) c.kc.data<float>()[p * c.ps * c.Hkv * D + i] = std::nanf("");
    write_f32(dir_ / "q.npy", c.q);
    write_f32(dir_ / "kc.npy", c.kc);
    write_f32(dir_ / "vc.npy", c.vc);
    write_npy(dir_ / "bt.npy", "<i4", {c.B, c.max_pages}, PagedCase::table, sizeof PagedCase::table);
    write_npy(dir_ / "sl.npy", "<i4", {c.B}, PagedCase::lens, sizeof PagedCase::lens);
    c.args = {"--q", path("q.npy"), "--k-cache", path("kc.npy"), "--v-cache", path("vc.npy"), "--block-table",
              path("bt.npy"), "--seq-lens", path("sl.npy"), "--out", path("O.npy"), "--enable-gqa"};
    return c;
  }
  fs::path exe_, dir_;
  bool via_path_ = false;
};

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Rounds an fp32 tensor to bf16 (round to nearest even), as `--dtype bf16` does.
OwnedTensor to_bf16(const OwnedTensor& t) {
  OwnedTensor o = OwnedTensor::make(t.name, DType::BF16,
                                    std::vector<int64_t>(t.view.sizes, t.view.sizes + t.view.rank));
  for (int64_t i = 0; i < t.view.numel(); ++i) {
    uint32_t u;
    std::memcpy(&u, &static_cast<const float*>(t.view.data)[i], 4);
    u += 0x7fff + ((u >> 16) & 1);
    o.data<uint16_t>()[i] = uint16_t(u >> 16);
  }
  return o;
}

// Compares a CLI output file with the float64 reference, elementwise and in the mean.
void expect_matches(const Npy& got, const RefResult& ref, DType dtype, const std::string& what) {
  ASSERT_EQ(got.data.size(), ref.out.size()) << what;
  auto tol = testing::output_tolerance(dtype);
  int bad = 0;
  for (size_t i = 0; i < got.data.size(); ++i) {
    double g = ref.out[i];
    if (std::fabs(got.data[i] - g) > tol.atol + tol.rtol * std::fabs(g) && ++bad <= 5)
      ADD_FAILURE() << what << ": out[" << i << "] = " << got.data[i] << ", reference " << g;
  }
  EXPECT_EQ(bad, 0) << what;
}

// A PagedCase's float64 reference with alibi + causal (the CLI's example slopes), absolute positions; on
// bf16-rounded inputs for a bf16 run.
RefResult paged_reference(const PagedCase& c, bool bf16) {
  OwnedTensor bt = OwnedTensor::make("bt", DType::I32, {c.B, c.max_pages}), sl = OwnedTensor::make("sl", DType::I32, {c.B});
  std::memcpy(bt.bytes->data(), PagedCase::table, sizeof PagedCase::table);
  std::memcpy(sl.bytes->data(), PagedCase::lens, sizeof PagedCase::lens);
  ShapeInfo shape{c.B, c.Hq, c.Hkv, 70, 70};
  std::vector<OwnedTensor> storage;
  TracedMod sm = instantiate_example(find_mod("alibi"), shape, &storage);
  TracedMod mm = instantiate_example(find_mod("causal"), shape, &storage);
  auto [mods, bind] = combine(&sm, &mm);
  const OwnedTensor q = bf16 ? to_bf16(c.q) : c.q, kc = bf16 ? to_bf16(c.kc) : c.kc, vc = bf16 ? to_bf16(c.vc) : c.vc;
  return reference_paged_attention(q.view, kc.view, vc.view, bt.view, sl.view, mods, bind,
                                   1.0 / std::sqrt(double(c.D)));
}

// A failed run: exited (no signal) non-zero, stderr one line starting "flexjit: error: " (a
// parse error may add its text and caret lines), the first line containing every substring.
void expect_error_line(const Result& r, const std::vector<std::string>& substrings,
                       bool multi_line_ok = false) {
  EXPECT_TRUE(r.exited) << "killed by signal " << r.signal << "\n" << r.err;
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_EQ(r.err.rfind("flexjit: error: ", 0), 0u) << r.err;
  std::string first = r.err.substr(0, r.err.find('\n'));
  if (!multi_line_ok) {
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "want one line:\n" << r.err;
  }
  for (const auto& s : substrings)
    EXPECT_NE(first.find(s), std::string::npos) << "want '" << s << "' in: " << first;
}

// ---------------------------------------------------------------- runs

// `flexjit bench`: the compare_torch suite's C++ side; a quick two-case run checked end to end.
TEST_F(Cli, BenchQuickWritesJsonAndChecksResults) {
  Result list = run_sub("bench", {"--list"});
  ASSERT_EQ(list.code, 0) << list.err;
  EXPECT_NE(list.out.find("prefill/fp32/noop\n"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("decode/bf16/prefix_lm\n"), std::string::npos) << list.out;
  EXPECT_EQ(std::count(list.out.begin(), list.out.end(), '\n'), 28) << list.out;

  Result r = run_sub("bench", {"--quick", "--reps", "1", "--filter", "prefill/fp32/alibi,decode/bf16/document",
                               "--json", path("b.json")});
  ASSERT_TRUE(r.exited) << "signal " << r.signal << "\n" << r.err;
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "b.json"));
  ASSERT_EQ(j["cases"].size(), 2u) << j.dump(2);
  for (const auto& c : j["cases"]) {
    for (const char* field : {"name", "first_call_ms", "first_call_cache", "median_ms", "samples_ms", "gflops",
                              "gbps", "max_abs_err", "ok", "knobs"})
      EXPECT_TRUE(c.contains(field)) << field << " missing from\n" << c.dump(2);
    EXPECT_TRUE(c.value("ok", false)) << c.dump(2);
    EXPECT_GT(c.value("median_ms", 0.0), 0.0);
    EXPECT_LT(c.value("max_abs_err", 1.0), c.value("tolerance", 0.0));
  }
  EXPECT_EQ(j["cases"][0]["name"], "prefill/fp32/alibi");
  EXPECT_EQ(j["cases"][1]["knobs"]["GQA_GROUP"], 2);

  Result bad = run_sub("bench", {"--filter", "nothing-matches"});
  EXPECT_EQ(bad.code, 2);
  EXPECT_NE(bad.err.find("matches no case"), std::string::npos) << bad.err;
}

TEST_F(Cli, AlibiCausalWithReportAndCheck) {
  OwnedTensor q = random_f32("q", {2, 3, 37, 40}, 1), k = random_f32("k", {2, 3, 45, 40}, 2),
              v = random_f32("v", {2, 3, 45, 24}, 3);
  write_qkv(q, k, v);
  Result r = run(qkv_args() + std::vector<std::string>{"--lse-out", path("L.npy"), "--score-mod",
                                                       "alibi", "--mask-mod", "causal", "--report",
                                                       path("r.json"), "--check"});
  ASSERT_TRUE(r.exited) << "signal " << r.signal << "\n" << r.err;
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("check vs float64 reference"), std::string::npos) << r.out;

  Npy o = read_npy(dir_ / "O.npy"), l = read_npy(dir_ / "L.npy");
  EXPECT_EQ(o.descr, "<f4");
  EXPECT_EQ(o.shape, (std::vector<int64_t>{2, 3, 37, 24}));
  EXPECT_EQ(l.descr, "<f4");
  EXPECT_EQ(l.shape, (std::vector<int64_t>{2, 3, 37}));

  nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
  for (const char* field : {"backend", "path", "compile_ms", "cache", "kernel_ms", "knobs"})
    EXPECT_TRUE(j.contains(field)) << field << " missing from\n" << j.dump(2);
  EXPECT_EQ(j.value("backend", ""), "cpu");
  EXPECT_EQ(j.value("path", ""), "prefill");
  EXPECT_TRUE(j["compile_ms"].is_number());
  EXPECT_TRUE(j["kernel_ms"].is_number());
  std::string cache = j.value("cache", "");
  EXPECT_TRUE(cache == "miss" || cache == "memory" || cache == "disk") << cache;
  EXPECT_EQ(j["knobs"]["HEAD_DIM"], 40);
  EXPECT_EQ(j["knobs"]["HEAD_DIM_V"], 24);
  EXPECT_TRUE(j["knobs"].contains("BLOCK_M"));
  EXPECT_TRUE(j["knobs"].contains("BLOCK_N"));
  EXPECT_EQ(j["knobs"].value("AMX", true), false);  // fp32: the FMA engine
  EXPECT_LT(j.value("check_max_abs_error", 1.0), 1e-4);
  EXPECT_TRUE(j.contains("block_mask"));

  // The same call through the float64 reference, with the same example slopes the CLI makes.
  ShapeInfo shape{2, 3, 3, 37, 45};
  std::vector<OwnedTensor> storage;
  TracedMod sm = instantiate_example(find_mod("alibi"), shape, &storage);
  TracedMod mm = instantiate_example(find_mod("causal"), shape, &storage);
  auto [mods, bind] = combine(&sm, &mm);
  RefResult ref = reference_attention(q.view, k.view, v.view, mods, bind, 1.0 / std::sqrt(40.0));
  expect_matches(o, ref, DType::F32, "alibi+causal");
  ASSERT_EQ(l.data.size(), ref.lse.size());
  for (size_t i = 0; i < ref.lse.size(); ++i)
    ASSERT_NEAR(l.data[i], ref.lse[i],
                testing::kLseTolerance.atol + testing::kLseTolerance.rtol * std::fabs(ref.lse[i]))
        << "lse[" << i << "]";
}

TEST_F(Cli, ExpressionModsWithBuffersAndParams) {
  const int64_t L = 50;
  OwnedTensor q = random_f32("q", {1, 2, L, 32}, 4), k = random_f32("k", {1, 2, L, 32}, 5),
              v = random_f32("v", {1, 2, L, 32}, 6);
  write_qkv(q, k, v);
  OwnedTensor bias = random_f32("bias", {L}, 7);
  write_f32(dir_ / "in_bias.npy", bias);
  OwnedTensor doc = OwnedTensor::make("doc", DType::I32, {L});
  for (int64_t i = 0; i < L; ++i) doc.data<int32_t>()[i] = int32_t(i / 13);
  write_npy(dir_ / "in_doc.npy", "<i4", {L}, doc.bytes->data(), doc.bytes->size());
  const std::string score = "score * w + bias[kv_idx] - float(abs(q_idx - kv_idx) % 3)";
  const std::string mask = "doc[q_idx] == doc[kv_idx] && kv_idx <= q_idx + lead";
  Result r =
      run(qkv_args() + std::vector<std::string>{"--score-mod", score, "--mask-mod", mask,
                                                "--buffer", "bias=" + path("in_bias.npy"),
                                                "--buffer", "doc=" + path("in_doc.npy"), "--param",
                                                "w=0.75", "--param", "lead=2", "--scale", "0.3"});
  ASSERT_TRUE(r.exited) << r.err;
  ASSERT_EQ(r.code, 0) << r.err;
  TracedMod sm = parse_mod(score, ModKind::Score, {bias, doc}, {{"w", 0.75}, {"lead", 2}});
  TracedMod mm = parse_mod(mask, ModKind::Mask, {bias, doc}, {{"w", 0.75}, {"lead", 2}});
  auto [mods, bind] = combine(&sm, &mm);
  RefResult ref = reference_attention(q.view, k.view, v.view, mods, bind, 0.3);
  expect_matches(read_npy(dir_ / "O.npy"), ref, DType::F32, "expression mods");

  // A different param value is a different result, from the same kernel.
  Result r2 =
      run(qkv_args("O2.npy") +
          std::vector<std::string>{"--score-mod", score, "--mask-mod", mask, "--buffer",
                                   "bias=" + path("in_bias.npy"), "--buffer",
                                   "doc=" + path("in_doc.npy"), "--param", "w=-1", "--param",
                                   "lead=0", "--scale", "0.3", "--report", path("r2.json")});
  ASSERT_EQ(r2.code, 0) << r2.err;
  EXPECT_NE(nlohmann::json::parse(slurp(dir_ / "r2.json")).value("cache", ""), "miss");
  TracedMod sm2 = parse_mod(score, ModKind::Score, {bias, doc}, {{"w", -1}, {"lead", 0}});
  TracedMod mm2 = parse_mod(mask, ModKind::Mask, {bias, doc}, {{"w", -1}, {"lead", 0}});
  auto [mods2, bind2] = combine(&sm2, &mm2);
  expect_matches(read_npy(dir_ / "O2.npy"),
                 reference_attention(q.view, k.view, v.view, mods2, bind2, 0.3), DType::F32,
                 "w=-1");
}

TEST_F(Cli, Bf16) {
  OwnedTensor q = random_f32("q", {1, 2, 33, 64}, 8), k = random_f32("k", {1, 2, 33, 64}, 9),
              v = random_f32("v", {1, 2, 33, 64}, 10);
  write_qkv(q, k, v);
  Result r =
      run(qkv_args() + std::vector<std::string>{"--dtype", "bf16", "--score-mod", "softcap",
                                                "--param", "cap=3", "--report", path("r.json")});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "r.json")).value("dtype", ""), "bf16");
  Npy o = read_npy(dir_ / "O.npy");
  EXPECT_EQ(o.descr, "<f4");  // output files are float32 whatever the compute dtype
  OwnedTensor qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
  TracedMod sm = find_mod("softcap").mod;
  sm.bindings.params = {{"cap", 3.0}};
  auto [mods, bind] = combine(&sm, nullptr);
  expect_matches(o, reference_attention(qb.view, kb.view, vb.view, mods, bind, 1.0 / 8.0),
                 DType::BF16, "bf16");
}

// FLEXJIT_CPU_TARGET compiles for another CPU: x86-64-v3 (which this host can always run: the
// tests need AVX2) gives the FMA engine for bf16 and says so in the report; a name LLVM does not
// know, or a target the host cannot run, is a clean error that names it, with no output file.
TEST_F(Cli, CpuTargetOverride) {
  OwnedTensor q = random_f32("q", {1, 2, 33, 40}, 8), k = random_f32("k", {1, 2, 33, 40}, 9),
              v = random_f32("v", {1, 2, 33, 40}, 10);
  write_qkv(q, k, v);
  ScopedEnv env;
  auto with_target = [&](const char* target, std::vector<std::string> extra) {
    env.set("FLEXJIT_CPU_TARGET", target);
    env.set("FLEXJIT_CACHE_DIR", path("cache"));
    return run(qkv_args() + extra);
  };
  Result r = with_target("x86-64-v3", {"--dtype", "bf16", "--report", path("r.json")});
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
  EXPECT_EQ(j.value("target", ""), "x86-64-v3");
  EXPECT_EQ(j["knobs"].value("ENGINE", ""), "fma");
  OwnedTensor qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
  expect_matches(read_npy(dir_ / "O.npy"),
                 reference_attention(qb.view, kb.view, vb.view, ModSet{}, ModBindings{}, 1.0 / std::sqrt(40.0)),
                 DType::BF16, "bf16 on x86-64-v3");
  fs::remove(dir_ / "O.npy");
  r = with_target("not-a-cpu", {});
  EXPECT_TRUE(r.exited && r.code != 0) << r.err;
  EXPECT_NE(r.err.find("'not-a-cpu' is not an x86-64 CPU LLVM knows"), std::string::npos) << r.err;
  r = with_target("x86-64-v3,+nonsense", {});
  EXPECT_NE(r.err.find("'+nonsense' is not +feature or -feature"), std::string::npos) << r.err;
  // A feature this host lacks: the tests run on AVX-512 hosts without AVX10.1 (or on an AVX10
  // host the message differs; only the refusal is checked then).
  r = with_target("x86-64-v3,+avx10.1-512", {});
  EXPECT_TRUE(r.exited && r.code != 0) << r.err;
  EXPECT_EQ(r.err.find("failed to compile"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("FLEXJIT_CPU_TARGET"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "O.npy"));
}

TEST_F(Cli, EnableGqa) {
  OwnedTensor q = random_f32("q", {1, 6, 20, 32}, 11), k = random_f32("k", {1, 2, 29, 32}, 12),
              v = random_f32("v", {1, 2, 29, 32}, 13);
  write_qkv(q, k, v);
  Result bad = run(qkv_args());
  expect_error_line(bad, {"6 heads", "enable_gqa"});
  EXPECT_FALSE(fs::exists(dir_ / "O.npy"));
  Result r = run(qkv_args() + std::vector<std::string>{"--enable-gqa", "--mask-mod", "causal",
                                                       "--report", path("r.json")});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "r.json"))["knobs"]["GQA_GROUP"], 3);
  TracedMod mm = find_mod("causal").mod;
  auto [mods, bind] = combine(nullptr, &mm);
  expect_matches(read_npy(dir_ / "O.npy"),
                 reference_attention(q.view, k.view, v.view, mods, bind, 1.0 / std::sqrt(32.0)),
                 DType::F32, "gqa");
}

TEST_F(Cli, BlockSizesAndKernelOptions) {
  OwnedTensor q = random_f32("q", {1, 2, 150, 32}, 14), k = random_f32("k", {1, 2, 150, 32}, 15),
              v = random_f32("v", {1, 2, 150, 32}, 16);
  write_qkv(q, k, v);
  TracedMod mm = find_mod("causal").mod;
  auto [mods, bind] = combine(nullptr, &mm);
  RefResult ref = reference_attention(q.view, k.view, v.view, mods, bind, 1.0 / std::sqrt(32.0));
  struct Want {
    std::vector<std::string> args;
    int64_t qbs, kvbs;
    int block_m;  // 0: don't care
  };
  for (const Want& w :
       {Want{{"--block-size", "64"}, 64, 64, 0}, Want{{"--block-size", "64x128"}, 64, 128, 0},
        Want{{"--kernel-option", "BLOCK_M=16"}, 128, 128, 16},
        Want{{"--block-size", "32", "--kernel-option", "BLOCK_M=16", "--kernel-option",
              "BLOCK_N=32"},
             32,
             32,
             16}}) {
    std::string label = w.args[0] + " " + w.args[1];
    Result r =
        run(qkv_args() +
            std::vector<std::string>{"--mask-mod", "causal", "--report", path("r.json")} + w.args);
    ASSERT_EQ(r.code, 0) << label << "\n" << r.err;
    nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
    EXPECT_EQ(j["block_mask"]["q_block_size"], w.qbs) << label;
    EXPECT_EQ(j["block_mask"]["kv_block_size"], w.kvbs) << label;
    if (w.block_m) EXPECT_EQ(j["knobs"]["BLOCK_M"], w.block_m) << label;
    expect_matches(read_npy(dir_ / "O.npy"), ref, DType::F32, label);
  }
}

// q as float64, k in Fortran order, v as float16: all read as the same values.
TEST_F(Cli, OtherFileLayouts) {
  const std::vector<int64_t> shape = {1, 2, 19, 16};
  OwnedTensor q = random_f32("q", shape, 21), k = random_f32("k", shape, 22),
              v = random_f32("v", shape, 23);
  write_qkv(q, k, v);
  ASSERT_EQ(run(qkv_args("O_ref.npy")).code, 0);
  const int64_t n = q.view.numel();
  std::vector<double> q64(static_cast<const float*>(q.view.data),
                          static_cast<const float*>(q.view.data) + n);
  write_npy(dir_ / "q.npy", "<f8", shape, q64.data(), q64.size() * 8);
  std::vector<float> kf(static_cast<size_t>(n));  // column-major: the first index varies fastest
  for (int64_t a = 0; a < 1; ++a)
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t c = 0; c < 19; ++c)
        for (int64_t d = 0; d < 16; ++d)
          kf[size_t(a + 1 * (b + 2 * (c + 19 * d)))] =
              k.data<float>()[((a * 2 + b) * 19 + c) * 16 + d];
  write_npy(dir_ / "k.npy", "<f4", shape, kf.data(), kf.size() * 4, /*fortran=*/true);
  std::vector<_Float16> vh(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) vh[size_t(i)] = static_cast<_Float16>(v.data<float>()[i]);
  write_npy(dir_ / "v.npy", "<f2", shape, vh.data(), vh.size() * 2);
  Result r = run(qkv_args());
  ASSERT_EQ(r.code, 0) << r.err;
  // v went through fp16: compare with the reference on the fp16-rounded v.
  OwnedTensor vr = OwnedTensor::make("v", DType::F32, shape);
  for (int64_t i = 0; i < n; ++i) vr.data<float>()[i] = float(vh[size_t(i)]);
  expect_matches(read_npy(dir_ / "O.npy"),
                 reference_attention(q.view, k.view, vr.view, ModSet{}, {}, 0.25), DType::F32,
                 "f8 / fortran / f2 inputs");
}

// ---------------------------------------------------------------- bad input

TEST_F(Cli, MissingFile) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  Result r = run({"--q", path("nope.npy"), "--k", path("k.npy"), "--v", path("v.npy"), "--out",
                  path("O.npy")});
  expect_error_line(r, {"nope.npy", "does not exist"});
  EXPECT_TRUE(outputs().empty());
}

TEST_F(Cli, NotAnNpyFile) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  std::ofstream(dir_ / "k.npy") << "k,v\n1,2\n";
  Result r = run(qkv_args());
  expect_error_line(r, {"k.npy", "NUMPY magic"});
  EXPECT_TRUE(outputs().empty());
}

TEST_F(Cli, TruncatedNpy) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  fs::resize_file(dir_ / "v.npy", fs::file_size(dir_ / "v.npy") - 10);
  Result r = run(qkv_args());
  expect_error_line(r, {"v.npy", "bytes but shape [1, 1, 4, 8]"});
  EXPECT_TRUE(outputs().empty());
  // Cut inside the header too.
  fs::resize_file(dir_ / "v.npy", 40);
  r = run(qkv_args());
  expect_error_line(r, {"v.npy", "truncated header"});
  EXPECT_TRUE(outputs().empty());
}

TEST_F(Cli, WrongRankAndDtype) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  OwnedTensor three = random_f32("q", {1, 4, 8}, 1);
  write_f32(dir_ / "q.npy", three);
  expect_error_line(run(qkv_args()), {"--q must hold a 4-D array", "[1, 4, 8]"});
  OwnedTensor ints = OwnedTensor::make("q", DType::I32, {1, 1, 4, 8});
  write_npy(dir_ / "q.npy", "<i4", {1, 1, 4, 8}, ints.bytes->data(), ints.bytes->size());
  expect_error_line(run(qkv_args()), {"'q' has dtype int32", "floating point"});
  write_npy(dir_ / "q.npy", ">f4", {1, 1, 4, 8}, t.bytes->data(), t.bytes->size());
  expect_error_line(run(qkv_args()), {"'>f4' is not supported"});
  EXPECT_TRUE(outputs().empty());
}

TEST_F(Cli, BadExpressionShowsTheColumn) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  Result r = run(qkv_args() + std::vector<std::string>{"--score-mod", "score + * 2"});
  expect_error_line(r, {"score_mod", "expected an operand", "column 9"}, /*multi_line_ok=*/true);
  EXPECT_NE(r.err.find("  score + * 2\n          ^"), std::string::npos)
      << r.err;  // text and caret
  r = run(qkv_args() + std::vector<std::string>{"--mask-mod", "q_idx >= kv_idx && score > 0"});
  expect_error_line(r, {"mask_mod cannot read score"}, true);
  r = run(qkv_args() + std::vector<std::string>{"--score-mod", "score + bias[kv_idx]"});
  expect_error_line(r, {"unknown name 'bias'"}, true);
  EXPECT_TRUE(outputs().empty());
}

TEST_F(Cli, UnknownModName) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  // A typo of a registered name: the message must name it and point at the registered mods.
  Result r = run(qkv_args() + std::vector<std::string>{"--mask-mod", "causl"});
  expect_error_line(r, {"causl"}, true);
  EXPECT_NE(r.err.find("causal"), std::string::npos)
      << "the registered mask_mods are not mentioned:\n"
      << r.err;
  r = run(qkv_args() + std::vector<std::string>{"--mask-mod", "alibi"});
  expect_error_line(r, {"'alibi' is a score_mod, not a mask_mod", "--score-mod"});
  EXPECT_TRUE(outputs().empty());
}

// `cache warm` compiles the attention kernels a call of each shape would use; a later run of
// such a shape, with another KV length and a new mod, loads that kernel from disk and compiles
// only its mods kernel.
TEST_F(Cli, CacheWarmPrecompilesTheAttentionKernelARunUses) {
  ScopedEnv env;
  env.set("FLEXJIT_CACHE_DIR", path("cache"));
  const std::vector<std::string> warm = {"warm", "--dtype", "fp32", "--head-dim", "40", "--lq", "1,100"};
  Result w = run_sub("cache", warm);
  EXPECT_EQ(w.code, 0) << w.err;
  EXPECT_NE(w.out.find("fp32 D=40 GQA=1 Lq=1: compiled"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("fp32 D=40 GQA=1 Lq=100: compiled"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("2 attention kernels ready"), std::string::npos) << w.out;
  Result again = run_sub("cache", warm);
  EXPECT_NE(again.out.find("fp32 D=40 GQA=1 Lq=100: on disk"), std::string::npos) << again.out;

  write_qkv(random_f32("q", {1, 1, 100, 40}, 1), random_f32("k", {1, 1, 37, 40}, 2), random_f32("v", {1, 1, 37, 40}, 3));
  Result r = run(qkv_args() + std::vector<std::string>{"--score-mod", "score * 0.5 + 1", "--report", path("r.json")});
  EXPECT_EQ(r.code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
  ASSERT_EQ(j["kernels"].size(), 2u) << j.dump(2);
  EXPECT_EQ(j["kernels"][0]["role"], "attention");
  EXPECT_EQ(j["kernels"][0]["cache"], "disk");
  EXPECT_EQ(j["kernels"][1]["role"], "mods");
  EXPECT_EQ(j["kernels"][1]["cache"], "miss");

  // --prune keeps only what this warm uses: the Lq=100 kernel stays, the Lq=1 one and the run's
  // mods kernel go (how the build keeps its prebuilt directory to the current kernels).
  Result pruned = run_sub("cache", {"warm", "--dtype", "fp32", "--head-dim", "40", "--lq", "100", "--prune"});
  EXPECT_EQ(pruned.code, 0) << pruned.err;
  EXPECT_NE(pruned.out.find("pruned 2 other entries"), std::string::npos) << pruned.out;
  Result listed = run_sub("cache", {"list"});
  EXPECT_NE(listed.out.find("\n1 kernels, "), std::string::npos) << listed.out;
  EXPECT_NE(listed.out.find(j["kernels"][0]["key"].get<std::string>()), std::string::npos) << listed.out;
  expect_error_line(run_sub("cache", {"warm", "--device", "cuda", "--arch", "sm_90", "--prune"}), {"--prune"});

  expect_error_line(run_sub("cache", {"warm", "--dtype", "fp8"}), {"--dtype fp8", "fp32, bf16 or fp16"});
  expect_error_line(run_sub("cache", {"warm", "--arch", "sm_90"}), {"--device cuda"});
  expect_error_line(run_sub("cache", {"warm", "--device", "cuda"}), {"needs --arch", "sm_90"});
  expect_error_line(run_sub("cache", {"warm", "--head-dim", "300"}), {"--head-dim 300", "1..256"});
}

// The prebuilt tier (FLEXJIT_PREBUILT_DIR, jit/cache.h): attention kernels warmed into one
// directory serve a run whose own cache is empty, which then compiles only its mods kernel; the
// prebuilt directory is never written. "off" turns the tier off.
TEST_F(Cli, PrebuiltTierServesTheAttentionKernel) {
  ScopedEnv env;
  env.set("FLEXJIT_PREBUILT_DIR", "off");
  env.set("FLEXJIT_CACHE_DIR", path("prebuilt"));
  Result w = run_sub("cache", {"warm", "--dtype", "fp32", "--head-dim", "40", "--lq", "100"});
  EXPECT_EQ(w.code, 0) << w.err;
  auto listing = [](const fs::path& d) {
    std::vector<std::string> names;
    for (const auto& e : fs::recursive_directory_iterator(d))
      if (e.is_regular_file()) names.push_back(e.path().string() + ":" + std::to_string(e.file_size()));
    std::sort(names.begin(), names.end());
    return names;
  };
  const auto before = listing(dir_ / "prebuilt");

  write_qkv(random_f32("q", {1, 1, 100, 40}, 1), random_f32("k", {1, 1, 37, 40}, 2), random_f32("v", {1, 1, 37, 40}, 3));
  auto run_report = [&](const std::string& cache_dir, const std::string& prebuilt) {
    env.set("FLEXJIT_CACHE_DIR", path(cache_dir));
    env.set("FLEXJIT_PREBUILT_DIR", prebuilt);
    Result r = run(qkv_args() + std::vector<std::string>{"--score-mod", "score * 0.25 + 2", "--report", path("r.json"),
                                                         "--check"});
    EXPECT_EQ(r.code, 0) << r.err;
    return nlohmann::json::parse(slurp(dir_ / "r.json"));
  };
  nlohmann::json j = run_report("own", path("prebuilt"));
  ASSERT_EQ(j["kernels"].size(), 2u) << j.dump(2);
  EXPECT_EQ(j["kernels"][0]["role"], "attention");
  EXPECT_EQ(j["kernels"][0]["cache"], "prebuilt");
  EXPECT_EQ(j["kernels"][0]["compile_ms"], 0.0);
  EXPECT_EQ(j["kernels"][1]["cache"], "miss");
  EXPECT_EQ(listing(dir_ / "prebuilt"), before) << "the prebuilt tier is read-only";
  EXPECT_FALSE(fs::exists(dir_ / "own" / (j["kernels"][0]["key"].get<std::string>() + ".o")));

  j = run_report("own2", "off");
  EXPECT_EQ(j["kernels"][0]["cache"], "miss");
}

// The build's own prebuilt kernels (FLEXJIT_PREBUILD_KERNELS: <build>/flexjit-kernels, found
// beside the binary when FLEXJIT_PREBUILT_DIR is unset) cover the default prefill shapes.
TEST_F(Cli, BuildPrebuiltKernelsAreFoundBesideTheBinary) {
  const fs::path pre = exe_.parent_path() / "flexjit-kernels";
  if (!fs::is_directory(pre)) GTEST_SKIP() << pre << " does not exist (built with FLEXJIT_PREBUILD_KERNELS=OFF)";
  ScopedEnv env;
  env.unset("FLEXJIT_PREBUILT_DIR");
  env.set("FLEXJIT_CACHE_DIR", path("own"));
  Result w = run_sub("cache", {"warm", "--dtype", "fp32", "--head-dim", "64", "--lq", "4096"});
  EXPECT_EQ(w.code, 0) << w.err;
  EXPECT_NE(w.out.find("fp32 D=64 GQA=1 Lq=4096: prebuilt (" + fs::canonical(pre).string() + ")"), std::string::npos)
      << w.out;
  // Started as a bare `flexjit` found on PATH (argv[0] has no directory), from another directory.
  const char* path_env = std::getenv("PATH");
  env.set("PATH", exe_.parent_path().string() + ":" + (path_env ? path_env : ""));
  env.set("FLEXJIT_CACHE_DIR", path("own2"));
  via_path_ = true;
  Result p = run_sub("cache", {"warm", "--dtype", "fp32", "--head-dim", "64", "--lq", "4096"});
  via_path_ = false;
  EXPECT_EQ(p.code, 0) << p.err;
  EXPECT_NE(p.out.find("Lq=4096: prebuilt (" + fs::canonical(pre).string() + ")"), std::string::npos) << p.out;
}

// `cache warm --device cuda` compiles CUDA kernels with NVRTC on a machine without a GPU (a
// build box warming a fleet's cache), says what it wrote, and finds them on disk the next time.
TEST_F(Cli, CacheWarmCompilesCudaKernelsWithoutAGpu) {
  std::string why;
  if (!jit::nvrtc_available(&why)) GTEST_SKIP() << "no NVRTC on this machine: " << why;
  ScopedEnv env;
  env.set("FLEXJIT_CACHE_DIR", path("cuda-cache"));
  const std::vector<std::string> warm = {"warm", "--device", "cuda", "--arch", "sm_90", "--head-dim", "64,128",
                                         "--mask-mod", "causal"};
  Result w = run_sub("cache", warm);
  EXPECT_EQ(w.code, 0) << w.err;
  EXPECT_NE(w.out.find("cuda sm_90 bf16 D=64 GQA=1: compiled"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("cuda sm_90 bf16 D=128 GQA=1: compiled"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("flexjit_cuda_prefill_bf16_d128_m64_n64_g1_sm_90_"), std::string::npos) << w.out;
  // The default --lq 1,4096 warms the decode kernel (partitions + merge) too.
  EXPECT_NE(w.out.find("cuda sm_90 bf16 D=128 GQA=1 decode: compiled"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("flexjit_cuda_decode_bf16_d128_m16_n32_g1_w4_sm_90_"), std::string::npos) << w.out;
  EXPECT_NE(w.out.find("4 CUDA kernels for sm_90"), std::string::npos) << w.out;
  Result again = run_sub("cache", warm);
  EXPECT_NE(again.out.find("cuda sm_90 bf16 D=128 GQA=1: on disk"), std::string::npos) << again.out;
  Result list = run_sub("cache", {"list"});
  EXPECT_NE(list.out.find("4 kernels"), std::string::npos) << list.out;
  Result prefill_only = run_sub("cache", {"warm", "--device", "cuda", "--arch", "sm_90", "--head-dim", "64", "--lq", "4096"});
  EXPECT_NE(prefill_only.out.find("1 CUDA kernels for sm_90"), std::string::npos) << prefill_only.out;
  // Another arch or mod set is another kernel; an unknown arch is a clear error.
  Result other = run_sub("cache", {"warm", "--device", "cuda", "--arch", "sm_80", "--dtype", "fp16", "--head-dim", "80",
                                   "--score-mod", "softcap"});
  EXPECT_NE(other.out.find("cuda sm_80 fp16 D=80 GQA=1: compiled"), std::string::npos) << other.out << other.err;
  Result bad = run_sub("cache", {"warm", "--device", "cuda", "--arch", "sm_42", "--head-dim", "64"});
  EXPECT_NE(bad.code, 0);
  EXPECT_NE((bad.out + bad.err).find("'sm_42'"), std::string::npos) << bad.out << bad.err;
  Result cleared = run_sub("cache", {"clear"});
  EXPECT_NE(cleared.out.find("removed 7 entries"), std::string::npos) << cleared.out;
}

TEST_F(Cli, BadOptions) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--kernel-option", "BLOCK_K=3"}),
                    {"unknown --kernel-option BLOCK_K", "known: BLOCK_M, BLOCK_N, USE_AMX"});
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--kernel-option", "USE_AMX=yes"}),
                    {"USE_AMX must be 0 or 1", "'yes'"});
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--kernel-option", "USE_AMX=1"}),
                    {"USE_AMX=1 needs bf16 or fp16 inputs", "fp32"});
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--kernel-option", "BLOCK_M=zero"}),
                    {"BLOCK_M", "'zero' is not a positive integer"});
  // No GPU here: the error says what is missing (or, on a GPU host, that launching is not built
  // yet) and how to compile CUDA kernels anyway.
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--device", "cuda"}),
                    {"--device cuda: ", "cache warm --device cuda"});
  if (!cuda_driver_status().empty())  // no GPU here: tuning one is a clear error
    expect_error_line(run_sub("tune", {"--device", "cuda"}), {"tune --device cuda times kernels on a GPU"});
  if (!cuda_driver_status().empty())  // the prefill engine / blocks tune on a GPU too
    expect_error_line(run_sub("tune", {"--device", "cuda", "--path", "prefill"}),
                      {"tune --device cuda times kernels on a GPU"});
  expect_error_line(
      run(qkv_args() + std::vector<std::string>{"--score-mod", "softcap", "--param", "cap=abc"}),
      {"--param cap=abc", "'abc' is not a number"});
  expect_error_line(
      run(qkv_args() + std::vector<std::string>{"--score-mod", "softcap", "--param", "cap"}),
      {"--param expects NAME=VALUE", "'cap'"});
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--dtype", "fp8"}),
                    {"--dtype fp8 is not supported"});
  expect_error_line(
      run(qkv_args() + std::vector<std::string>{"--mask-mod", "causal", "--block-size", "64x"}),
      {"--block-size", "not a positive integer"});
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--scale", "big"}),
                    {"--scale 'big' is not a number"});
  expect_error_line(
      run(qkv_args() + std::vector<std::string>{"--score-mod", "score + b[h]", "--buffer",
                                                "b=" + path("missing.npy")}),
      {"missing.npy", "does not exist"});
  EXPECT_TRUE(outputs().empty());
}

TEST_F(Cli, RuntimeModErrorsExitCleanly) {
  OwnedTensor t = random_f32("t", {1, 1, 16, 8}, 1);
  write_qkv(t, t, t);
  OwnedTensor bias = random_f32("bias", {16}, 2);
  write_f32(dir_ / "in_bias.npy", bias);
  expect_error_line(
      run(qkv_args() + std::vector<std::string>{"--score-mod", "score + bias[kv_idx + 1000]",
                                                "--buffer", "bias=" + path("in_bias.npy")}),
      {"out of range", "bias [16]"});
  expect_error_line(
      run(qkv_args() +
          std::vector<std::string>{"--score-mod", "score + float(q_idx / (kv_idx - 3))"}),
      {"divided an int by zero"});
  EXPECT_TRUE(outputs().empty());
}

// An error after the output was computed (an unwritable --lse-out or --report) must not leave
// a finished-looking --out file behind.
TEST_F(Cli, LateErrorsLeaveNoPartialOutput) {
  OwnedTensor t = random_f32("t", {1, 1, 4, 8}, 1);
  write_qkv(t, t, t);
  Result r = run(qkv_args() + std::vector<std::string>{"--lse-out", path("no_such_dir/L.npy")});
  expect_error_line(r, {"no_such_dir/L.npy"});
  EXPECT_TRUE(outputs().empty()) << "left behind: " << ::testing::PrintToString(outputs());
  fs::remove(dir_ / "O.npy");
  r = run(qkv_args() + std::vector<std::string>{"--lse-out", path("L.npy"), "--report",
                                                path("no_such_dir/r.json")});
  expect_error_line(r, {"--report", "no_such_dir/r.json"});
  EXPECT_TRUE(outputs().empty()) << "left behind: " << ::testing::PrintToString(outputs());
}


// ---------------------------------------------------------------- decode, paged KV, the tuner

// A paged cache on disk: keys of B sequences in shuffled pages, unused pages NaN; the run reads
// only the pages its block table names, checks itself against the float64 reference and
// reports the decode path and its knobs.
TEST_F(Cli, PagedDecodeWithReportAndCheck) {
  const PagedCase c = write_paged_case(32, 1);
  const int64_t B = c.B, max_pages = c.max_pages;
  const std::vector<std::string>& paged = c.args;
  Result r = run(paged + std::vector<std::string>{"--mask-mod", "causal", "--score-mod", "alibi", "--check",
                                                  "--kernel-option", "PARTITION_SIZE=32", "--report", path("r.json")});
  ASSERT_TRUE(r.exited) << "signal " << r.signal << "\n" << r.err;
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("decode: PARTITION_SIZE=32 (3 partitions"), std::string::npos) << r.out;
  nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
  EXPECT_EQ(j.value("path", ""), "decode");
  EXPECT_EQ(j.value("paged", false), true);
  EXPECT_EQ(j.value("partition_size", 0), 32);
  EXPECT_EQ(j.value("num_partitions", 0), 3);
  EXPECT_EQ(j.value("tuning", ""), "user");
  EXPECT_EQ(j["knobs"].value("PARTITION_SIZE", 0), 32);
  EXPECT_LT(j.value("check_max_abs_error", 1.0), 1e-4);

  // The output against the float64 reference of the same tables (absolute positions).
  expect_matches(read_npy(dir_ / "O.npy"), paged_reference(c, false), DType::F32, "paged alibi+causal");

  // Bad tables and mixed inputs are one-line errors, with nothing written.
  fs::remove(dir_ / "O.npy");
  const int32_t bad[B * max_pages] = {7, 2, 99, 0, 11, -1, 4, 1, -1, -1, -1, -1};
  write_npy(dir_ / "bt.npy", "<i4", {B, max_pages}, bad, sizeof bad);
  expect_error_line(run(paged), {"block_table[0, 2] = 99 is not a page of the cache (0..11)"});
  EXPECT_FALSE(fs::exists(dir_ / "O.npy"));
  expect_error_line(run({"--q", path("q.npy"), "--k-cache", path("kc.npy"), "--out", path("O.npy")}),
                    {"--k-cache needs --v-cache too"});
  expect_error_line(run(paged + std::vector<std::string>{"--k", path("kc.npy")}), {"not both"});
  expect_error_line(run({"--q", path("q.npy"), "--out", path("O.npy")}), {"give the keys and values"});
  write_npy(dir_ / "bt.npy", "<i4", {B, max_pages}, PagedCase::table, sizeof PagedCase::table);
  expect_error_line(run(paged + std::vector<std::string>{"--kernel-option", "PARTITION_SIZE=24"}),
                    {"multiple of the page size 16"});
  expect_error_line(run(paged + std::vector<std::string>{"--kernel-option", "FORCE_USE_FLEX_ATTENTION=1"}),
                    {"FORCE_USE_FLEX_ATTENTION has no paged form"});
}

// `flexjit run --varlen`: packed sequences with FA2's options, checked against the float64
// reference of FA2's semantics; the report; the tables' errors.
TEST_F(Cli, VarlenWithOptionsReportAndCheck) {
  const int32_t cu_q[4] = {0, 17, 17, 50}, cu_k[4] = {0, 20, 25, 58};
  const int64_t Hq = 6, Hkv = 2, D = 24;
  OwnedTensor q = random_f32("q", {50, Hq, D}, 1), k = random_f32("k", {58, Hkv, D}, 2), v = random_f32("v", {58, Hkv, 16}, 3);
  OwnedTensor slopes = random_f32("s", {Hq}, 4);
  for (int64_t i = 0; i < Hq; ++i) slopes.data<float>()[i] = 0.1f + 0.1f * std::fabs(slopes.data<float>()[i]);
  write_qkv(q, k, v);
  write_f32(dir_ / "in_slopes.npy", slopes);
  write_npy(dir_ / "in_cuq.npy", "<i4", {4}, cu_q, sizeof cu_q);
  write_npy(dir_ / "in_cuk.npy", "<i4", {4}, cu_k, sizeof cu_k);
  const std::vector<std::string> varlen = qkv_args() + std::vector<std::string>{
      "--varlen", "--cu-seqlens-q", path("in_cuq.npy"), "--cu-seqlens-k", path("in_cuk.npy")};
  Result r = run(varlen + std::vector<std::string>{"--causal", "--window-left", "6", "--softcap", "3", "--alibi-slopes",
                                                   path("in_slopes.npy"), "--score-mod", "score + (kv_idx % 3) * 0.25",
                                                   "--lse-out", path("L.npy"), "--check", "--report", path("r.json")});
  ASSERT_TRUE(r.exited) << "signal " << r.signal << "\n" << r.err;
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("3 sequences, up to 33 queries / 33 keys"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("softcap 3"), std::string::npos) << r.out;
  nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
  EXPECT_EQ(j.value("path", ""), "varlen");
  EXPECT_EQ(j["shape"].value("batch", 0), 3);
  EXPECT_EQ(j["shape"].value("max_seqlen_k", 0), 33);
  EXPECT_EQ(j["varlen"].value("causal", false), true);
  EXPECT_EQ(j["varlen"].value("window_left", 0), 6);
  EXPECT_LT(j.value("check_max_abs_error", 1.0), 1e-4);
  Npy lse = read_npy(dir_ / "L.npy");
  EXPECT_EQ(lse.shape, (std::vector<int64_t>{Hq, 50}));

  OwnedTensor cq = OwnedTensor::make("cq", DType::I32, {4}), ck = OwnedTensor::make("ck", DType::I32, {4});
  std::memcpy(cq.bytes->data(), cu_q, sizeof cu_q);
  std::memcpy(ck.bytes->data(), cu_k, sizeof cu_k);
  TracedMod sm = parse_mod("score + (kv_idx % 3) * 0.25", ModKind::Score, {}, {});
  auto [mods, bind] = combine(&sm, nullptr);
  VarlenOptions vo;
  vo.causal = true;
  vo.window_left = 6;
  vo.softcap = 3;
  vo.alibi_slopes = &slopes.view;
  RefResult ref = reference_varlen_attention(q.view, k.view, v.view, std::vector<int32_t>(cu_q, cu_q + 4),
                                             std::vector<int32_t>(cu_k, cu_k + 4), mods, bind, vo);
  expect_matches(read_npy(dir_ / "O.npy"), ref, DType::F32, "varlen causal+window+softcap+alibi");

  // Bad tables are one-line errors, with nothing written.
  fs::remove(dir_ / "O.npy");
  const int32_t back[4] = {0, 17, 10, 50};
  write_npy(dir_ / "in_cuq.npy", "<i4", {4}, back, sizeof back);
  expect_error_line(run(varlen), {"cu_seqlens_q must not go backwards"});
  const int32_t past[4] = {0, 17, 17, 51};
  write_npy(dir_ / "in_cuq.npy", "<i4", {4}, past, sizeof past);
  expect_error_line(run(varlen), {"cu_seqlens_q ends at 51, past the 50 rows of q"});
  const int32_t three[3] = {0, 17, 50};
  write_npy(dir_ / "in_cuq.npy", "<i4", {3}, three, sizeof three);
  expect_error_line(run(varlen), {"cu_seqlens_q has 2 sequences but cu_seqlens_k has 3"});
  EXPECT_FALSE(fs::exists(dir_ / "O.npy"));
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--varlen"}), {"--varlen needs --cu-seqlens-q"});
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--causal"}), {"add --varlen"});
}

// FORCE_USE_FLEX_ATTENTION picks the prefill kernel for a decode shape; both agree.
TEST_F(Cli, ForcePrefillOnADecodeShape) {
  write_qkv(random_f32("q", {1, 4, 1, 32}, 1), random_f32("k", {1, 2, 300, 32}, 2), random_f32("v", {1, 2, 300, 32}, 3));
  Result d = run(qkv_args("D.npy") + std::vector<std::string>{"--enable-gqa", "--report", path("d.json")});
  ASSERT_EQ(d.code, 0) << d.err;
  Result p = run(qkv_args("P.npy") + std::vector<std::string>{"--enable-gqa", "--kernel-option",
                                                              "FORCE_USE_FLEX_ATTENTION=1", "--report", path("p.json")});
  ASSERT_EQ(p.code, 0) << p.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "d.json")).value("path", ""), "decode");
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "p.json")).value("path", ""), "prefill");
  Npy a = read_npy(dir_ / "D.npy"), b = read_npy(dir_ / "P.npy");
  ASSERT_EQ(a.data.size(), b.data.size());
  for (size_t i = 0; i < a.data.size(); ++i) ASSERT_NEAR(a.data[i], b.data[i], 2e-6) << i;
  expect_error_line(run(qkv_args() + std::vector<std::string>{"--kernel-option", "FORCE_USE_FLEX_ATTENTION=2"}),
                    {"FORCE_USE_FLEX_ATTENTION must be 0 or 1"});
}

// `flexjit tune` of a bf16 decode bucket on an AMX host times both decode engines, and a run in
// the bucket follows the engine its entry names, whichever it is (the entry is edited to each in
// turn). Skips visibly without AMX.
TEST_F(Cli, TunedDecodeEngineIsFollowed) {
  std::string no_amx;
  if (!amx_available(&no_amx)) GTEST_SKIP() << "one decode engine only here: " << no_amx;
  ScopedEnv env;
  env.set("FLEXJIT_CACHE_DIR", path("cache"));
  Result t = run_sub("tune", {"--path", "decode", "--dtype", "bf16", "--head-dim", "32", "--heads", "8", "--kv-heads",
                              "1", "--lkv", "512", "--reps", "1"});
  ASSERT_EQ(t.code, 0) << t.out << t.err;
  EXPECT_NE(t.err.find("ENGINE=dot "), std::string::npos) << "both engines are candidates:\n" << t.err;
  EXPECT_NE(t.err.find("ENGINE=amx "), std::string::npos) << "both engines are candidates:\n" << t.err;
  const std::string db = path("cache") + "/tuning.json";
  write_qkv(random_f32("q", {1, 8, 1, 32}, 1), random_f32("k", {1, 1, 400, 32}, 2), random_f32("v", {1, 1, 400, 32}, 3));
  for (const std::string engine : {"dot", "amx"}) {
    nlohmann::json j = nlohmann::json::parse(slurp(db));
    ASSERT_EQ(j["entries"].size(), 1u) << j.dump(2);
    for (auto& [key, e] : j["entries"].items()) e["engine"] = engine;
    { std::ofstream(db, std::ios::trunc) << j.dump(2); }
    Result r = run(qkv_args() + std::vector<std::string>{"--dtype", "bf16", "--enable-gqa", "--report", path("r.json"),
                                                         "--check"});
    ASSERT_EQ(r.code, 0) << r.err;
    nlohmann::json rep = nlohmann::json::parse(slurp(dir_ / "r.json"));
    EXPECT_EQ(rep.value("tuning", ""), "tuned") << rep.dump(2);
    EXPECT_EQ(rep["knobs"].value("ENGINE", ""), engine) << rep.dump(2);
  }
}

// `flexjit tune`: two processes tuning at once both land in the database; a later run in a
// bucket uses its entry ("tuned"); a truncated database is set aside, never trusted, and the
// next tune rebuilds it.
TEST_F(Cli, TuneDatabaseUnderConcurrencyAndTruncation) {
  ScopedEnv env;
  env.set("FLEXJIT_CACHE_DIR", path("cache"));
  const std::vector<std::string> common = {"--dtype", "fp32", "--head-dim", "32", "--heads", "4", "--kv-heads",
                                           "2", "--reps", "1"};
  pid_t a = start_sub("tune", common + std::vector<std::string>{"--lkv", "512"}, "a");
  pid_t b = start_sub("tune", common + std::vector<std::string>{"--lkv", "1000"}, "b");
  Result ra = wait_sub(a, "a"), rb = wait_sub(b, "b");
  ASSERT_EQ(ra.code, 0) << ra.out << ra.err;
  ASSERT_EQ(rb.code, 0) << rb.out << rb.err;
  EXPECT_NE(ra.out.find("Lkv<=512"), std::string::npos) << ra.out;
  EXPECT_NE(rb.out.find("Lkv<=1024"), std::string::npos) << rb.out;
  EXPECT_NE(ra.err.find("] 1/"), std::string::npos) << "progress bar: " << ra.err;
  Result show = run_sub("tune", {"--show"});
  ASSERT_EQ(show.code, 0) << show.err;
  EXPECT_NE(show.out.find(": 2 entries"), std::string::npos) << show.out;
  const std::string db = path("cache") + "/tuning.json";
  nlohmann::json j = nlohmann::json::parse(slurp(db));
  EXPECT_EQ(j["entries"].size(), 2u) << j.dump(2);

  // A call in the 1024 bucket (700 keys) uses the tuned knobs.
  write_qkv(random_f32("q", {1, 4, 1, 32}, 1), random_f32("k", {1, 2, 700, 32}, 2), random_f32("v", {1, 2, 700, 32}, 3));
  Result r = run(qkv_args() + std::vector<std::string>{"--enable-gqa", "--report", path("r.json"), "--check"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "r.json")).value("tuning", ""), "tuned");

  // Truncated: set aside, the run falls back to the cost model, the next tune rebuilds the file.
  std::string text = slurp(db);
  { std::ofstream(db, std::ios::trunc) << text.substr(0, text.size() / 2); }
  Result show2 = run_sub("tune", {"--show"});
  ASSERT_EQ(show2.code, 0) << show2.err;
  EXPECT_NE(show2.out.find(": 0 entries"), std::string::npos) << show2.out;
  EXPECT_NE(show2.out.find("note:"), std::string::npos) << show2.out;
  bool set_aside = false;
  for (const auto& e : fs::directory_iterator(path("cache")))
    set_aside |= e.path().filename().string().rfind("tuning.json.bad-", 0) == 0;
  EXPECT_TRUE(set_aside);
  Result r2 = run(qkv_args() + std::vector<std::string>{"--enable-gqa", "--report", path("r2.json")});
  ASSERT_EQ(r2.code, 0) << r2.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir_ / "r2.json")).value("tuning", ""), "default");
  Result again = run_sub("tune", common + std::vector<std::string>{"--lkv", "700"});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(db))["entries"].size(), 1u);
  expect_error_line(run_sub("tune", {"--path", "decode", "--lq", "17"}), {"decode takes Lq <= 16"});
  expect_error_line(run_sub("tune", {"--heads", "6", "--kv-heads", "4"}), {"must be a positive multiple of kv heads"});
}

// ---------------------------------------------------------------- the emulated CUDA device

// `--device cuda` end to end on the emulated CUDA device (tests/support/emulated_cuda_device.cpp:
// the driver API and NVRTC for a machine without a GPU, kernels run by the CPU emulator): the
// CLI's whole CUDA host path (NVRTC, the cache, module load, the shared-memory opt-in, launches,
// copies, the error flag) for prefill on each engine, decode with a split and from a paged cache,
// and both CUDA tuners, whose stored choice the next call takes. Outputs against the float64
// reference. Timings through it measure the emulator: the tests check plumbing, never speed.
class EmulatedCuda : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    if (IsSkipped()) return;
#ifndef FLEXJIT_EMULATED_CUDA_LIB
    GTEST_SKIP() << "the emulated CUDA device was not built (needs Boost.Context: libboost-context-dev)";
#else
    std::string why;
    if (!jit::nvrtc_available(&why)) GTEST_SKIP() << "no NVRTC: " << why;
    // The shim forwards to the NVRTC this process found (e.g. the torch wheel's, via FLEXJIT_NVRTC).
    if (const char* e = std::getenv("FLEXJIT_NVRTC"); e && *e && !std::getenv("FLEXJIT_EMULATED_REAL_NVRTC"))
      env_.set("FLEXJIT_EMULATED_REAL_NVRTC", e);
    env_.set("FLEXJIT_CUDA_DRIVER", FLEXJIT_EMULATED_CUDA_LIB);
    env_.set("FLEXJIT_NVRTC", FLEXJIT_EMULATED_CUDA_LIB);
    env_.set("FLEXJIT_CACHE_DIR", path("cache"));
#endif
  }

  // Runs `args` and checks it succeeded on the emulated device; returns its report.
  nlohmann::json run_ok(const std::vector<std::string>& args) {
    Result r = run(args + std::vector<std::string>{"--device", "cuda", "--dtype", "bf16", "--report", path("r.json")});
    EXPECT_TRUE(r.exited) << "signal " << r.signal << "\n" << r.err;
    EXPECT_EQ(r.code, 0) << r.out << r.err;
    if (r.code != 0) return {};
    EXPECT_NE(r.out.find("flexjit emulated sm_90 (CPU emulator, not a GPU)"), std::string::npos) << r.out;
    nlohmann::json j = nlohmann::json::parse(slurp(dir_ / "r.json"));
    EXPECT_EQ(j.value("backend", ""), "cuda");
    EXPECT_EQ(j.value("arch", ""), "sm_90");
    EXPECT_NE(j.value("device", "").find("emulated"), std::string::npos) << j.dump(2);
    return j;
  }

  // The float64 reference of registered mods on bf16-rounded inputs (the CLI's example buffers).
  RefResult reference(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v, const char* score_mod,
                      const char* mask_mod) {
    ShapeInfo shape{q.view.sizes[0], q.view.sizes[1], k.view.sizes[1], q.view.sizes[2], k.view.sizes[2]};
    std::vector<OwnedTensor> storage;
    TracedMod sm = instantiate_example(find_mod(score_mod), shape, &storage);
    TracedMod mm = instantiate_example(find_mod(mask_mod), shape, &storage);
    auto [mods, bind] = combine(&sm, &mm);
    OwnedTensor qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
    return reference_attention(qb.view, kb.view, vb.view, mods, bind, 1.0 / std::sqrt(double(q.view.sizes[3])));
  }

  ScopedEnv env_;
};

TEST_F(EmulatedCuda, PrefillOnEachEngine) {
  OwnedTensor q = random_f32("q", {1, 6, 97, 64}, 21), k = random_f32("k", {1, 2, 129, 64}, 22),
              v = random_f32("v", {1, 2, 129, 64}, 23);
  write_qkv(q, k, v);
  const RefResult ref = reference(q, k, v, "alibi", "causal");
  for (const char* use : {"0", "1", "2"}) {
    SCOPED_TRACE(std::string("USE_WGMMA=") + use);
    nlohmann::json j = run_ok(qkv_args() + std::vector<std::string>{"--score-mod", "alibi", "--mask-mod", "causal",
                                                                    "--enable-gqa", "--check", "--kernel-option",
                                                                    std::string("USE_WGMMA=") + use});
    const std::string plan = j.value("plan", "");
    EXPECT_NE(plan.find(use[0] == '0' ? "ENGINE=mma ARCH=sm_90 " : "ENGINE=wgmma ARCH=sm_90a"), std::string::npos)
        << plan;
    if (use[0] == '2') EXPECT_NE(plan.find("KV_STAGES=3"), std::string::npos) << plan;
    EXPECT_EQ(j.value("tuning", ""), "user");
    EXPECT_EQ(j.value("cache", ""), "miss");
    expect_matches(read_npy(dir_ / "O.npy"), ref, DType::BF16, plan);
  }
  // The same kernel again: the disk cache (a new process) serves the binary the emulator ran.
  nlohmann::json again = run_ok(qkv_args() + std::vector<std::string>{"--score-mod", "alibi", "--mask-mod",
                                                                      "causal", "--enable-gqa"});
  EXPECT_EQ(again.value("cache", ""), "disk");
  EXPECT_EQ(again.value("tuning", ""), "default");
  expect_matches(read_npy(dir_ / "O.npy"), ref, DType::BF16, "from the disk cache");
}

TEST_F(EmulatedCuda, DecodeSplitAndPaged) {
  OwnedTensor q = random_f32("q", {2, 6, 1, 64}, 31), k = random_f32("k", {2, 2, 300, 64}, 32),
              v = random_f32("v", {2, 2, 300, 64}, 33);
  write_qkv(q, k, v);
  nlohmann::json j = run_ok(qkv_args() + std::vector<std::string>{"--score-mod", "alibi", "--mask-mod", "causal",
                                                                  "--enable-gqa", "--kernel-option",
                                                                  "PARTITION_SIZE=128", "--check"});
  EXPECT_EQ(j.value("path", ""), "decode");
  EXPECT_EQ(j.value("partition_size", 0), 128);
  EXPECT_EQ(j.value("num_partitions", 0), 3);
  EXPECT_EQ(j.value("tuning", ""), "user");
  expect_matches(read_npy(dir_ / "O.npy"), reference(q, k, v, "alibi", "causal"), DType::BF16, "decode, 3 partitions");

  // A paged cache with a shuffled table; pages no sequence uses hold NaN.
  const PagedCase c = write_paged_case(64, 34);
  nlohmann::json p = run_ok(c.args + std::vector<std::string>{"--mask-mod", "causal", "--score-mod", "alibi",
                                                              "--kernel-option", "PARTITION_SIZE=32", "--check"});
  EXPECT_EQ(p.value("paged", false), true);
  EXPECT_EQ(p.value("num_partitions", 0), 3);
  expect_matches(read_npy(dir_ / "O.npy"), paged_reference(c, true), DType::BF16, "paged decode");
}

// Both CUDA tuners time their candidates on the (emulated) device, store a choice under its name,
// and the next call of that bucket plans with it ("tuned").
TEST_F(EmulatedCuda, TunersStoreWhatTheNextCallUses) {
  Result d = run_sub("tune", {"--device", "cuda", "--head-dim", "64", "--heads", "6", "--kv-heads", "2", "--lkv",
                              "300", "--reps", "1", "--json", path("d.json")});
  ASSERT_EQ(d.code, 0) << d.out << d.err;
  EXPECT_NE(d.out.find("; stored"), std::string::npos) << d.out;
  EXPECT_NE(d.err.find("default BLOCK_N="), std::string::npos) << d.err;
  EXPECT_NE(d.err.find("playoff of the fastest and the default"), std::string::npos) << d.err;
  for (const auto& c : nlohmann::json::parse(slurp(dir_ / "d.json"))[0]["candidates"])
    EXPECT_EQ(c.value("error", "?"), "") << c.dump();
  OwnedTensor q = random_f32("q", {1, 6, 1, 64}, 41), k = random_f32("k", {1, 2, 300, 64}, 42),
              v = random_f32("v", {1, 2, 300, 64}, 43);
  write_qkv(q, k, v);
  nlohmann::json j = run_ok(qkv_args() + std::vector<std::string>{"--enable-gqa", "--check"});
  EXPECT_EQ(j.value("tuning", ""), "tuned") << j.dump(2);

  Result p = run_sub("tune", {"--device", "cuda", "--path", "prefill", "--head-dim", "64", "--heads", "2",
                              "--kv-heads", "1", "--lkv", "128", "--reps", "1", "--json", path("p.json")});
  ASSERT_EQ(p.code, 0) << p.out << p.err;
  EXPECT_NE(p.err.find("ENGINE=wgmma2 "), std::string::npos) << "every engine is a candidate on sm_90:\n" << p.err;
  for (const auto& c : nlohmann::json::parse(slurp(dir_ / "p.json"))[0]["candidates"])
    EXPECT_EQ(c.value("error", "?"), "") << c.dump();
  OwnedTensor pq = random_f32("q", {1, 2, 128, 64}, 44), pk = random_f32("k", {1, 1, 128, 64}, 45),
              pv = random_f32("v", {1, 1, 128, 64}, 46);
  write_qkv(pq, pk, pv);
  nlohmann::json jp = run_ok(qkv_args() + std::vector<std::string>{"--enable-gqa", "--mask-mod", "causal", "--check"});
  EXPECT_EQ(jp.value("tuning", ""), "tuned") << jp.dump(2);
}

}  // namespace
}  // namespace flexjit

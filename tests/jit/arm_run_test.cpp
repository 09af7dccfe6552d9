// LABELS: numerics cross
// Arm (aarch64) run under emulation: the prefill and decode kernels and their mods kernel, cross-compiled by
// the JIT's own pipeline (jit::cross_compile_cpp_to_object) for Neoverse N1 (NEON) and Neoverse
// V1 with 256-bit SVE, are linked statically with tests/arm/prefill_harness.cpp by the aarch64
// cross g++ and run under QEMU's user-mode emulator, which checks them against a float64
// reference (ALiBi + causal, GQA 3, D 80; prefill Lq 97 Lkv 129, decode a shuffled paged cache
// of 3 sequences with Lq 2), bf16 prefill also on the dot-product engine
// (BFDOT on Arm, templates/cpu/prefill_dpbf16.h); and the backward pass (no mods; dQ, dK, dV
// against float64, tests/arm/backward_harness.cpp), bf16 also on BFDOT. This proves what the Arm build
// computes, not how fast: timing an emulator means nothing. Skips, saying why, when the cross
// g++ or qemu-aarch64 is missing (scripts/setup.sh installs both).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "jit/compile.h"
#include "jit/instantiate.h"
#include "score_mods/registry.h"
#include "tests/tolerances.h"

namespace flexjit::jit {
namespace {

namespace fs = std::filesystem;

std::string find_tool(std::initializer_list<const char*> names) {
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/bin:/bin";
  for (const char* n : names) {
    size_t start = 0;
    while (start <= p.size()) {
      size_t end = p.find(':', start);
      if (end == std::string::npos) end = p.size();
      const fs::path cand = fs::path(p.substr(start, end - start)) / n;
      if (::access(cand.c_str(), X_OK) == 0) return cand.string();
      start = end + 1;
    }
  }
  return "";
}

// Runs a shell command; returns its exit status and (in *out) its stdout + stderr.
int run(const std::string& cmd, std::string* out) {
  FILE* f = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!f) return -1;
  char buf[4096];
  size_t n;
  out->clear();
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
  const int status = ::pclose(f);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

fs::path repo_root() { return fs::path(__FILE__).parent_path().parent_path().parent_path(); }

// A compiled kernel to a file the cross linker takes: a plain object, or an ar archive (split).
fs::path write_object(const fs::path& dir, const std::string& name, const std::string& object) {
  const bool archive = object.rfind("!<arch>\n", 0) == 0;
  const fs::path p = dir / (name + (archive ? ".a" : ".o"));
  std::ofstream(p, std::ios::binary) << object;
  return p;
}

struct ArmCase {
  const char* what;
  CrossTarget target;
  const char* qemu_cpu;
  DType dtype;
  PrefillEngine engine = PrefillEngine::Fma;  // Dpbf16: BFDOT on Arm
  KernelKind kind = KernelKind::Prefill;      // or Decode (paged, tests/arm/decode_harness.cpp), Backward
};

// Whether an AArch64 object holds a vector BFDOT (bfdot v.4s, v.8h, v.8h: 0x6e40fc00 with Rm, Rn,
// Rd in the mask's zero bits), scanning 4-byte words.
bool has_bfdot(const std::string& object) {
  for (size_t i = 0; i + 4 <= object.size(); i += 4) {
    uint32_t w;
    std::memcpy(&w, object.data() + i, 4);
    if ((w & 0xffe0fc00u) == 0x6e40fc00u) return true;
  }
  return false;
}

class ArmRun : public ::testing::TestWithParam<ArmCase> {};

TEST_P(ArmRun, MatchesFloat64Reference) {
  const ArmCase& c = GetParam();
  const std::string gxx = find_tool({"aarch64-linux-gnu-g++"}), ranlib = find_tool({"aarch64-linux-gnu-ranlib"});
  const std::string qemu = find_tool({"qemu-aarch64-static", "qemu-aarch64"});
  if (gxx.empty() || ranlib.empty() || qemu.empty())
    GTEST_SKIP() << "needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt: g++-aarch64-linux-gnu "
                    "qemu-user-static; scripts/setup.sh installs them)";

  const bool decode = c.kind == KernelKind::Decode, backward = c.kind == KernelKind::Backward;
  KernelSpec spec;
  spec.kind = c.kind;
  spec.dtype = c.dtype;
  spec.head_dim = spec.head_dim_v = 80;
  spec.block_m = decode ? 8 : 32;  // decode: the 6 packed (head, query) rows of a GQA group
  spec.block_n = 64;
  spec.gqa_group = 3;
  spec.engine = c.engine;
  KernelSpec mods_spec;
  mods_spec.kind = KernelKind::Mods;
  ShapeInfo shape{1, 6, 2, 97, 129};
  std::vector<OwnedTensor> storage;
  TracedMod alibi = instantiate_example(find_mod("alibi"), shape, &storage);
  TracedMod causal = instantiate_example(find_mod("causal"), shape, &storage);
  auto [mods, bind] = combine(&alibi, &causal);
  ASSERT_EQ(mods.buffers.size(), 1u);
  ASSERT_EQ(mods.buffers[0].name, "slopes");

  std::string tag = c.what;
  for (char& ch : tag)
    if (ch == ' ') ch = '_';
  const fs::path dir = fs::temp_directory_path() / ("flexjit_arm_" + std::to_string(::getpid()) + "_" + tag);
  fs::create_directories(dir);
  const std::string entry = decode ? "flexjit_arm_decode" : backward ? "flexjit_arm_backward" : "flexjit_arm_prefill",
                    mods_entry = "flexjit_arm_mods";
  CompileResult kr, mr;
  ASSERT_NO_THROW(kr = cross_compile_cpp_to_object(make_source(spec, ModSet{}, entry), entry + ".cpp", c.target));
  const fs::path kobj = write_object(dir, "kernel", kr.object);
  fs::path mobj;  // the backward harness runs without mods
  if (!backward) {
    ASSERT_NO_THROW(mr = cross_compile_cpp_to_object(make_source(mods_spec, mods, mods_entry), "arm_mods.cpp", c.target));
    mobj = write_object(dir, "mods", mr.object);
  }
  // BFDOT: the dot-product engines (prefill, backward), and decode of bf16 wherever the target has FEAT_BF16.
  const bool bfdot = c.engine == PrefillEngine::Dpbf16 ||
                     (decode && c.dtype == DType::BF16 && c.target.cpu == std::string("neoverse-v1"));
  EXPECT_EQ(has_bfdot(kr.object), bfdot) << c.what << ": BFDOT in the kernel";

  std::string out;
  for (const fs::path& o : {kobj, mobj})  // a split kernel's archive needs a symbol index to link
    if (o.extension() == ".a") ASSERT_EQ(run(ranlib + " " + o.string(), &out), 0) << out;
  const char* harness = decode ? "tests/arm/decode_harness.cpp" : backward ? "tests/arm/backward_harness.cpp"
                                                                             : "tests/arm/prefill_harness.cpp";
  const fs::path exe = dir / "harness";
  std::string arch = "-march=armv8.2-a";
  for (const auto& f : c.target.extra_flags) arch += " " + f;
  if (std::string(c.target.cpu) == "neoverse-v1") arch = "-march=armv8.4-a+sve -msve-vector-bits=256";
  const std::string link = gxx + " -std=c++17 -O1 -static " + arch + " -I" + repo_root().string() +
                           " -DENTRY=" + entry + " -DMODS_ENTRY=" + mods_entry + " -DDTYPE=" +
                           (c.dtype == DType::F32 ? "0" : "1") +
                           " -DHEAD_DIM=80 -DHEAD_DIM_V=80 -DBLOCK_M=" + std::to_string(spec.block_m) +
                           " -DGQA_GROUP=3 " +
                           (repo_root() / harness).string() + " " + kobj.string() + " " + mobj.string() +
                           " -lm -o " + exe.string();
  ASSERT_EQ(run(link, &out), 0) << link << "\n" << out;
  const std::string cmd = qemu + " -cpu " + c.qemu_cpu + " " + exe.string();
  const int rc = run(cmd, &out);
  std::printf("%s: %s", c.what, out.c_str());
  ASSERT_EQ(rc, 0) << cmd << "\n" << out;
  double err = -1, ref = -1, lse_err = -1, lse = -1;
  ASSERT_EQ(std::sscanf(out.c_str(), "max_abs_err %lf max_abs_ref %lf max_lse_err %lf max_abs_lse %lf", &err, &ref,
                        &lse_err, &lse),
            4)
      << out;
  // The elementwise bounds of tests/tolerances.h, taken at the largest magnitude (looser).
  const testing::Tolerance tol = backward ? testing::gradient_tolerance(c.dtype) : testing::output_tolerance(c.dtype);
  EXPECT_LE(err, tol.atol + tol.rtol * ref) << c.what;
  EXPECT_LE(lse_err, testing::kLseTolerance.atol + testing::kLseTolerance.rtol * lse) << c.what;
  EXPECT_GT(ref, 0.01) << "the reference is degenerate";
  if (!std::getenv("FLEXJIT_KEEP_ARM")) fs::remove_all(dir);
}

const CrossTarget kNeon{"aarch64-linux-gnu", "neoverse-n1", {}};
const CrossTarget kSve{"aarch64-linux-gnu", "neoverse-v1", {"-msve-vector-bits=256"}};

INSTANTIATE_TEST_SUITE_P(
    Arm, ArmRun,
    ::testing::Values(ArmCase{"neon fp32", kNeon, "neoverse-n1", DType::F32},
                      ArmCase{"neon bf16", kNeon, "neoverse-n1", DType::BF16},
                      ArmCase{"sve256 fp32", kSve, "max,sve-default-vector-length=32", DType::F32},
                      ArmCase{"sve256 bf16", kSve, "max,sve-default-vector-length=32", DType::BF16},
                      ArmCase{"sve256 bf16 bfdot", kSve, "max,sve-default-vector-length=32", DType::BF16,
                              PrefillEngine::Dpbf16},
                      ArmCase{"neon decode fp32", kNeon, "neoverse-n1", DType::F32, PrefillEngine::Fma, KernelKind::Decode},
                      ArmCase{"neon decode bf16", kNeon, "neoverse-n1", DType::BF16, PrefillEngine::Fma, KernelKind::Decode},
                      ArmCase{"sve256 decode bf16", kSve, "max,sve-default-vector-length=32", DType::BF16,
                              PrefillEngine::Fma, KernelKind::Decode},
                      ArmCase{"neon backward fp32", kNeon, "neoverse-n1", DType::F32, PrefillEngine::Fma,
                              KernelKind::Backward},
                      ArmCase{"neon backward bf16", kNeon, "neoverse-n1", DType::BF16, PrefillEngine::Fma,
                              KernelKind::Backward},
                      ArmCase{"sve256 backward bf16 bfdot", kSve, "max,sve-default-vector-length=32", DType::BF16,
                              PrefillEngine::Dpbf16, KernelKind::Backward}),
    [](const ::testing::TestParamInfo<ArmCase>& i) {
      std::string n = i.param.what;
      for (char& ch : n)
        if (ch == ' ') ch = '_';
      return n;
    });

}  // namespace
}  // namespace flexjit::jit

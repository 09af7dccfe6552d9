// LABELS: unit compile_only
// Arm (aarch64) compile-only: the kernel templates go through the same pipeline (frontend flags,
// O3, codegen) for aarch64-linux-gnu with NEON (neoverse-n1) and SVE at 256 bits (neoverse-v1,
// Graviton 3), and emit AArch64 ELF objects holding each kernel's entry. A template that used an
// x86 builtin outside a feature guard would not compile here (Clang rejects __builtin_ia32_* on
// Arm), so these compiles are also the check that nothing x86-specific leaks into shared code.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "jit/compile.h"
#include "jit/instantiate.h"
#include "score_mods/registry.h"

namespace flexjit::jit {
namespace {

constexpr uint16_t kEmAarch64 = 183;

// e_machine of every ELF object in `object` (a plain object or an ar archive of a split kernel).
std::vector<uint16_t> elf_machines(const std::string& object) {
  std::vector<uint16_t> m;
  for (size_t at = object.find("\x7f" "ELF"); at != std::string::npos; at = object.find("\x7f" "ELF", at + 4)) {
    if (at + 20 > object.size()) break;
    uint16_t machine;
    std::memcpy(&machine, object.data() + at + 18, 2);
    m.push_back(machine);
  }
  return m;
}

struct Kernel {
  std::string what;
  KernelSpec spec;
  bool mods = false;
};

std::vector<Kernel> kernels() {
  std::vector<Kernel> k;
  auto prefill = [](DType dt, int d, int dv, int bm, int bn, int g) {
    KernelSpec s;
    s.kind = KernelKind::Prefill;
    s.dtype = dt, s.head_dim = d, s.head_dim_v = dv, s.block_m = bm, s.block_n = bn, s.gqa_group = g;
    return s;
  };
  k.push_back({"prefill fp32 D64", prefill(DType::F32, 64, 64, 64, 64, 1)});
  k.push_back({"prefill bf16 D128", prefill(DType::BF16, 128, 128, 64, 64, 1)});
  k.push_back({"prefill fp16 D80 Dv48 GQA3", prefill(DType::F16, 80, 48, 32, 64, 3)});
  KernelSpec dec = prefill(DType::BF16, 128, 128, 16, 128, 4);
  dec.kind = KernelKind::Decode;
  k.push_back({"decode bf16 D128 GQA4", dec});
  dec.dtype = DType::F32;
  dec.head_dim = dec.head_dim_v = 64;
  k.push_back({"decode fp32 D64", dec});
  KernelSpec mods;
  mods.kind = KernelKind::Mods;
  k.push_back({"mods alibi + causal", mods, true});
  return k;
}

void compile_all_for(const CrossTarget& target, std::vector<std::string>* objects) {
  ShapeInfo shape{1, 8, 8, 128, 128};
  std::vector<OwnedTensor> storage;
  TracedMod alibi = instantiate_example(find_mod("alibi"), shape, &storage);
  TracedMod causal = instantiate_example(find_mod("causal"), shape, &storage);
  auto [mods, bind] = combine(&alibi, &causal);
  for (const Kernel& k : kernels()) {
    SCOPED_TRACE(target.cpu + ": " + k.what);
    const ModSet none;
    const std::string symbol = "flexjit_cross_" + std::to_string(objects->size());
    const std::string source = make_source(k.spec, k.mods ? mods : none, symbol);
    CompileResult r;
    ASSERT_NO_THROW(r = cross_compile_cpp_to_object(source, k.what + ".cpp", target));
    const std::vector<uint16_t> machines = elf_machines(r.object);
    ASSERT_FALSE(machines.empty()) << "no ELF object emitted";
    for (uint16_t m : machines) EXPECT_EQ(m, kEmAarch64);
    EXPECT_NE(r.object.find(symbol), std::string::npos) << "the entry symbol is missing";
    // FLEXJIT_CROSS_DUMP=DIR keeps the objects for a look with llvm-objdump-19 -d.
    if (const char* dir = std::getenv("FLEXJIT_CROSS_DUMP"))
      std::ofstream(std::string(dir) + "/" + target.cpu + "_" + std::to_string(objects->size()) + ".o",
                    std::ios::binary)
          << r.object;
    objects->push_back(r.object);
  }
}

TEST(CrossCompile, KernelsCompileForArmNeonAndSve) {
  std::vector<std::string> neon, sve;
  compile_all_for({"aarch64-linux-gnu", "neoverse-n1", {}}, &neon);
  compile_all_for({"aarch64-linux-gnu", "neoverse-v1", {"-msve-vector-bits=256"}}, &sve);
  ASSERT_EQ(neon.size(), sve.size());
  // 256-bit SVE registers change the code of the vector kernels (not just a flag in a header).
  for (size_t i = 0; i + 1 < neon.size(); ++i) EXPECT_NE(neon[i], sve[i]) << kernels()[i].what;
}

// The x86 engines a host may not have: the AMX and vdpbf16ps prefill engines, the backward's bf16
// dot products and bf16 decode, compiled (to assembly, by the system's clang++ driver with the
// JIT's language flags) for CPUs that have them, so an AVX2-only CI host still compiles every x86
// spelling. The numerics of these engines run where the host has the instructions (numerics /
// backward suites); this only proves the templates compile and use the instruction.
std::string find_clang() {
  for (const char* name : {"clang++-19", "clang++"}) {
    const std::string cmd = std::string("command -v ") + name + " >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return name;
  }
  return "";
}

TEST(CrossCompile, X86EnginesCompileWhereTheHostCannotRunThem) {
  const std::string clang = find_clang();
  if (clang.empty()) GTEST_SKIP() << "needs a clang++ driver on PATH (clang-19)";
  struct Case {
    const char* what;
    KernelKind kind;
    PrefillEngine engine;
    const char* cpu;
    const char* instruction;  // in the assembly ("" : none expected)
    DType dtype = DType::BF16;
  };
  const std::string dir = ::testing::TempDir();
  int n = 0;
  for (const Case& c : std::vector<Case>{
           {"prefill amx", KernelKind::Prefill, PrefillEngine::Amx, "sapphirerapids", "tdpbf16ps"},
           // fp16 on AMX: bf16 hi / lo halves (vcvtne2ps2bf16 splits them), three tile products.
           {"prefill amx fp16", KernelKind::Prefill, PrefillEngine::Amx, "sapphirerapids", "vcvtne2ps2bf16",
            DType::F16},
           {"prefill dpbf16", KernelKind::Prefill, PrefillEngine::Dpbf16, "znver4", "vdpbf16ps"},
           {"backward dpbf16", KernelKind::Backward, PrefillEngine::Dpbf16, "znver4", "vdpbf16ps"},
           {"decode bf16", KernelKind::Decode, PrefillEngine::Fma, "znver4", "vdpbf16ps"},
           {"backward fma avx2", KernelKind::Backward, PrefillEngine::Fma, "x86-64-v3", ""},
       }) {
    SCOPED_TRACE(c.what);
    KernelSpec s;
    s.kind = c.kind;
    s.dtype = c.dtype;
    s.head_dim = s.head_dim_v = 128;
    s.block_m = c.kind == KernelKind::Decode ? 16 : 64;
    s.block_n = c.kind == KernelKind::Decode ? 128 : 64;
    s.gqa_group = c.kind == KernelKind::Decode ? 4 : 1;
    s.engine = c.engine;
    const std::string base = dir + "/flexjit_x86_engine_" + std::to_string(n++);
    std::ofstream(base + ".cpp") << make_source(s, ModSet{}, "flexjit_x86_engine");
    const std::string cmd = clang + " --target=x86_64-linux-gnu -march=" + c.cpu +
                            " -x c++ -std=c++17 -O1 -fno-exceptions -fno-rtti -ffp-contract=fast -S " + base +
                            ".cpp -o " + base + ".s > " + base + ".log 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << std::ifstream(base + ".log").rdbuf();
    std::stringstream asm_text;
    asm_text << std::ifstream(base + ".s").rdbuf();
    if (*c.instruction) EXPECT_NE(asm_text.str().find(c.instruction), std::string::npos) << "no " << c.instruction;
    EXPECT_NE(asm_text.str().find("flexjit_x86_engine"), std::string::npos);
    std::remove((base + ".cpp").c_str()), std::remove((base + ".s").c_str()), std::remove((base + ".log").c_str());
  }
}

TEST(CrossCompile, BadTargetsSayWhatIsWrong) {
  auto error_of = [](const CrossTarget& t) {
    try {
      cross_compile_cpp_to_object("extern \"C\" int f() { return 1; }", "tiny.cpp", t);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  const std::string bad_cpu = error_of({"aarch64-linux-gnu", "pentium4", {}});
  EXPECT_NE(bad_cpu.find("'pentium4' is not a CPU LLVM knows"), std::string::npos) << bad_cpu;
  const std::string x86 = error_of({"x86_64-linux-gnu", "znver4", {}});
  EXPECT_NE(x86.find("is x86; compile for other x86 CPUs with FLEXJIT_CPU_TARGET"), std::string::npos) << x86;
  const std::string bad_triple = error_of({"nonsense-triple", "generic", {}});
  EXPECT_NE(bad_triple.find("no LLVM target"), std::string::npos) << bad_triple;
  EXPECT_EQ(error_of({"aarch64-linux-gnu", "generic", {}}), "(no error)");
}

}  // namespace
}  // namespace flexjit::jit

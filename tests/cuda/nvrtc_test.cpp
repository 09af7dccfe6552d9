// LABELS: unit cuda
// jit/nvrtc + the CUDA spelling of jit/codegen: CUDA C++ compiled by NVRTC for sm_80 and sm_90,
// no GPU needed. Without NVRTC every test here is skipped, saying so.
#include "jit/nvrtc.h"
#include "tests/cuda/nvrtc_skip.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "jit/codegen.h"
#include "jit/instantiate.h"
#include "jit/parser.h"
#include "jit/types.h"
#include "score_mods/registry.h"

namespace flexjit::jit {
namespace {


const std::vector<std::string> kArchs = {"sm_80", "sm_90"};

// The self-test and the kernel bench compile on several threads at once (tools/): NVRTC must give
// each program the same CUBIN as a compile on its own.
TEST(Nvrtc, ConcurrentCompilesMatchSequentialOnes) {
  SKIP_WITHOUT_NVRTC();
  auto source = [](int i) {
    std::string s = "extern \"C\" __global__ void fj_k" + std::to_string(i) + "(float* x) { float a = x[threadIdx.x];";
    for (int j = 0; j < 24; ++j) s += " a = a * " + std::to_string(j + i) + ".5f + __expf(a * 0.01f);";
    return s + " x[threadIdx.x] = a; }\n";
  };
  constexpr int kPrograms = 6, kThreads = 6, kRounds = 2;
  std::vector<std::string> alone;
  for (int i = 0; i < kPrograms; ++i) alone.push_back(compile_cuda(source(i), "k.cu", "sm_90").cubin);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      try {
        for (int r = 0; r < kRounds; ++r)
          for (int i = 0; i < kPrograms; ++i) {
            const int p = (i + t) % kPrograms;
            if (compile_cuda(source(p), "k.cu", "sm_90").cubin != alone[size_t(p)])
              errors[size_t(t)] = "program " + std::to_string(p) + " compiled to another CUBIN";
          }
      } catch (const std::exception& e) {
        errors[size_t(t)] = e.what();
      }
    });
  for (std::thread& t : pool) t.join();
  for (const std::string& e : errors) EXPECT_EQ(e, "");
}

TEST(Nvrtc, CompilesPtxAndCubinForAmpereAndHopper) {
  SKIP_WITHOUT_NVRTC();
  EXPECT_FALSE(nvrtc_version().empty());
  const std::string src =
      "extern \"C\" __global__ void fj_probe(float* x) { x[threadIdx.x] = expf(x[threadIdx.x]); }\n";
  for (const std::string& arch : kArchs) {
    CudaCompileResult r = compile_cuda(src, "probe.cu", arch);
    EXPECT_EQ(r.arch, arch);
    EXPECT_NE(r.ptx.find(".entry fj_probe"), std::string::npos) << arch;
    EXPECT_NE(r.ptx.find(".target sm_" + arch.substr(3)), std::string::npos) << arch;
    ASSERT_GE(r.cubin.size(), 4u) << arch;
    EXPECT_EQ(r.cubin.substr(0, 4), std::string("\x7f" "ELF")) << arch;
  }
  CudaCompileResult ptx_only = compile_cuda(src, "probe.cu", "sm_90", /*want_cubin=*/false);
  EXPECT_TRUE(ptx_only.cubin.empty());
  EXPECT_NE(ptx_only.ptx.find(".entry fj_probe"), std::string::npos);
}

TEST(Nvrtc, ErrorsNameTheSourceLineAndTheArch) {
  SKIP_WITHOUT_NVRTC();
  try {
    compile_cuda("__global__ void k() {\n  undeclared_thing = 1;\n}\n", "broken.cu", "sm_90");
    FAIL() << "expected a compile error";
  } catch (const flexjit::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("broken.cu(2)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("undeclared_thing"), std::string::npos) << msg;
    EXPECT_NE(msg.find("sm_90"), std::string::npos) << msg;
  }
  try {
    compile_cuda("__global__ void k() {}\n", "k.cu", "sm_42");
    FAIL() << "expected an arch error";
  } catch (const flexjit::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("'sm_42'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("sm_90"), std::string::npos) << msg << " (the supported list)";
  }
  EXPECT_THROW(compile_cuda("__global__ void k() {}\n", "k.cu", "compute_90"), flexjit::Error);
}

TEST(Nvrtc, ParsesPtxasResourceUsage) {
  const std::string log =
      "ptxas info    : Compiling entry function 'fj_a' for 'sm_90'\n"
      "ptxas info    : Function properties for fj_a\n"
      "ptxas         .     16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
      "ptxas info    : Used 168 registers, used 1 barriers\n"
      "ptxas info    : Compiling entry function 'fj_b' for 'sm_90'\n"
      "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
      "ptxas info    : Used 40 registers\n";
  std::vector<PtxasUsage> u = parse_ptxas_usage(log);
  ASSERT_EQ(u.size(), 2u);
  EXPECT_EQ(u[0].kernel, "fj_a");
  EXPECT_EQ(u[0].registers, 168);
  EXPECT_EQ(u[0].spill_bytes, 20);
  EXPECT_EQ(u[0].stack_frame, 16);
  EXPECT_EQ(u[1].kernel, "fj_b");
  EXPECT_EQ(u[1].spill_bytes, 0);
  EXPECT_EQ(u[1].registers, 40);
}

TEST(Nvrtc, BinaryContainerRoundTripsAndRejectsDamage) {
  CudaCompileResult r;
  r.arch = "sm_90";
  r.cubin = std::string("\x7f" "ELF\0\1\2", 7);
  r.ptx = ".version 9.0\n.target sm_90\n";
  const std::string packed = pack_cuda_binary(r);
  CudaCompileResult back;
  ASSERT_TRUE(unpack_cuda_binary(packed, &back));
  EXPECT_EQ(back.arch, r.arch);
  EXPECT_EQ(back.cubin, r.cubin);
  EXPECT_EQ(back.ptx, r.ptx);
  for (size_t cut : {size_t(0), size_t(5), size_t(20), packed.size() - 1}) {
    CudaCompileResult untouched;
    EXPECT_FALSE(unpack_cuda_binary(packed.substr(0, cut), &untouched)) << cut;
    EXPECT_TRUE(untouched.cubin.empty());
  }
  EXPECT_FALSE(unpack_cuda_binary(packed + "x", &back));
  std::string lying = packed;
  lying.replace(lying.find("cubin 7"), 7, "cubin 9");
  EXPECT_FALSE(unpack_cuda_binary(lying, &back));
}

// A probe kernel around one mod set: every score goes through score_mod and mask_mod, as the
// attention kernel will call them, with FlexModArgs passed by value.
std::string probe_source(const ModSet& mods) {
  return template_text("templates/mod_abi.h") + "\n" + emit_mod_body(mods, Backend::Cuda) +
         "extern \"C\" __global__ void fj_mod_probe(float* s, int n, struct FlexModArgs m) {\n"
         "  const int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
         "  if (i >= n) return;\n"
         "  const fj_i64 q = i / 97, kv = i % 97;\n"
         "  float x = flexjit_score_mod(s[i], 0, blockIdx.y, q, kv, &m);\n"
         "  s[i] = flexjit_mask_mod(0, blockIdx.y, q, kv, &m) ? x : __int_as_float(0xff800000);\n"
         "}\n";
}

ModSet mod_set_of(const std::string& name) {
  const RegisteredMod& r = find_mod(name);
  return flexjit::mod_set_of(r.mod, r.kind);
}

TEST(NvrtcMods, EveryBuiltinModCompilesForAmpereAndHopperWithoutSpills) {
  SKIP_WITHOUT_NVRTC();
  std::vector<std::string> names = builtin_mod_names();
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    const std::string src = probe_source(mod_set_of(name));
    for (const std::string& arch : kArchs) {
      CudaCompileResult r;
      ASSERT_NO_THROW(r = compile_cuda(src, name + ".cu", arch, true, /*ptxas_verbose=*/true))
          << name << " on " << arch << ":\n" << src;
      std::vector<PtxasUsage> u = parse_ptxas_usage(r.log);
      ASSERT_EQ(u.size(), 1u) << r.log;
      EXPECT_EQ(u[0].spill_bytes, 0) << name << " " << arch << "\n" << r.log;
    }
  }
}

TEST(NvrtcMods, BufferModsOfEveryDtypeAndRankCompile) {
  SKIP_WITHOUT_NVRTC();
  // Buffers of each element type and ranks 1-3, params, integer division / modulo, casts and the
  // math functions: everything the CUDA spelling table has to cover.
  ParseScope scope;
  scope.buffers = {{"bf", DType::BF16, 1}, {"big", DType::I64, 1}, {"f", DType::F32, 3},
                   {"f64", DType::F64, 1}, {"hf", DType::F16, 2}, {"ids", DType::I32, 2}};  // sorted
  scope.params = {{"cap"}, {"w"}};
  ModSet mods;
  mods.score_mod = ir::cast(
      parse_expr("cap * tanh((score + bf[h] + hf(h, kv_idx % 7) + f64[q_idx / 3] + f(b, h, kv_idx)) / cap)"
                 " + where(ids(b, q_idx) == ids(b, kv_idx), log(abs(score) + 1.0), exp(score) - exp2(w))"
                 " + sqrt(abs(score)) + rsqrt(abs(score) + 1.0) + sigmoid(score) + floor(score) + ceil(score)"
                 " + sin(score) * cos(score) + tan(score) + log2(abs(score) + 2.0) + float(big[kv_idx] % 5)"
                 " + float(min(q_idx, kv_idx)) - max(score, -1.0)"
                 // T5's bucket: int32 index math, a where() analysed per branch, a clamped
                 // float -> int32 conversion and an int32-indexed reader (jit/codegen narrowing)
                 " + f(b, h, int(kv_idx > q_idx) * 16 + where(abs(kv_idx - q_idx) < 8, abs(kv_idx - q_idx),"
                 " min(8 + int(log(float(abs(kv_idx - q_idx)) / 8.0) / 2.7725887 * 8.0), 15)))",
                 scope),
      ir::Type::Float);
  ParseScope mask_scope = scope;
  mask_scope.allow_score = false;
  mods.mask_mod = ir::cast(
      parse_expr("(q_idx >= kv_idx && q_idx - kv_idx < int(w)) || !(ids(b, kv_idx) > 0)", mask_scope),
      ir::Type::Bool);
  mods.buffers = scope.buffers;
  mods.params = scope.params;
  const std::string src = probe_source(mods);
  EXPECT_EQ(src.find("__builtin_"), std::string::npos) << "a CPU spelling leaked into CUDA code";
  EXPECT_NE(src.find("__ldg("), std::string::npos);
  EXPECT_NE(src.find("fj_f2i32("), std::string::npos) << "the bucket's conversion was not narrowed";
  EXPECT_NE(src.find("_32(((int)b)"), std::string::npos) << "no int32-indexed buffer read";
  for (const std::string& arch : kArchs)
    EXPECT_NO_THROW(compile_cuda(src, "buffers.cu", arch)) << arch << ":\n" << src;
}

}  // namespace
}  // namespace flexjit::jit

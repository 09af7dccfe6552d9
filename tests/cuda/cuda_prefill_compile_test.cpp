// LABELS: cuda
// The CUDA prefill template (templates/cuda/flash_prefill.cuh) through the real instantiation
// and NVRTC, for sm_80 and sm_90, with no GPU: it compiles with every built-in mod and with
// buffer mods, the default configurations use no local memory (no spills, no stack), and the
// spec checks reject what the kernel cannot do. Running it needs a GPU (scripts/gpu_check.sh).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "jit/instantiate.h"
#include "jit/nvrtc.h"
#include "tests/cuda/nvrtc_skip.h"
#include "jit/parser.h"
#include "jit/types.h"
#include "runtime/cuda_decode.h"
#include "runtime/cuda_prefill.h"
#include "score_mods/registry.h"
#include "tests/support/wgmma_probe.h"

namespace flexjit::jit {
namespace {


KernelSpec cuda_spec(DType dtype, int d, int dv, const std::string& arch, int group = 1) {
  KernelSpec s;
  s.backend = Backend::Cuda;
  s.kind = KernelKind::Prefill;
  s.dtype = dtype;
  s.head_dim = d;
  s.head_dim_v = dv;
  s.block_m = 64;
  s.block_n = 64;
  s.gqa_group = group;
  s.arch = arch;
  s.kv_stages = 2;
  return s;
}

ModSet mod_set_of(const std::string& name) {
  const RegisteredMod& r = find_mod(name);
  return flexjit::mod_set_of(r.mod, r.kind);
}

struct Built {
  CudaCompileResult r;
  PtxasUsage usage;        // the main entry's
  PtxasUsage merge_usage;  // decode: the merge entry's
};

Built build(const KernelSpec& spec, const ModSet& mods) {
  Instantiation inst = plan(spec, mods);
  std::string src = make_source(spec, mods, inst.symbol);
  Built b;
  b.r = compile_cuda(src, inst.symbol + ".cu", spec.arch, true, /*ptxas_verbose=*/true);
  std::vector<PtxasUsage> u = parse_ptxas_usage(b.r.log);
  const bool decode = spec.kind == KernelKind::Decode;
  EXPECT_EQ(u.size(), decode ? 2u : 1u) << b.r.log;
  for (const PtxasUsage& e : u) (e.kernel == inst.symbol ? b.usage : b.merge_usage) = e;
  EXPECT_EQ(b.usage.kernel, inst.symbol);
  if (decode) {
    EXPECT_EQ(b.merge_usage.kernel, cuda_merge_symbol(inst.symbol));
    EXPECT_NE(b.r.ptx.find(".entry " + cuda_merge_symbol(inst.symbol)), std::string::npos);
  }
  EXPECT_NE(b.r.ptx.find(".entry " + inst.symbol), std::string::npos);
  if (spec.engine == PrefillEngine::Wgmma) {
    EXPECT_NE(b.r.ptx.find("wgmma.mma_async.sync.aligned.m64n"), std::string::npos);
    EXPECT_NE(b.r.ptx.find("fence.proxy.async.shared::cta"), std::string::npos);
  } else {
    EXPECT_NE(b.r.ptx.find("mma.sync.aligned.m16n8k16"), std::string::npos);
    EXPECT_NE(b.r.ptx.find("ldmatrix.sync.aligned"), std::string::npos);
  }
  EXPECT_NE(b.r.ptx.find("cp.async"), std::string::npos);
  std::printf("  %s: %d registers, %ld spill bytes, %ld stack, %zu-byte CUBIN, %.0f ms\n", inst.symbol.c_str(),
              b.usage.registers, b.usage.spill_bytes, b.usage.stack_frame, b.r.cubin.size(), b.r.compile_ms);
  return b;
}

TEST(CudaPrefillCompile, DefaultConfigurationsCompileWithoutLocalMemory) {
  SKIP_WITHOUT_NVRTC();
  const ModSet causal = mod_set_of("causal");
  for (const std::string& arch : {std::string("sm_80"), std::string("sm_90")})
    for (DType dt : {DType::BF16, DType::F16})
      for (int d : {64, 128}) {
        SCOPED_TRACE(arch + " " + dtype_name(dt) + " D" + std::to_string(d));
        // What plan_cuda_prefill picks there, and FA2's 128-row tile (4 warps of two m16 tiles).
        for (int block_m : {0, 128}) {
          Built b = build(cuda_prefill_kernel_spec(dt, d, d, 1, cuda_device_info_for_arch(arch), block_m), causal);
          EXPECT_EQ(b.usage.spill_bytes, 0) << b.r.log;
          EXPECT_EQ(b.usage.stack_frame, 0) << b.r.log;
        }
        Built b = build(cuda_prefill_kernel_spec(dt, d, d, 1, cuda_device_info_for_arch(arch)), causal);
        EXPECT_EQ(b.usage.spill_bytes, 0) << b.r.log;
        EXPECT_EQ(b.usage.stack_frame, 0) << b.r.log;
      }
}

TEST(CudaPrefillCompile, EveryBuiltinModCompiles) {
  SKIP_WITHOUT_NVRTC();
  for (const std::string& name : builtin_mod_names()) {
    SCOPED_TRACE(name);
    Built b = build(cuda_prefill_kernel_spec(DType::BF16, 128, 128, 4, cuda_device_info_for_arch("sm_90")),
                    mod_set_of(name));
    EXPECT_EQ(b.usage.spill_bytes, 0) << name << "\n" << b.r.log;
  }
}

// The wgmma engine (templates/cuda/flash_prefill_wgmma.cuh) for sm_90a as plan_cuda_prefill picks
// it (BLOCK 128 x 128 up to D 128, 128 x 64 above), with every built-in mod at D 128 and with its
// other tiles: no local memory. The registers per thread are printed (255 is the ceiling at 256
// threads per CTA).
TEST(CudaPrefillCompile, WgmmaEngineCompilesForSm90aWithoutLocalMemory) {
  SKIP_WITHOUT_NVRTC();
  const CudaDeviceInfo h100 = cuda_device_info_for_arch("sm_90");
  for (const std::string& name : builtin_mod_names())
    for (int use_wgmma : {1, 2}) {  // 2: the pipelined schedule, three stages
    SCOPED_TRACE(name + " USE_WGMMA=" + std::to_string(use_wgmma));
    Built b = build(cuda_prefill_kernel_spec(DType::BF16, 128, 128, 4, h100, 0, 0, use_wgmma), mod_set_of(name));
    // ptxas says when it had to serialise the warpgroup MMAs (a performance loss, not an error).
    EXPECT_EQ(b.r.log.find("wgmma.mma_async instructions are serialized"), std::string::npos) << b.r.log;
    EXPECT_EQ(b.usage.spill_bytes, 0) << name << "\n" << b.r.log;
    EXPECT_EQ(b.usage.stack_frame, 0) << name << "\n" << b.r.log;
    }
  const ModSet causal = mod_set_of("causal");
  for (DType dt : {DType::BF16, DType::F16})
    for (int d : {64, 128, 256})
      for (auto [bm, bn] : {std::pair<int, int>{0, 0}, {64, 64}, {64, d <= 128 ? 128 : 64}}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " D" + std::to_string(d) + " " + std::to_string(bm) + "x" +
                     std::to_string(bn));
        Built b = build(cuda_prefill_kernel_spec(dt, d, d, 1, h100, bm, bn, 1), causal);
        EXPECT_EQ(b.usage.spill_bytes, 0) << b.r.log;
        EXPECT_EQ(b.usage.stack_frame, 0) << b.r.log;
        if (bm == 0) {  // the pipelined schedule's default tile
          Built p = build(cuda_prefill_kernel_spec(dt, d, d, 1, h100, 0, 0, 2), causal);
          EXPECT_EQ(p.usage.spill_bytes, 0) << p.r.log;
          EXPECT_EQ(p.usage.stack_frame, 0) << p.r.log;
        }
      }
}

// The wgmma layout probe the GPU self-test runs (tests/support/wgmma_probe.h) compiles for sm_90a.
TEST(CudaPrefillCompile, WgmmaLayoutProbeCompilesForSm90a) {
  SKIP_WITHOUT_NVRTC();
  const std::string src = testing::wgmma_probe_source();
  const CudaCompileResult r = compile_cuda(src, "wgmma_probe.cu", "sm_90a");
  EXPECT_NE(r.ptx.find(".entry " + std::string(testing::kWgmmaProbeSymbol)), std::string::npos);
  EXPECT_NE(r.ptx.find("wgmma.mma_async.sync.aligned.m64n128k16"), std::string::npos);
  EXPECT_NE(r.ptx.find("wgmma.mma_async.sync.aligned.m64n64k16"), std::string::npos);
}

TEST(CudaPrefillCompile, OddHeadDimsGqaAndBufferModsCompile) {
  SKIP_WITHOUT_NVRTC();
  ParseScope scope;
  scope.buffers = {{"bias", DType::BF16, 2}, {"doc", DType::I32, 1}};
  scope.params = {{"cap"}};
  ModSet mods;
  mods.score_mod = ir::cast(parse_expr("cap * tanh(score / cap) + bias(h, kv_idx % 64)", scope), ir::Type::Float);
  ParseScope mask_scope = scope;
  mask_scope.allow_score = false;
  mods.mask_mod = ir::cast(parse_expr("doc[q_idx] == doc[kv_idx] && q_idx >= kv_idx", mask_scope), ir::Type::Bool);
  mods.buffers = scope.buffers;
  mods.params = scope.params;
  build(cuda_spec(DType::BF16, 80, 80, "sm_80", 3), mods);      // D not a power of two, GQA 3
  build(cuda_spec(DType::F16, 128, 64, "sm_90", 1), mods);      // Dv != D
  Built big = build(cuda_spec(DType::BF16, 256, 256, "sm_90", 1), mods);  // the largest D
  (void)big;  // D=256 holds 128 fp32 output accumulators per thread: reported above, not bounded
  KernelSpec one = cuda_spec(DType::BF16, 64, 64, "sm_80", 8);
  one.kv_stages = 1;
  one.block_m = 128;
  build(one, mods);
}

KernelSpec decode_spec(DType dtype, int d, int dv, const std::string& arch, int group) {
  KernelSpec s = cuda_spec(dtype, d, dv, arch, group);
  s.kind = KernelKind::Decode;
  s.block_m = 16;
  s.block_n = 32;
  s.warps = 4;
  return s;
}

// The decode kernels (partitions + merge, templates/cuda/flash_decode.cuh) as runtime/cuda_decode
// plans them for an H100 / A100: no local memory in the default configurations.
TEST(CudaDecodeCompile, DefaultConfigurationsCompileWithoutLocalMemory) {
  SKIP_WITHOUT_NVRTC();
  const ModSet causal = mod_set_of("causal");
  for (const std::string& arch : {std::string("sm_80"), std::string("sm_90")})
    for (DType dt : {DType::BF16, DType::F16})
      for (int d : {64, 128}) {
        SCOPED_TRACE(arch + " " + dtype_name(dt) + " D" + std::to_string(d));
        Built b = build(decode_spec(dt, d, d, arch, 4), causal);
        EXPECT_EQ(b.usage.spill_bytes, 0) << b.r.log;
        EXPECT_EQ(b.usage.stack_frame, 0) << b.r.log;
        EXPECT_EQ(b.merge_usage.spill_bytes, 0) << b.r.log;
      }
}

TEST(CudaDecodeCompile, EveryBuiltinModAndOddShapesCompile) {
  SKIP_WITHOUT_NVRTC();
  for (const std::string& name : builtin_mod_names()) {
    SCOPED_TRACE(name);
    Built b = build(decode_spec(DType::BF16, 128, 128, "sm_90", 8), mod_set_of(name));
    EXPECT_EQ(b.usage.spill_bytes, 0) << name << "\n" << b.r.log;
  }
  KernelSpec odd = decode_spec(DType::F16, 80, 64, "sm_80", 3);
  odd.kv_stages = 1;
  odd.warps = 2;
  build(odd, mod_set_of("alibi"));
  KernelSpec big = decode_spec(DType::BF16, 256, 256, "sm_90", 1);
  big.kv_stages = 1;
  build(big, mod_set_of("softcap"));
}

// fp32 K/V: the CUDA-core decode kernel, as the planner picks it, with no local memory.
TEST(CudaDecodeCompile, Fp32KernelCompilesWithoutLocalMemory) {
  SKIP_WITHOUT_NVRTC();
  for (const std::string& arch : {std::string("sm_80"), std::string("sm_90")})
    for (int d : {64, 128}) {
      SCOPED_TRACE(arch + " fp32 D" + std::to_string(d));
      const KernelSpec s = cuda_decode_kernel_spec(DType::F32, d, d, 4, cuda_device_info_for_arch(arch));
      Instantiation inst = plan(s, mod_set_of("alibi"));
      CudaCompileResult r = compile_cuda(make_source(s, mod_set_of("alibi"), inst.symbol), inst.symbol + ".cu", arch,
                                         true, /*ptxas_verbose=*/true);
      for (const PtxasUsage& u : parse_ptxas_usage(r.log)) {
        std::printf("  %s: %d registers, %ld spill bytes, %ld stack\n", u.kernel.c_str(), u.registers, u.spill_bytes,
                    u.stack_frame);
        EXPECT_EQ(u.spill_bytes, 0) << r.log;
        EXPECT_EQ(u.stack_frame, 0) << r.log;
      }
    }
}

TEST(CudaPrefillCompile, KeysAndSpecChecks) {
  SKIP_WITHOUT_NVRTC();
  const ModSet causal = mod_set_of("causal");
  KernelSpec s = cuda_spec(DType::BF16, 128, 128, "sm_90");
  Instantiation a = plan(s, causal);
  EXPECT_EQ(a.symbol.rfind("flexjit_cuda_prefill_bf16_d128_m64_n64_g1_sm_90_", 0), 0u) << a.symbol;
  KernelSpec t = s;
  t.arch = "sm_80";
  EXPECT_NE(plan(t, causal).key, a.key);
  // The mods are inlined: another mod is another binary (unlike the CPU attention kernel).
  EXPECT_NE(plan(s, mod_set_of("alibi")).key, a.key);
  KernelSpec cpu = s;
  cpu.backend = Backend::Cpu;
  cpu.dtype = DType::F32;
  EXPECT_NE(plan(cpu, causal).key, a.key);
  EXPECT_EQ(cuda_prefill_smem_bytes(s), 2 * (64 * 136 + 2 * 64 * (136 + 136)));

  auto rejects = [&](KernelSpec bad, const std::string& words) {
    try {
      plan(bad, causal);
      ADD_FAILURE() << "accepted " << bad.str();
    } catch (const flexjit::Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  KernelSpec bad = s;
  bad.dtype = DType::F32;
  rejects(bad, "bf16 or fp16");
  bad = s;
  bad.head_dim = 72 + 4;
  rejects(bad, "multiples of 8");
  bad = s;
  bad.block_m = 24;
  rejects(bad, "BLOCK_M");
  bad = s;
  bad.arch = "";
  rejects(bad, "arch");
  bad = s;
  bad.kind = KernelKind::Backward;
  rejects(bad, "backward kernel runs on CPU");
  bad = s;
  bad.kind = KernelKind::Decode;  // BLOCK_M 64: the decode row tile is 16
  rejects(bad, "CUDA decode: BLOCK_M 16");
  bad.block_m = 16;
  bad.warps = 9;
  rejects(bad, "1..8 warps");
}

}  // namespace
}  // namespace flexjit::jit

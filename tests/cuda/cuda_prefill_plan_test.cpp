// LABELS: unit cuda
// Host-side planning of a CUDA prefill launch (runtime/cuda_prefill): grid, threads, shared
// memory, the parameter block and every rejection, on a CPU. The views' pointers stand in for
// device pointers: planning never dereferences them.
#include "runtime/cuda_prefill.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "jit/parser.h"

namespace flexjit {
namespace {

alignas(64) unsigned char g_fake[1 << 12];  // a 16-byte aligned "device" address

TensorView view4(DType dt, int64_t a, int64_t b, int64_t c, int64_t d, void* data = g_fake) {
  TensorView t;
  t.data = data;
  t.dtype = dt;
  t.rank = 4;
  t.sizes[0] = a, t.sizes[1] = b, t.sizes[2] = c, t.sizes[3] = d;
  t.strides[3] = 1, t.strides[2] = d, t.strides[1] = c * d, t.strides[0] = b * c * d;
  return t;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct Call {
  TensorView q = view4(DType::BF16, 2, 32, 1000, 128);
  TensorView k = view4(DType::BF16, 2, 8, 1500, 128);
  TensorView v = view4(DType::BF16, 2, 8, 1500, 128);
  TensorView out = view4(DType::BF16, 2, 32, 1000, 128);
  ModSet mods;
  ModBindings bind;
  AttentionOptions opt;
  CudaDeviceInfo dev;
  CudaPrefillPlan plan(const FlexBlockMaskArgs* mask = nullptr, const TensorView* lse = nullptr) {
    opt.enable_gqa = true;
    return plan_cuda_prefill(q, k, v, out, lse, mods, bind, mask, opt, dev, nullptr);
  }
};

TEST(CudaPrefillPlan, GridThreadsSharedMemoryAndArgs) {
  Call c;
  CudaPrefillPlan p = c.plan();
  EXPECT_EQ(p.spec.backend, jit::Backend::Cuda);
  EXPECT_EQ(p.spec.gqa_group, 4);
  EXPECT_EQ(p.spec.block_m, 64);
  EXPECT_EQ(p.spec.warps, 4);
  EXPECT_EQ(p.spec.block_n, 64);
  EXPECT_EQ(p.spec.kv_stages, 2);
  EXPECT_EQ(p.spec.arch, "sm_90");
  EXPECT_EQ(p.grid[0], 16u);  // ceil(1000 / 64)
  EXPECT_EQ(p.grid[1], 32u);
  EXPECT_EQ(p.grid[2], 2u);
  EXPECT_EQ(p.block_threads, 128u);
  EXPECT_EQ(p.smem_bytes, jit::cuda_prefill_smem_bytes(p.spec));
  EXPECT_EQ(p.smem_bytes, 2 * (64 * 136 + 2 * 64 * (136 + 136)));
  EXPECT_EQ(p.args.Lq, 1000);
  EXPECT_EQ(p.args.Lkv, 1500);
  EXPECT_EQ(p.args.Hkv, 8);
  EXPECT_EQ(p.args.k_strides[2], 128);
  EXPECT_EQ(p.args.k_strides[1], 1500 * 128);
  EXPECT_FLOAT_EQ(p.args.scale, 1.0f / std::sqrt(128.0f));
  EXPECT_EQ(p.args.mask.kv_num_blocks, nullptr);
  EXPECT_EQ(p.args.lse, nullptr);
  EXPECT_NE(p.describe().find("grid 16x32x2, 128 threads"), std::string::npos) << p.describe();
  c.opt.block_m = 128;  // FA2's tile: 4 warps of two m16 tiles, 32-key blocks at D 128
  EXPECT_EQ(c.plan().spec.warps, 4);
  EXPECT_EQ(c.plan().spec.block_n, 32);
  EXPECT_EQ(c.plan().block_threads, 128u);
  c.opt.block_m = 32;
  EXPECT_EQ(c.plan().spec.warps, 2);
  EXPECT_EQ(c.plan().block_threads, 64u);
  c.opt.block_m = 0;
  c.opt.scale = 0.25;
  EXPECT_FLOAT_EQ(c.plan().args.scale, 0.25f);
}

TEST(CudaPrefillPlan, SharedMemoryFallsBackToOneStageThenSmallerBlocks) {
  Call c;
  c.q = view4(DType::F16, 1, 4, 300, 256);
  c.k = c.v = view4(DType::F16, 1, 4, 300, 256);
  c.out = view4(DType::F16, 1, 4, 300, 256);
  c.dev.arch = "sm_86";
  c.dev.max_smem_optin = 101376;  // 99 KiB
  CudaPrefillPlan p = c.plan();  // D=256: two stages need 198 KiB, one stage exactly 99
  EXPECT_EQ(p.spec.block_n, 64);
  EXPECT_EQ(p.spec.kv_stages, 1);
  EXPECT_EQ(p.smem_bytes, 101376);
  c.dev.max_smem_optin = 90000;  // then 32-key blocks, one stage
  p = c.plan();
  EXPECT_EQ(p.spec.block_n, 32);
  EXPECT_EQ(p.spec.kv_stages, 1);
  EXPECT_LE(p.smem_bytes, c.dev.max_smem_optin);
  EXPECT_EQ(p.smem_bytes, jit::cuda_prefill_smem_bytes(p.spec));
  c.dev.max_smem_optin = 48 * 1024;
  c.opt.block_n = 64;  // the user's choice is kept, and then cannot fit
  EXPECT_NE(error_of([&] { c.plan(); }).find("shared memory"), std::string::npos);
}

TEST(CudaPrefillPlan, BlockMaskLseModsAndTheirChecks) {
  Call c;
  int nb[1] = {0};
  FlexBlockMaskArgs m{};
  m.kv_num_blocks = nb;
  m.kv_indices = nb;
  m.B = 1, m.H = 1, m.q_blocks = 8, m.kv_blocks = 12, m.q_block_size = 128, m.kv_block_size = 128;
  TensorView lse;
  lse.data = g_fake, lse.dtype = DType::F32, lse.rank = 3;
  lse.sizes[0] = 2, lse.sizes[1] = 32, lse.sizes[2] = 1000;
  lse.strides[2] = 1, lse.strides[1] = 1000, lse.strides[0] = 32000;
  CudaPrefillPlan p = c.plan(&m, &lse);
  EXPECT_EQ(p.args.mask.kv_num_blocks, nb);
  EXPECT_EQ(p.args.mask.kv_block_size, 128);
  EXPECT_EQ(p.args.lse_strides[1], 1000);
  EXPECT_EQ(p.spec.block_m, 64);
  m.q_block_size = 32;  // default tiles shrink to tile the mask's blocks
  m.q_blocks = 32;
  m.kv_block_size = 48;
  m.kv_blocks = 32;
  p = c.plan(&m);
  EXPECT_EQ(p.spec.block_m, 32);
  EXPECT_EQ(p.spec.warps, 2);
  EXPECT_EQ(p.spec.block_n, 16);
  m.q_block_size = 128;
  m.q_blocks = 8;
  m.kv_block_size = 100;  // no kernel block (a multiple of 16) tiles it
  m.kv_blocks = 15;
  EXPECT_NE(error_of([&] { c.plan(&m); }).find("multiples of the kernel's BLOCK_M x BLOCK_N"), std::string::npos);
  m.kv_block_size = 128;
  m.kv_blocks = 12;
  m.q_blocks = 2;  // covers 256 query rows, the call has 1000
  EXPECT_NE(error_of([&] { c.plan(&m); }).find("build it for this call's lengths"), std::string::npos);
  m.q_blocks = 8;
  m.H = 5;
  EXPECT_NE(error_of([&] { c.plan(&m); }).find("must be 1 or the call's"), std::string::npos);

  // Buffers and params travel in the parameter block, in ModSet order.
  ParseScope scope;
  scope.buffers = {{"slopes", DType::F32, 1}};
  scope.params = {{"cap"}};
  c.mods.score_mod = ir::cast(parse_expr("cap * tanh(score / cap) + slopes[h]", scope), ir::Type::Float);
  c.mods.buffers = scope.buffers;
  c.mods.params = scope.params;
  float slopes_dev[32];
  TensorView sl;
  sl.data = slopes_dev, sl.dtype = DType::F32, sl.rank = 1, sl.sizes[0] = 32, sl.strides[0] = 1;
  EXPECT_NE(error_of([&] { c.plan(); }).find("no tensor is bound"), std::string::npos);
  c.bind.buffers = {{"slopes", sl}};
  c.bind.params = {{"cap", 30.0}};
  p = c.plan();
  EXPECT_EQ(p.args.buffers[0].data, slopes_dev);
  EXPECT_EQ(p.args.buffers[0].sizes[0], 32);
  EXPECT_FLOAT_EQ(p.args.params[0], 30.0f);
}

TEST(CudaPrefillPlan, RejectsWhatTheKernelCannotRun) {
  auto rejects = [](const std::function<void(Call&)>& change, const std::string& words) {
    Call c;
    change(c);
    const std::string msg = error_of([&] { c.plan(); });
    EXPECT_NE(msg.find(words), std::string::npos) << "expected '" << words << "', got: " << msg;
  };
  rejects([](Call& c) { c.q.dtype = c.k.dtype = c.v.dtype = c.out.dtype = DType::F32; }, "bf16 or fp16");
  rejects([](Call& c) { c.k.dtype = DType::F16; }, "share one dtype");
  rejects([](Call& c) { c.q.strides[3] = 2; }, "last dim must be contiguous");
  rejects([](Call& c) { c.k.data = g_fake + 2; }, "16-byte aligned");
  rejects([](Call& c) { c.v.strides[2] = 132; }, "16-byte aligned");
  rejects([](Call& c) {
    c.q = view4(DType::BF16, 2, 32, 1000, 100);
    c.k = c.v = view4(DType::BF16, 2, 8, 1500, 100);
    c.out = view4(DType::BF16, 2, 32, 1000, 100);
  }, "multiples of 8");
  rejects([](Call& c) { c.k = c.v = view4(DType::BF16, 2, 6, 1500, 128); }, "multiple of Hkv");
  rejects([](Call& c) { c.k = c.v = view4(DType::BF16, 3, 8, 1500, 128); }, "1 or q's batch");
  rejects([](Call& c) { c.out = view4(DType::BF16, 2, 32, 999, 128); }, "out must be [B, Hq, Lq, Dv]");
  rejects([](Call& c) { c.opt.block_m = 24; }, "BLOCK_M must be a multiple of 16");
  Call c;
  c.opt.enable_gqa = false;
  EXPECT_NE(error_of([&] {
              plan_cuda_prefill(c.q, c.k, c.v, c.out, nullptr, c.mods, c.bind, nullptr, c.opt, c.dev, nullptr);
            }).find("enable_gqa"),
            std::string::npos);
}

}  // namespace
}  // namespace flexjit

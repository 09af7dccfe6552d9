// LABELS: numerics emulated
// The CUDA prefill kernel (templates/cuda/flash_prefill.cuh, mods inlined) run on the CPU under
// the CUDA emulator (tests/support/cuda_emulator.h) against the float64 reference: odd lengths,
// D 64 / 80 / 128 / 256, Dv != D, GQA 3, every built-in mod, block masks with partial and full
// blocks, fully masked rows, bf16 and fp16, through the real planning (runtime/cuda_prefill).
// The kernel's text is the one NVRTC compiles, with emulate.cuh in front; what this proves and
// what only a GPU can is in the emulator's header.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/block_mask.h"
#include "runtime/cuda_prefill.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/support/cuda_emulated_kernels.h"
#include "tests/support/cuda_emulator.h"
#include "tests/support/numerics.h"

namespace flexjit {
namespace {

namespace emu = testing::cuda_emulator;
using EntryFn = void (*)(FlexCudaPrefillArgs);

struct Case {
  DType dtype = DType::BF16;
  int D = 64, Dv = 64;
  int64_t Lq = 17, Lkv = 17;
  int B = 1, Bkv = 1, Hq = 1, Hkv = 1;
  std::string score_mod, mask_mod;  // registered names or expression text
  bool strided = false;             // memory [B, L, H, D], viewed as [B, H, L, D]
  int block_m = 0, block_n = 0;     // kernel options (0 = 64)
  int64_t mask_block = 0;           // BlockMask block size (0: no block mask)
  double scale = 0;                 // 0 = 1/sqrt(D)
  int smem_optin = 0;               // the device's shared memory limit (0 = an H100's)
  bool corrupt_mask = false;        // a count and an index out of range: flagged and skipped, never read
  int wgmma = 0;                    // the kernel option USE_WGMMA (1: the sm_90a wgmma engine, 2: pipelined)
};

std::string name_of(const Case& c) {
  std::string n = std::string(dtype_name(c.dtype)) + "_D" + std::to_string(c.D);
  if (c.Dv != c.D) n += "_Dv" + std::to_string(c.Dv);
  n += "_Lq" + std::to_string(c.Lq) + "_Lkv" + std::to_string(c.Lkv);
  n += "_B" + std::to_string(c.B) + (c.Bkv != c.B ? "x" + std::to_string(c.Bkv) : "");
  n += "_H" + std::to_string(c.Hq) + "x" + std::to_string(c.Hkv);
  auto clean = [](std::string s) {
    std::string o;
    for (char ch : s) o += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
    return o.substr(0, 24);
  };
  if (!c.score_mod.empty()) n += "_s_" + clean(c.score_mod);
  if (!c.mask_mod.empty()) n += "_m_" + clean(c.mask_mod);
  if (c.strided) n += "_strided";
  if (c.block_m) n += "_bm" + std::to_string(c.block_m) + "x" + std::to_string(c.block_n);
  if (c.mask_block) n += "_mb" + std::to_string(c.mask_block);
  if (c.scale != 0) n += c.scale < 0 ? "_negscale" : "_scale";
  if (c.smem_optin) n += "_smem" + std::to_string(c.smem_optin / 1024) + "k";
  if (c.corrupt_mask) n += "_corrupt";
  if (c.wgmma) n += c.wgmma == 2 ? "_wgmma2" : "_wgmma";
  return n;
}

void PrintTo(const Case& c, std::ostream* os) { *os << name_of(c); }

emu::Range range_of(const OwnedTensor& t) { return {t.bytes->data(), t.bytes->size()}; }

void run_case(const Case& c) {
  SCOPED_TRACE(name_of(c));
  OwnedTensor q = testing::make_tensor(c.dtype, c.B, c.Hq, c.Lq, c.D, c.strided, 11);
  OwnedTensor k = testing::make_tensor(c.dtype, c.Bkv, c.Hkv, c.Lkv, c.D, c.strided, 22);
  OwnedTensor v = testing::make_tensor(c.dtype, c.Bkv, c.Hkv, c.Lkv, c.Dv, c.strided, 33);
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {c.B, c.Hq, c.Lq, c.Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {c.B, c.Hq, c.Lq});
  std::memset(out.bytes->data(), 0x7f, out.bytes->size());  // every element must be written
  std::memset(lse.bytes->data(), 0x7f, lse.bytes->size());
  ShapeInfo shape{c.B, c.Hq, c.Hkv, c.Lq, c.Lkv};
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  if (!c.score_mod.empty()) sm = testing::resolve_mod(c.score_mod, ModKind::Score, shape, &storage);
  if (!c.mask_mod.empty()) mm = testing::resolve_mod(c.mask_mod, ModKind::Mask, shape, &storage);
  auto [mods, bind] = combine(c.score_mod.empty() ? nullptr : &sm, c.mask_mod.empty() ? nullptr : &mm);

  AttentionOptions opt;
  opt.enable_gqa = c.Hq != c.Hkv;
  opt.block_m = c.block_m;
  opt.block_n = c.block_n;
  opt.use_wgmma = c.wgmma;
  if (c.scale != 0) opt.scale = c.scale;
  runtime::BlockMask mask;
  FlexBlockMaskArgs mask_args{};
  const FlexBlockMaskArgs* mp = nullptr;
  if (c.mask_block && mods.has_mask_mod()) {
    mask = runtime::create_block_mask(mods, bind, c.B, c.Hq, c.Lq, c.Lkv, c.mask_block, c.mask_block);
    mask_args = runtime::kernel_args(mask);
    mp = &mask_args;
  }
  std::vector<int> bad_num, bad_idx;  // a device mask the host never checked, gone wrong
  if (c.corrupt_mask) {
    const size_t rows = size_t(mask_args.B * mask_args.H * mask_args.q_blocks);
    bad_num.assign(mask_args.kv_num_blocks, mask_args.kv_num_blocks + rows);
    bad_idx.assign(mask_args.kv_indices, mask_args.kv_indices + rows * size_t(mask_args.kv_indices_stride));
    bad_num[0] = int(mask_args.kv_indices_stride) + 7;
    bad_idx[size_t(mask_args.kv_indices_stride)] = int(mask_args.kv_blocks) + 3;  // row 1's first entry
    mask_args.kv_num_blocks = bad_num.data();
    mask_args.kv_indices = bad_idx.data();
  }
  CudaDeviceInfo dev;
  if (c.smem_optin) dev.max_smem_optin = c.smem_optin;
  int error_flag = 0;
  CudaPrefillPlan plan = plan_cuda_prefill(q.view, k.view, v.view, out.view, &lse.view, mods, bind, mp, opt, dev,
                                           &error_flag);
  const auto t0 = std::chrono::steady_clock::now();
  const auto fn = reinterpret_cast<EntryFn>(testing::emulated_entry(plan.spec, mods));
  const auto t1 = std::chrono::steady_clock::now();
  const emu::Launch launch =
      testing::emulated_launch(plan.grid, plan.block_threads, plan.smem_bytes, {range_of(q), range_of(k), range_of(v)});
  emu::Stats stats;
  const std::string err = emu::run(launch, [&] { fn(plan.args); }, &stats);
  const auto t2 = std::chrono::steady_clock::now();
  std::printf("  %s: compile %.0f ms, emulated %llu CTAs (%llu collectives, %llu ldmatrix phases) in %.0f ms\n",
              plan.describe().c_str(), std::chrono::duration<double, std::milli>(t1 - t0).count(),
              (unsigned long long)stats.ctas, (unsigned long long)stats.collectives,
              (unsigned long long)stats.ldmatrix_phases, std::chrono::duration<double, std::milli>(t2 - t1).count());
  ASSERT_EQ(err, "") << "the emulated kernel failed";
  // The padded / swizzled shared layouts exist so that ldmatrix never conflicts on banks.
  EXPECT_EQ(stats.ldmatrix_conflicted_phases, 0u) << "of " << stats.ldmatrix_phases << " ldmatrix phases, worst "
                                                  << stats.ldmatrix_worst_ways << "-way: " << plan.describe();
  if (c.corrupt_mask) {
    EXPECT_EQ(error_flag, 2) << "a bad block mask raises bit 2";
    return;  // the rows it touched are undefined; nothing was read out of bounds
  }
  EXPECT_EQ(error_flag, 0) << "a mod flagged an out-of-range buffer index";
  EXPECT_EQ(plan.spec.engine == PrefillEngine::Wgmma, c.wgmma >= 1) << plan.describe();
  if (c.wgmma == 2) EXPECT_EQ(plan.spec.kv_stages, 3) << "the pipelined schedule runs on three stages";

  const double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(c.D));
  RefResult gold = reference_attention(q.view, k.view, v.view, mods, bind, scale);
  RefResult base = reference_attention(q.view, k.view, v.view, mods, bind, scale, /*fp32=*/true);
  testing::expect_matches_reference(out.view, &lse.view, gold, base, c.dtype);
}

class CudaEmulated : public ::testing::TestWithParam<Case> {};
TEST_P(CudaEmulated, MatchesFloat64Reference) { run_case(GetParam()); }

// Odd lengths, D not a power of two and up to 256, GQA group 3, bf16 and fp16.
std::vector<Case> shape_cases() {
  std::vector<Case> out;
  for (DType dt : {DType::BF16, DType::F16})
    for (int D : {64, 80, 128, 256})
      for (int64_t L : {1, 17, 97, 129}) {
        Case c;
        c.dtype = dt;
        c.D = c.Dv = D;
        c.Lq = c.Lkv = L;
        c.Hq = 3;
        c.Hkv = 1;
        out.push_back(c);
      }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Shapes, CudaEmulated, ::testing::ValuesIn(shape_cases()),
                         [](const auto& info) { return name_of(info.param); });

// Every registered built-in, alone, with GQA and batch 2.
std::vector<Case> builtin_cases() {
  std::vector<Case> out;
  for (const std::string& name : builtin_mod_names()) {
    Case c;
    c.D = c.Dv = 80;
    c.Lq = 129;
    c.Lkv = 300;
    c.B = c.Bkv = 2;
    c.Hq = 6;
    c.Hkv = 2;
    (find_mod(name).kind == ModKind::Score ? c.score_mod : c.mask_mod) = name;
    out.push_back(c);
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Builtins, CudaEmulated, ::testing::ValuesIn(builtin_cases()),
                         [](const auto& info) { return name_of(info.param); });

std::vector<Case> special_cases() {
  std::vector<Case> out;
  Case c;
  c.Hq = c.Hkv = 2;
  // Lq != Lkv both ways; one query against 4097 keys.
  for (auto [lq, lkv] : {std::pair<int64_t, int64_t>{17, 97}, {97, 1}, {1, 4097}, {129, 1000}}) {
    Case x = c;
    x.Lq = lq;
    x.Lkv = lkv;
    out.push_back(x);
  }
  {  // 4097 x 4097, causal through a block mask: 65 query blocks, ~2100 KV blocks (~2 s emulated,
     // ~23 s for the two references)
    Case x;
    x.Lq = x.Lkv = 4097;
    x.mask_mod = "causal";
    x.mask_block = 128;
    out.push_back(x);
  }
  // Score and mask mods with a block mask: partial and full blocks; mask blocks of 128 walked as
  // two kernel blocks of 64.
  for (auto [s, m] : {std::pair<std::string, std::string>{"alibi", "causal"}, {"softcap", "sliding_window"},
                      {"rel_pos", "document"}, {"alibi", "prefix_lm"}}) {
    Case x = c;
    x.Lq = x.Lkv = 333;
    x.score_mod = s;
    x.mask_mod = m;
    x.mask_block = 64;
    out.push_back(x);
    x.mask_block = 128;
    out.push_back(x);
  }
  // Fully masked rows: every third query row; a whole leading q-block (with a block mask).
  {
    Case x = c;
    x.Lq = x.Lkv = 97;
    x.mask_mod = "q_idx % 3 != 1";
    out.push_back(x);
    x.mask_mod = "q_idx >= 70 && kv_idx <= q_idx";
    out.push_back(x);
    x.mask_block = 64;
    out.push_back(x);
    x.dtype = DType::F16;
    out.push_back(x);
  }
  // Strided inputs, KV batch broadcast, Dv != D, a negative scale, other kernel blocks, one
  // K/V stage (a GPU with less shared memory).
  {
    Case x = c;
    x.Lq = 65;
    x.Lkv = 130;
    x.strided = true;
    x.score_mod = "alibi";
    out.push_back(x);
    x.strided = false;
    x.B = 3;
    x.Bkv = 1;
    out.push_back(x);
    Case y = c;
    y.D = 64;
    y.Dv = 128;
    y.Lq = y.Lkv = 97;
    out.push_back(y);
    y.D = 256;
    y.Dv = 24;
    out.push_back(y);
    y.D = 128;
    y.Dv = 128;
    y.scale = -0.3;
    out.push_back(y);
    Case w = c;
    w.Lq = w.Lkv = 200;
    w.mask_mod = "causal";
    w.block_m = 16;
    w.block_n = 32;
    w.mask_block = 64;
    out.push_back(w);
    w.block_m = 128;  // 4 warps of two m16 tiles
    w.block_n = 128;
    w.mask_block = 128;
    out.push_back(w);
    Case f = c;  // FA2's tile at D 128 with GQA 3, a score_mod and odd lengths: 32-key blocks
    f.D = f.Dv = 128;
    f.Hq = 6;
    f.Hkv = 2;
    f.Lq = 333;
    f.Lkv = 517;
    f.block_m = 128;
    f.score_mod = "alibi";
    f.mask_mod = "sliding_window";
    f.mask_block = 128;
    out.push_back(f);
    f.dtype = DType::F16;
    f.mask_block = 0;
    out.push_back(f);
    w.block_m = 0;
    w.block_n = 0;
    w.mask_block = 64;
    w.corrupt_mask = true;
    out.push_back(w);
    w.corrupt_mask = false;
    w.mask_block = 0;
    w.D = w.Dv = 256;
    w.smem_optin = 99 * 1024;  // sm_86 / sm_89: one stage, BLOCK_N 32
    out.push_back(w);
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Special, CudaEmulated, ::testing::ValuesIn(special_cases()),
                         [](const auto& info) { return name_of(info.param); });

// The wgmma engine (templates/cuda/flash_prefill_wgmma.cuh, sm_90a): the same odd shapes at the head
// dims it takes (D a multiple of 64, Dv 64 / 128 / 256), every built-in mod, block masks, fully
// masked rows, its block options and one K/V stage.
std::vector<Case> wgmma_cases() {
  std::vector<Case> out;
  for (DType dt : {DType::BF16, DType::F16})
    for (int D : {64, 128, 256})
      for (int64_t L : {1, 17, 97, 129}) {
        Case c;
        c.dtype = dt;
        c.D = c.Dv = D;
        c.Lq = c.Lkv = L;
        c.Hq = 3;
        c.Hkv = 1;
        c.wgmma = 1;
        out.push_back(c);
      }
  for (const std::string& name : builtin_mod_names()) {
    Case c;
    c.D = c.Dv = 128;
    c.Lq = 129;
    c.Lkv = 300;
    c.B = c.Bkv = 2;
    c.Hq = 6;
    c.Hkv = 2;
    c.wgmma = 1;
    (find_mod(name).kind == ModKind::Score ? c.score_mod : c.mask_mod) = name;
    out.push_back(c);
  }
  Case c;
  c.Hq = c.Hkv = 2;
  c.wgmma = 1;
  {  // 4097 x 4097 causal through a block mask of 128
    Case x = c;
    x.Hq = x.Hkv = 1;
    x.Lq = x.Lkv = 4097;
    x.mask_mod = "causal";
    x.mask_block = 128;
    out.push_back(x);
  }
  for (auto [s, m] : {std::pair<std::string, std::string>{"alibi", "causal"}, {"softcap", "sliding_window"},
                      {"rel_pos", "document"}}) {
    Case x = c;
    x.Lq = x.Lkv = 333;
    x.score_mod = s;
    x.mask_mod = m;
    x.mask_block = 64;  // BLOCK 64 x 64 (one warpgroup)
    out.push_back(x);
    x.mask_block = 128;
    out.push_back(x);
  }
  {
    Case x = c;
    x.Lq = x.Lkv = 97;
    x.mask_mod = "q_idx % 3 != 1";
    out.push_back(x);
    x.mask_mod = "q_idx >= 70 && kv_idx <= q_idx";
    x.mask_block = 64;
    out.push_back(x);
    x.dtype = DType::F16;
    out.push_back(x);
  }
  {
    Case x = c;
    x.Lq = 65;
    x.Lkv = 130;
    x.strided = true;
    x.score_mod = "alibi";
    out.push_back(x);
    x.strided = false;
    x.B = 3;
    x.Bkv = 1;
    out.push_back(x);
    Case y = c;
    y.D = 64;
    y.Dv = 128;
    y.Lq = y.Lkv = 97;
    out.push_back(y);
    y.D = 128;
    y.Dv = 64;
    out.push_back(y);
    y.D = 192;
    y.Dv = 256;
    out.push_back(y);
    y.D = y.Dv = 128;
    y.scale = -0.3;
    out.push_back(y);
    Case w = c;
    w.Lq = w.Lkv = 200;
    w.mask_mod = "causal";
    w.block_m = 64;
    w.block_n = 128;
    out.push_back(w);
    w.block_m = 128;
    w.block_n = 64;
    w.mask_block = 128;
    out.push_back(w);
    w.block_m = 0;
    w.block_n = 0;
    w.corrupt_mask = true;
    out.push_back(w);
    w.corrupt_mask = false;
    w.mask_block = 0;
    w.D = w.Dv = 256;
    w.smem_optin = 150 * 1024;  // one K/V stage
    out.push_back(w);
  }
  // The pipelined schedule (USE_WGMMA=2, three stages) on all of the above but the small-memory GPU.
  const size_t plain = out.size();
  for (size_t i = 0; i < plain; ++i)
    if (out[i].smem_optin == 0) {
      Case p = out[i];
      p.wgmma = 2;
      out.push_back(p);
    }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Wgmma, CudaEmulated, ::testing::ValuesIn(wgmma_cases()),
                         [](const auto& info) { return name_of(info.param); });

// Where the wgmma engine cannot run, USE_WGMMA=1 is an error that says why; auto (-1) without
// FLEXJIT_CUDA_WGMMA=1 keeps the mma.sync engine.
TEST(CudaWgmmaPlan, RefusesWhatItCannotTakeAndStaysOptIn) {
  OwnedTensor q = testing::make_tensor(DType::BF16, 1, 2, 64, 80, false, 1);
  OwnedTensor k = testing::make_tensor(DType::BF16, 1, 2, 64, 80, false, 2);
  OwnedTensor out = OwnedTensor::make("out", DType::BF16, {1, 2, 64, 80});
  AttentionOptions opt;
  opt.use_wgmma = 1;
  CudaDeviceInfo h100;
  ModSet none;
  try {
    plan_cuda_prefill(q.view, k.view, k.view, out.view, nullptr, none, {}, nullptr, opt, h100, nullptr);
    ADD_FAILURE() << "D 80 was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("D a multiple of 64"), std::string::npos) << e.what();
  }
  OwnedTensor q2 = testing::make_tensor(DType::BF16, 1, 2, 64, 128, false, 1);
  OwnedTensor out2 = OwnedTensor::make("out", DType::BF16, {1, 2, 64, 128});
  CudaDeviceInfo a100 = cuda_device_info_for_arch("sm_80");
  try {
    plan_cuda_prefill(q2.view, q2.view, q2.view, out2.view, nullptr, none, {}, nullptr, opt, a100, nullptr);
    ADD_FAILURE() << "sm_80 was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("needs an sm_90 GPU"), std::string::npos) << e.what();
  }
  CudaPrefillPlan p = plan_cuda_prefill(q2.view, q2.view, q2.view, out2.view, nullptr, none, {}, nullptr, opt, h100,
                                        nullptr);
  EXPECT_EQ(p.spec.engine, PrefillEngine::Wgmma);
  EXPECT_EQ(p.spec.arch, "sm_90a");
  EXPECT_EQ(p.block_threads, 256u);
  EXPECT_EQ(p.smem_bytes, 1024 + 2 * (128 * 128 + 2 * 128 * 256));
  opt.use_wgmma = -1;
  if (!std::getenv("FLEXJIT_CUDA_WGMMA")) {
    p = plan_cuda_prefill(q2.view, q2.view, q2.view, out2.view, nullptr, none, {}, nullptr, opt, h100, nullptr);
    EXPECT_NE(p.spec.engine, PrefillEngine::Wgmma) << "auto stays on mma.sync unless FLEXJIT_CUDA_WGMMA=1";
  }
}

}  // namespace
}  // namespace flexjit

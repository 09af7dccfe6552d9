// LABELS: unit cuda
// The CUDA decode autotuner's logic without a GPU (runtime/cuda_autotune.h): candidates, the
// playoff against the cost model, the database entry keyed by the GPU's model and SM count, and
// plan_cuda_decode taking it (split "tuned") on that GPU only. The timer here is a stand-in; the
// GPU's (cuda_decode_timer) runs the kernels and needs a device.
#include "runtime/cuda_autotune.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

namespace flexjit {
namespace {

alignas(16) unsigned char g_fake[64];

CudaDecodePlan plan_for(const CudaDeviceInfo& dev, int64_t lkv, bool use_tuning = true) {
  const TensorView q = contiguous_view(g_fake, DType::BF16, {1, 32, 1, 128}), out = q;
  const TensorView k = contiguous_view(g_fake, DType::BF16, {1, 8, lkv, 128}), v = k;
  CudaDecodeKv kv;
  kv.k = &k;
  kv.v = &v;
  AttentionOptions opt;
  opt.enable_gqa = true;
  opt.use_tuning = use_tuning;
  return plan_cuda_decode(q, kv, out, nullptr, ModSet{}, ModBindings{}, nullptr, opt, dev, nullptr);
}

TEST(CudaAutotune, StoresTheWinnerForThisGpuAndThePlannerUsesIt) {
  CudaDeviceInfo dev;
  dev.name = "Fake GPU (cuda_autotune_test)";
  dev.sm_count = 132;
  CudaTuneRequest r;
  r.lkv = 30000;  // bucket: up to 32768 keys
  std::set<std::pair<int, int64_t>> timed;
  // Fastest at PARTITION_SIZE 1024 with BLOCK_N 32; the cost model's choice is slower.
  auto timer = [&](int block_n, int64_t ps) {
    timed.insert({block_n, ps});
    return 50.0 + 10.0 * std::fabs(std::log2(double(ps)) - 10.0) + (block_n == 64 ? 3.0 : 0.0);
  };
  const CudaDecodePlan before = plan_for(dev, 30000, false);
  EXPECT_EQ(before.split, "cost model");
  TuneResult res = tune_cuda_decode(r, dev, timer);
  EXPECT_TRUE(res.stored);
  EXPECT_EQ(res.best.block_n, 32);
  EXPECT_EQ(res.best.partition_size, 1024);
  EXPECT_GT(res.best.default_us, res.best.us * 1.03) << "the winner beat the cost model";
  EXPECT_NE(res.bucket.find("cuda-mma"), std::string::npos) << res.bucket;
  EXPECT_NE(res.bucket.find("Fake"), std::string::npos) << res.bucket;
  const CudaDecodePlan top = plan_for(dev, 32768, false);  // candidates are timed at the bucket's top
  EXPECT_TRUE(timed.count({top.spec.block_n, top.partition_size})) << "the cost model's choice is a candidate";
  EXPECT_TRUE(timed.count({32, 256}) && timed.count({64, 32768})) << "from 256 keys to no split, both BLOCK_N";

  // Calls on this GPU in the bucket take it; other GPUs, or use_tuning = false, do not.
  const CudaDecodePlan tuned = plan_for(dev, 20000);
  EXPECT_EQ(tuned.split, "tuned");
  EXPECT_EQ(tuned.partition_size, 1024);
  EXPECT_EQ(tuned.spec.block_n, 32);
  EXPECT_EQ(plan_for(dev, 20000, false).split, "cost model");
  CudaDeviceInfo other = dev;
  other.name = "Another fake GPU (cuda_autotune_test)";
  EXPECT_EQ(plan_for(other, 20000).split, "cost model");
  other = dev;
  other.sm_count = 78;  // the same model with fewer SMs is another bucket
  EXPECT_EQ(plan_for(other, 20000).split, "cost model");
}

TEST(CudaAutotune, KeepsTheCostModelUnlessACandidateBeatsItByThreePercent) {
  CudaDeviceInfo dev;
  dev.name = "Fake GPU (cuda_autotune_test)";
  CudaTuneRequest r;
  r.lkv = 3000;  // another bucket
  const CudaDecodePlan def = plan_for(dev, 4096, false);  // the bucket's top
  auto timer = [&](int block_n, int64_t ps) {  // everything within 1% of the cost model's choice
    return block_n == def.spec.block_n && ps == def.partition_size ? 100.0 : 99.2;
  };
  TuneResult res = tune_cuda_decode(r, dev, timer);
  EXPECT_EQ(res.best.block_n, def.spec.block_n);
  EXPECT_EQ(res.best.partition_size, def.partition_size);
  EXPECT_DOUBLE_EQ(res.best.default_us, 100.0);
}

TEST(CudaAutotune, BadRequestsAndUnknownGpusAreClearErrors) {
  CudaDeviceInfo dev;
  dev.name = "Fake GPU (cuda_autotune_test)";
  auto timer = [](int, int64_t) { return 1.0; };
  CudaTuneRequest r;
  r.dtype = DType::F32;
  try {
    tune_cuda_decode(r, dev, timer);
    FAIL() << "fp32 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16 or fp16"), std::string::npos) << e.what();
  }
  r = CudaTuneRequest{};
  r.lq = 17;
  EXPECT_THROW(tune_cuda_decode(r, dev, timer), Error);
  r = CudaTuneRequest{};
  dev.name.clear();
  EXPECT_THROW(tune_cuda_decode(r, dev, timer), Error);
  dev.name = "Fake GPU (cuda_autotune_test)";
  auto failing = [](int, int64_t) -> double { throw Error("no GPU"); };
  try {
    tune_cuda_decode(r, dev, failing);
    FAIL() << "nothing ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no candidate ran (no GPU)"), std::string::npos) << e.what();
  }
}


// ---- CUDA prefill: engine and blocks ----
CudaPrefillPlan prefill_plan_for(const CudaDeviceInfo& dev, int64_t L, const AttentionOptions& base = {}) {
  const TensorView q = contiguous_view(g_fake, DType::BF16, {1, 32, L, 128}), out = q;
  const TensorView k = contiguous_view(g_fake, DType::BF16, {1, 8, L, 128}), v = k;
  AttentionOptions opt = base;
  opt.enable_gqa = true;
  return plan_cuda_prefill(q, k, v, out, nullptr, ModSet{}, ModBindings{}, nullptr, opt, dev, nullptr);
}

TEST(CudaAutotune, PrefillStoresTheFastestCorrectEngineAndThePlannerUsesIt) {
  CudaDeviceInfo dev;
  dev.name = "Fake H100 (cuda_autotune_test prefill)";
  dev.sm_count = 132;
  CudaPrefillTuneRequest r;
  r.len = 3000;  // bucket: up to 4096
  r.causal = false;
  const std::vector<TuneCandidate> cands = cuda_prefill_candidates(r, dev);
  ASSERT_FALSE(cands.empty());
  EXPECT_EQ(cands.front().engine, "mma") << "the default first";
  std::set<std::string> engines;
  for (const auto& c : cands) engines.insert(c.engine);
  EXPECT_EQ(engines, (std::set<std::string>{"mma", "wgmma", "wgmma2"})) << "sm_90: all three engines";
  // wgmma 128 x 128 is fastest but wrong; the pipelined 128 x 64 is next: it wins.
  auto timer = [&](int use_wgmma, int bm, int bn) -> double {
    if (use_wgmma == 1 && bm == 128 && bn == 128) throw Error("wrong result: max |out - default's| = 0.5");
    if (use_wgmma == 2 && bm == 128 && bn == 64) return 40.0;
    return use_wgmma ? 80.0 : 100.0;
  };
  AttentionOptions untuned;
  untuned.use_tuning = false;  // (an earlier run's entry may be in the test cache)
  EXPECT_EQ(prefill_plan_for(dev, 3000, untuned).knobs, "default");
  EXPECT_EQ(prefill_plan_for(dev, 3000, untuned).spec.engine, PrefillEngine::Fma);
  TuneResult res = tune_cuda_prefill(r, dev, timer);
  EXPECT_TRUE(res.stored);
  EXPECT_EQ(res.best.engine, "wgmma2");
  EXPECT_EQ(res.best.block_m, 128);
  EXPECT_EQ(res.best.block_n, 64);
  EXPECT_DOUBLE_EQ(res.best.default_us, 100.0);
  bool flagged = false;
  for (const auto& c : res.candidates) flagged = flagged || (c.us < 0 && c.error.find("wrong result") == 0);
  EXPECT_TRUE(flagged) << "the wrong candidate is listed with its error, never a winner";
  EXPECT_NE(res.bucket.find("prefill"), std::string::npos) << res.bucket;

  // Calls in the bucket on this GPU take it; given knobs, another GPU, or no tuning do not.
  const CudaPrefillPlan tuned = prefill_plan_for(dev, 2500);
  EXPECT_EQ(tuned.knobs, "tuned");
  EXPECT_EQ(cuda_prefill_engine_name(tuned.spec), "wgmma2");
  EXPECT_EQ(tuned.spec.block_m, 128);
  EXPECT_EQ(tuned.spec.block_n, 64);
  EXPECT_NE(tuned.describe().find("(tuned)"), std::string::npos);
  AttentionOptions user;
  user.use_wgmma = 0;
  EXPECT_EQ(prefill_plan_for(dev, 2500, user).knobs, "user");
  EXPECT_EQ(prefill_plan_for(dev, 2500, user).spec.engine, PrefillEngine::Fma);
  AttentionOptions off;
  off.use_tuning = false;
  EXPECT_EQ(prefill_plan_for(dev, 2500, off).knobs, "default");
  CudaDeviceInfo other = dev;
  other.name = "Another fake GPU (cuda_autotune_test prefill)";
  EXPECT_EQ(prefill_plan_for(other, 2500).knobs, "default");
  EXPECT_EQ(prefill_plan_for(dev, 9000).knobs, "default") << "another length bucket";
}

TEST(CudaAutotune, PrefillOnAnA100TunesTheMmaTilesOnly) {
  CudaDeviceInfo a100 = cuda_device_info_for_arch("sm_80");
  a100.name = "Fake A100 (cuda_autotune_test prefill)";
  CudaPrefillTuneRequest r;
  for (const auto& c : cuda_prefill_candidates(r, a100)) EXPECT_EQ(c.engine, "mma");
  r.len = 8;
  EXPECT_THROW(cuda_prefill_candidates(r, a100), Error) << "16 rows or fewer run the decode kernel";
}

}  // namespace
}  // namespace flexjit

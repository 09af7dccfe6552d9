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

}  // namespace
}  // namespace flexjit

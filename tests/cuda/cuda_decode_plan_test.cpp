// LABELS: unit cuda
// The CUDA decode planner's split (runtime/cuda_decode: the cost model) on a CPU: the grid must
// run in whole waves of the GPU's CTA slots. A split of Llama-3.1-8B's 8 KV heads at B 1 into 17
// partitions (136 CTAs) on an H200's 132 SMs, one decode CTA per SM, takes two waves, the second
// with 4 CTAs: nearly twice the time of 16 partitions. The views' pointers are never dereferenced.
#include "runtime/cuda_decode.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

namespace flexjit {
namespace {

alignas(64) unsigned char g_fake[64];

struct Grid {
  int64_t ctas = 0, slots = 0, partitions = 0, partition_size = 0;
  std::string plan;
};

// The cost model's plan of a bf16 decode call, Hq 32 / Hkv 8 / D 128 (GQA packed), one query row.
Grid plan(const CudaDeviceInfo& dev, int64_t B, int64_t L, bool paged) {
  TensorView q = contiguous_view(g_fake, DType::BF16, {B, 32, 1, 128}), out = q, k, v, table, lens;
  CudaDecodeKv kv;
  if (paged) {
    k = contiguous_view(g_fake, DType::BF16, {B * L / 16, 16, 8, 128});
    table = contiguous_view(g_fake, DType::I32, {B, L / 16});
    lens = contiguous_view(g_fake, DType::I32, {B});
    kv.block_table = &table;
    kv.seq_lens = &lens;
    kv.max_seq_len = L;
  } else {
    k = contiguous_view(g_fake, DType::BF16, {B, 8, L, 128});
  }
  v = k;
  kv.k = &k;
  kv.v = &v;
  AttentionOptions opt;
  opt.enable_gqa = true;
  opt.use_tuning = false;
  CudaDecodePlan p = plan_cuda_decode(q, kv, out, nullptr, ModSet{}, ModBindings{}, nullptr, opt, dev, nullptr);
  EXPECT_EQ(p.split, "cost model");
  Grid g;
  g.ctas = int64_t(p.grid[0]) * p.grid[1] * p.grid[2];
  g.slots = int64_t(dev.sm_count) * std::max(1, std::min(8, dev.max_smem_optin / p.smem_bytes));
  g.partitions = p.num_partitions;
  g.partition_size = p.partition_size;
  g.plan = p.describe();
  return g;
}

TEST(CudaDecodePlan, CostModelSplitsIntoWholeWaves) {
  for (const char* arch : {"sm_90", "sm_80"}) {
    const CudaDeviceInfo dev = cuda_device_info_for_arch(arch);
    for (int64_t B : {1, 2, 4, 16, 64})
      for (int64_t L : {4096, 16384, 65536, 131072})
        for (bool paged : {false, true}) {
          SCOPED_TRACE(std::string(arch) + " B " + std::to_string(B) + " KV " + std::to_string(L) +
                       (paged ? " paged" : ""));
          const Grid g = plan(dev, B, L, paged);
          const int64_t waves = (g.ctas + g.slots - 1) / g.slots;
          // The slots the grid's waves offer that it fills: >= 85% (FlashAttention's split
          // heuristic asks the same of its waves).
          EXPECT_GE(double(g.ctas) / double(waves * g.slots), 0.85) << g.plan;
          // Never fewer CTAs than the device has SMs when splitting could give them work.
          if (B * 8 < dev.sm_count) EXPECT_GE(g.ctas * 10, dev.sm_count * 9) << g.plan;
        }
  }
}

TEST(CudaDecodePlan, LlamaOnAnH200) {
  const CudaDeviceInfo h200 = cuda_device_info_for_arch("sm_90");  // 132 SMs, one decode CTA each at D 128
  EXPECT_EQ(plan(h200, 1, 65536, false).partitions, 16) << plan(h200, 1, 65536, false).plan;  // 128 CTAs, not 136
  EXPECT_EQ(plan(h200, 1, 16384, false).partitions, 16);
  EXPECT_EQ(plan(h200, 4, 65536, true).partitions, 4);  // 128 CTAs, not 160
  EXPECT_EQ(plan(h200, 64, 4096, false).partitions, 1);  // 512 CTAs: no split, no merge
}

TEST(CudaDecodePlan, CostModelFunction) {
  // 8 CTAs a partition on 132 slots: 16 partitions (one wave of 128), not 17 (136: two waves).
  EXPECT_EQ(cuda_decode_cost_model_partition(65536, 8, 32, 256, 132), 4096);
  // Never below the minimum partition, a multiple of the step.
  EXPECT_EQ(cuda_decode_cost_model_partition(1000, 1, 32, 256, 132), 256);
  EXPECT_EQ(cuda_decode_cost_model_partition(1000, 1, 64, 300, 132) % 64, 0);
  // Enough CTAs already: no split.
  EXPECT_EQ(cuda_decode_cost_model_partition(4096, 512, 32, 256, 132), 4096);
  EXPECT_EQ(cuda_decode_cost_model_partition(1, 8, 32, 256, 132), 32);
  EXPECT_EQ(cuda_decode_cost_model_partition(0, 8, 32, 256, 132), 32);
}

}  // namespace
}  // namespace flexjit

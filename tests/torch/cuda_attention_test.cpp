// LABELS: unit errors
// The CUDA branch of the torch layer (runtime/torch/cuda_attention.h) on a machine that may have
// no GPU: what runs without one. A CUDA tensor cannot be made in this test (it links torch_cpu
// only), so the kernel itself is exercised by bench/cuda_prefill_bench.py on a GPU
// (scripts/gpu_check.sh); here: the errors a call without CUDA raises, the BlockMask preparation
// (checked on host tensors: with a CPU q it stays on the CPU), the host-to-device copy of a
// strided buffer, and the CPU path refusing a mod whose tensors are on another device.
#include "runtime/torch/cuda_attention.h"

#include <gtest/gtest.h>

#include <string>

#include "runtime/cuda_driver.h"

namespace flexjit {
namespace {

template <typename F>
void expect_error(F&& f, const std::string& substring) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << substring << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
  }
}

TEST(CudaAttention, CpuTensorsAreRefusedWithTheFix) {
  at::Tensor q = at::randn({1, 2, 16, 64}).to(at::kBFloat16);
  expect_error([&] { cuda_flex_attention(q, q, q, ModSet{}, ModBindings{}, nullptr, FlexOptions{}); },
               "the CUDA kernel got q, k and v on cpu");
  expect_error([&] { cuda_view_of(q, "q"); }, "q is on cpu; a CUDA view needs a CUDA tensor");
}

TEST(CudaAttention, DriverCallsSayWhyWithoutAGpu) {
  const std::string why = cuda_driver_status();
  if (why.empty()) GTEST_SKIP() << "a CUDA device is present: nothing to refuse";
  expect_error([] { cuda_use_device_context(0); }, why);
}

TorchBlockMaskTensors causal_mask(int64_t B, int64_t H, int64_t QB, int64_t KVB) {
  TorchBlockMaskTensors t;
  t.kv_num_blocks = at::zeros({B, H, QB}, at::kInt);
  t.kv_indices = at::zeros({B, H, QB, KVB}, at::kInt);
  t.full_kv_num_blocks = at::zeros({B, H, QB}, at::kInt);
  t.full_kv_indices = at::zeros({B, H, QB, KVB}, at::kInt);
  for (int64_t i = 0; i < QB; ++i) {
    t.kv_num_blocks.index_put_({at::indexing::Slice(), at::indexing::Slice(), i}, 1);
    t.kv_indices.index_put_({at::indexing::Slice(), at::indexing::Slice(), i, 0}, int(i));
    t.full_kv_num_blocks.index_put_({at::indexing::Slice(), at::indexing::Slice(), i}, int(i));
    for (int64_t j = 0; j < i; ++j)
      t.full_kv_indices.index_put_({at::indexing::Slice(), at::indexing::Slice(), i, j}, int(j));
  }
  return t;
}

TEST(CudaAttention, BlockMaskBroadcastDimsShrinkToOneAndInt64BecomesInt32) {
  at::Tensor q = at::zeros({2, 4, 512, 64}, at::kBFloat16);
  TorchBlockMaskTensors t = causal_mask(1, 1, 4, 4);
  // As flexjit.create_block_mask returns it: [B, H] rows expanded (stride 0) from one.
  for (at::Tensor* p : {&t.kv_num_blocks, &t.kv_indices, &t.full_kv_num_blocks, &t.full_kv_indices}) {
    std::vector<int64_t> sizes(p->sizes().begin(), p->sizes().end());
    sizes[0] = 2, sizes[1] = 4;
    *p = p->to(at::kLong).expand(sizes);
  }
  TorchBlockMaskTensors d = cuda_block_mask(t, q, 512);
  EXPECT_EQ(d.kv_num_blocks.sizes(), (std::vector<int64_t>{1, 1, 4}));
  EXPECT_EQ(d.kv_indices.sizes(), (std::vector<int64_t>{1, 1, 4, 4}));
  EXPECT_EQ(d.kv_indices.scalar_type(), at::kInt);
  EXPECT_TRUE(d.full_kv_indices.is_contiguous());
  EXPECT_TRUE(at::equal(d.full_kv_num_blocks[0][0], at::arange(4, at::kInt)));
}

TEST(CudaAttention, BlockMaskShapesAndHostContentsAreChecked) {
  at::Tensor q = at::zeros({1, 2, 512, 64}, at::kBFloat16);
  expect_error([&] { cuda_block_mask(causal_mask(1, 1, 4, 4), q, 1024); }, "which needs 4x8");
  TorchBlockMaskTensors t = causal_mask(1, 1, 4, 4);
  t.kv_indices.index_put_({0, 0, 2, 0}, 7);
  expect_error([&] { cuda_block_mask(t, q, 512); }, "lists block 7; indices must be in 0..3");
  t = causal_mask(1, 1, 4, 4);
  t.kv_indices.index_put_({0, 0, 3, 0}, 1);  // block 1 is also a full block of row 3
  expect_error([&] { cuda_block_mask(t, q, 512); }, "lists KV block 1 twice");
  t = causal_mask(1, 1, 4, 4);
  t.full_kv_indices = at::Tensor();
  expect_error([&] { cuda_block_mask(t, q, 512); }, "must be given together");
  t = causal_mask(1, 1, 4, 4);
  t.kv_indices = t.kv_indices.to(at::kFloat);
  expect_error([&] { cuda_block_mask(t, q, 512); }, "block indices must be int32");
}

TEST(CudaAttention, CopyToDeviceCoversAStridedViewsExtent) {
  // Columns 1 and 3 of a 3x4 int32 matrix: the copy spans elements 1 .. 11 and keeps the strides.
  at::Tensor m = at::arange(12, at::kInt).reshape({3, 4});
  TensorView host;
  host.data = m.data_ptr<int32_t>() + 1;
  host.dtype = DType::I32;
  host.rank = 2;
  host.sizes[0] = 3, host.sizes[1] = 2;
  host.strides[0] = 4, host.strides[1] = 2;
  std::vector<at::Tensor> keep;
  TensorView d = copy_view_to_device(host, c10::Device(c10::kCPU), "buffer 'm'", &keep);
  ASSERT_EQ(keep.size(), 1u);
  EXPECT_EQ(keep[0].nbytes(), size_t(11 * 4));
  EXPECT_NE(d.data, host.data);
  const auto* p = static_cast<const int32_t*>(d.data);
  EXPECT_EQ(p[0], 1);
  EXPECT_EQ(p[2 * 4 + 1 * 2], 11);
}

TEST(CudaAttention, TheCpuPathRefusesAModWithTensorsOnAnotherDevice) {
  at::Tensor q = at::randn({1, 2, 16, 64});
  at::Tensor elsewhere = at::zeros({2}, at::TensorOptions().device(at::kMeta));
  ModRef m = score_mod("score + 1.0");
  m.keep_alive.push_back(elsewhere);  // as from_traced(..., {tensor}) records a mod's tensors
  expect_error([&] { flex_attention(q, q, q, m); }, "a tensor of the score_mod is on meta but this call runs on the CPU");
}

}  // namespace
}  // namespace flexjit

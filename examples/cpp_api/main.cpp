// A complete flexjit program: register a score_mod written as a C++ lambda, build a causal
// BlockMask, run flex_attention on at::Tensors, and check the result against libtorch's
// scaled_dot_product_attention with the same bias and mask. Exits non-zero on a mismatch.
#include <flexjit/runtime/torch/flex_attention.h>

#include <cstdio>

int main() {
  const int64_t B = 2, H = 4, L = 257, D = 64;
  at::manual_seed(0);
  at::Tensor q = at::randn({B, H, L, D}), k = at::randn({B, H, L, D}), v = at::randn({B, H, L, D});
  at::Tensor slopes = at::exp2(-8.0 * at::arange(1, H + 1, at::kFloat) / double(H));

  // A score_mod traced from a lambda, registered by name so text and the CLI can use it too.
  auto bias = flexjit::capture_tensor("slopes", slopes);
  flexjit::register_score_mod(
      "my_alibi",
      [&](auto score, auto b, auto h, auto q_idx, auto kv_idx) {
        return score + bias[h] * (kv_idx - q_idx);
      },
      "ALiBi from a C++ lambda");
  flexjit::ModRef alibi = flexjit::score_mod("my_alibi");
  flexjit::TorchBlockMask causal = flexjit::create_block_mask(flexjit::mask_mod("causal"), B, H, L, L);
  flexjit::AttentionReport report;
  flexjit::FlexOptions opt;
  opt.report = &report;
  at::Tensor out = flexjit::flex_attention(q, k, v, alibi, &causal, opt).out;

  // The same attention in libtorch: bias [H, L, L] plus a causal -inf mask.
  at::Tensor pos = at::arange(L, at::kFloat);
  at::Tensor rel = pos.view({1, L}) - pos.view({L, 1});  // kv_idx - q_idx
  at::Tensor mask = slopes.view({H, 1, 1}) * rel;
  mask = mask.masked_fill(rel.gt(0), -std::numeric_limits<float>::infinity());
  at::Tensor ref = at::scaled_dot_product_attention(q, k, v, mask);
  double err = (out - ref).abs().max().item<double>();
  std::printf("flexjit example: kernel %s (cache %s, compile %.1f ms, run %.2f ms), max |flexjit - sdpa| = %.3g\n",
              report.symbol.c_str(), report.cache.c_str(), report.compile_ms, report.kernel_ms, err);
  return err < 1e-4 ? 0 : 1;
}

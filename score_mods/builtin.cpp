// The built-in mods. Each is expression text (the same language users write), its buffers and
// params with defaults, and a maker of example buffers for a shape. Adding one here adds it to
// the CLI, the demo and the numerics tests.
#include <cmath>

#include "score_mods/registry.h"

namespace flexjit::detail {
namespace {

using ir::BufferDecl;

std::vector<OwnedTensor> alibi_slopes(const ShapeInfo& s) {
  // The ALiBi paper's geometric slopes 2^(-8 (h + 1) / H).
  auto t = OwnedTensor::make("slopes", DType::F32, {s.Hq});
  for (int64_t h = 0; h < s.Hq; ++h) t.data<float>()[h] = float(std::exp2(-8.0 * double(h + 1) / double(s.Hq)));
  return {t};
}

std::vector<OwnedTensor> document_ids(const ShapeInfo& s) {
  // Packed documents of varied lengths (7, 50, 13, 100, ... cycling), ids ascending.
  int64_t n = std::max(s.Lq, s.Lkv);
  auto t = OwnedTensor::make("doc", DType::I32, {n});
  const int64_t lens[] = {7, 50, 13, 100, 1, 300, 29};
  int64_t doc = 0, left = lens[0];
  for (int64_t i = 0; i < n; ++i) {
    if (left == 0) {
      ++doc;
      left = lens[doc % 7];
    }
    t.data<int32_t>()[i] = int32_t(doc);
    --left;
  }
  return {t};
}

std::vector<OwnedTensor> kv_lengths(const ShapeInfo& s) {
  // Batch b keeps the first Lkv - 13 b - (Lkv / 3 if b is odd) keys; at least 1.
  auto t = OwnedTensor::make("kv_len", DType::I32, {s.B});
  for (int64_t b = 0; b < s.B; ++b)
    t.data<int32_t>()[b] = int32_t(std::max<int64_t>(1, s.Lkv - 13 * b - (b % 2 ? s.Lkv / 3 : 0)));
  return {t};
}

std::vector<OwnedTensor> rel_pos_table(const ShapeInfo&) {
  // A learned-bias stand-in: smooth in the distance d in [-128, 128].
  auto t = OwnedTensor::make("rel_bias", DType::F32, {257});
  for (int64_t i = 0; i < 257; ++i) t.data<float>()[i] = float(0.5 * std::cos(double(i - 128) / 20.0));
  return {t};
}

}  // namespace

void register_builtins() {
  register_mod_text("causal", ModKind::Mask, "q_idx >= kv_idx", {}, {},
                    "causal (top-left aligned): query i sees keys 0..i");
  register_mod_text("sliding_window", ModKind::Mask, "q_idx >= kv_idx && q_idx - kv_idx < window", {},
                    {{"window", 256}}, "causal sliding window of `window` keys");
  register_mod_text("prefix_lm", ModKind::Mask, "kv_idx < prefix || q_idx >= kv_idx", {}, {{"prefix", 64}},
                    "bidirectional over the first `prefix` keys, causal after");
  register_mod_text("document", ModKind::Mask, "doc[q_idx] == doc[kv_idx]", {BufferDecl{"doc", DType::I32, 1}},
                    {}, "packed sequences: attend within the same document id (doc: int32 [L])",
                    document_ids);
  register_mod_text("key_padding", ModKind::Mask, "kv_idx < kv_len[b]", {BufferDecl{"kv_len", DType::I32, 1}},
                    {}, "per-batch key lengths (kv_len: int32 [B])", kv_lengths);
  register_mod_text("alibi", ModKind::Score, "score + slopes[h] * (kv_idx - q_idx)",
                    {BufferDecl{"slopes", DType::F32, 1}}, {},
                    "ALiBi linear bias per head (slopes: fp32 [Hq])", alibi_slopes);
  register_mod_text("softcap", ModKind::Score, "cap * tanh(score / cap)", {}, {{"cap", 20}},
                    "tanh soft-capping of scores at +-cap");
  register_mod_text("rel_pos", ModKind::Score,
                    "score + rel_bias[min(max(kv_idx - q_idx, -128), 128) + 128]",
                    {BufferDecl{"rel_bias", DType::F32, 1}}, {},
                    "relative-position bias table over distances clipped to [-128, 128] (rel_bias: fp32 [257])",
                    rel_pos_table);
}

}  // namespace flexjit::detail

// flexjit for libtorch users: flex_attention on at::Tensor. The only public header that
// includes torch; everything below it works on plain views.
//
//   auto alibi = flexjit::score_mod("score + slopes[h] * (kv_idx - q_idx)", {{"slopes", slopes}});
//   auto causal = flexjit::create_block_mask(flexjit::mask_mod("causal"), B, H, L, L);
//   auto [out, lse] = flexjit::flex_attention(q, k, v, alibi, &causal, {.return_lse = true});
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "runtime/attention.h"
#include "score_mods/registry.h"

namespace flexjit {

// A score_mod or mask_mod with its tensors and scalar values. Empty = no mod.
struct ModRef {
  ModKind kind = ModKind::Score;
  TracedMod traced;                     // IR + bindings
  std::string registered_name;          // set when made from a registered mod
  std::vector<at::Tensor> keep_alive;   // tensors the bindings point into
  bool empty() const { return traced.expr == nullptr; }
};

// `text_or_name`: a registered mod ("alibi", "causal", ...) or expression text. `buffers` are
// the tensors it reads by name, `params` its runtime scalars (changing them never recompiles).
// A registered mod's buffers that are not given are made for the call's shape (e.g. ALiBi
// slopes). Throws flexjit::Error (ParseError for bad text, pointing at the column).
ModRef score_mod(const std::string& text_or_name, const std::map<std::string, at::Tensor>& buffers = {},
                 const std::map<std::string, double>& params = {});
ModRef mask_mod(const std::string& text_or_name, const std::map<std::string, at::Tensor>& buffers = {},
                const std::map<std::string, double>& params = {});

// Wraps a traced C++ functor (see jit/trace.h; capture tensors with flexjit::capture_tensor).
ModRef from_traced(TracedMod t, ModKind kind, std::vector<at::Tensor> keep_alive = {});
BufferSym capture_tensor(const std::string& name, const at::Tensor& t);

// A BlockMask together with the mask_mod it was built from (as in PyTorch).
struct TorchBlockMask {
  runtime::BlockMask mask;
  ModRef mask_mod;
};
TorchBlockMask create_block_mask(const ModRef& mask_mod, int64_t B, int64_t H, int64_t Lq, int64_t Lkv,
                                 int64_t q_block_size = 128, int64_t kv_block_size = 128);

struct FlexOptions {
  std::optional<double> scale;       // default 1/sqrt(D)
  bool enable_gqa = false;
  bool return_lse = false;
  std::map<std::string, int64_t> kernel_options;  // BLOCK_M, BLOCK_N, USE_AMX (0 / 1; unset: auto)
  int num_threads = 0;  // 0: torch's intra-op pool (torch.set_num_threads); N: N TBB workers
  AttentionReport* report = nullptr;              // filled when set
};

struct FlexResult {
  at::Tensor out;  // [B, Hq, Lq, Dv], q's dtype
  at::Tensor lse;  // [B, Hq, Lq] fp32, natural log; undefined unless return_lse
};

// q [B, Hq, Lq, D], k [B or 1, Hkv, Lkv, D], v [B or 1, Hkv, Lkv, Dv]: CPU tensors of fp32, bf16
// or fp16, any strides. A mask comes in through `block_mask` (with its mask_mod), as in PyTorch.
FlexResult flex_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const ModRef& score_mod = {}, const TorchBlockMask* block_mask = nullptr,
                          const FlexOptions& options = {});

// A strided view of a CPU tensor (no copy). Throws for other devices or unsupported dtypes.
TensorView view_of(const at::Tensor& t, const std::string& name);

}  // namespace flexjit

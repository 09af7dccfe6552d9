// flexjit for libtorch users: flex_attention, paged_flex_attention (decoding against a paged KV
// cache) and merge_attention_states on at::Tensor. The only public header that includes torch;
// everything below it works on plain views.
//
//   auto alibi = flexjit::score_mod("score + slopes[h] * (kv_idx - q_idx)", {{"slopes", slopes}});
//   auto causal = flexjit::create_block_mask(flexjit::mask_mod("causal"), B, H, L, L);
//   auto [out, lse] = flexjit::flex_attention(q, k, v, alibi, &causal, {.return_lse = true});
//   auto step = flexjit::paged_flex_attention(q1, k_cache, v_cache, block_table, seq_lens, alibi,
//                                             flexjit::mask_mod("causal"));
//   auto packed = flexjit::flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, {}, true);
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "runtime/attention.h"
#include "runtime/varlen.h"
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
// the tensors it reads by name (on the CPU, or for a CUDA flex_attention call on its device),
// `params` its runtime scalars (changing them never recompiles).
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
  // BLOCK_M, BLOCK_N: kernel tiles (0 = default). USE_AMX: 0 / 1 forbids / requires bf16 / fp16
  // AMX tiles, in the prefill and the decode kernel (unset: where available; decode from 8 rows
  // per KV head, bf16 on a paged cache from 4, fp16 from 16). USE_DPBF16: the same for AVX512-BF16's vdpbf16ps (unset:
  // where available and AMX is not used). PARTITION_SIZE: keys per split-KV partition of the decode
  // kernel (>= 0; 0 = tuned or cost model). FORCE_USE_FLEX_ATTENTION: 1 runs the prefill kernel
  // where the decode kernel would apply (PyTorch's option of that name). See AttentionOptions.
  std::map<std::string, int64_t> kernel_options;
  int num_threads = 0;  // 0: torch's intra-op pool (torch.set_num_threads); N: N TBB workers
  AttentionReport* report = nullptr;              // filled when set
};

struct FlexResult {
  at::Tensor out;  // [B, Hq, Lq, Dv], q's dtype
  at::Tensor lse;  // [B, Hq, Lq] fp32, natural log; undefined unless return_lse
};

// q [B, Hq, Lq, D], k [B or 1, Hkv, Lkv, D], v [B or 1, Hkv, Lkv, Dv]: CPU tensors of fp32, bf16
// or fp16, any strides. A mask comes in through `block_mask` (with its mask_mod), as in PyTorch.
// CUDA: bf16 / fp16 q, k, v on one CUDA device run the CUDA prefill kernel (cuda_attention.h):
// asynchronous on torch's current stream, out and lse allocated on the device; the score_mod's
// tensors must be on that device; a TorchBlockMask (host arrays from the CPU builder) and its
// mask_mod's tensors, and registered mods' example buffers, are copied there on every call (for
// CUDA graphs use the op with a BlockMask on the device). kernel_options: BLOCK_M, BLOCK_N.
FlexResult flex_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const ModRef& score_mod = {}, const TorchBlockMask* block_mask = nullptr,
                          const FlexOptions& options = {});

// Flash decoding against a paged KV cache (FlashInfer's NHD layout), the at::Tensor form of
// flexjit::paged_flex_attention in runtime/attention.h:
//   q [B, Hq, Lq, D] with Lq <= 16 (fp32, bf16 or fp16, any strides);
//   k_cache [num_pages, page_size, Hkv, D], v_cache [num_pages, page_size, Hkv, Dv] (q's dtype,
//   last dim contiguous); block_table int32 [B, max_pages]; seq_lens int32 [B].
// Sequence b's key n is in page block_table[b, n / page_size] at slot n % page_size; its query i
// sits at the absolute position seq_lens[b] - Lq + i, and both mods see absolute q_idx / kv_idx
// (so mask_mod("causal") works unchanged). The mask_mod is given as a mod, not a BlockMask: the
// block mask is built per call over each sequence's own length. A registered mod's buffers that
// are not given are made for ShapeInfo{B, Hq, Hkv, max_len, max_len}, max_len = max(seq_lens),
// because they are indexed by absolute positions. seq_lens[b] = 0 (an unused batch slot) gives
// out 0 and lse -inf. options.kernel_options takes BLOCK_M, BLOCK_N, PARTITION_SIZE (a
// multiple of page_size) and USE_AMX (the decode kernel's AMX engine: 0 never, 1 required);
// FORCE_USE_FLEX_ATTENTION=1 is refused (no paged form).
// Returns out [B, Hq, Lq, Dv] in q's dtype and, with return_lse, lse [B, Hq, Lq] fp32.
// Throws flexjit::Error on bad input (shapes, dtypes, a page index out of range, ...).
FlexResult paged_flex_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& seq_lens,
                                const ModRef& score_mod = {}, const ModRef& mask_mod = {},
                                const FlexOptions& options = {});

// FlashAttention-2's flash_attn_varlen_func (runtime/varlen.h): sequences packed without padding.
//   q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]: CPU fp32 / bf16 / fp16, any
//   strides, Hq a multiple of Hkv; cu_seqlens_q / cu_seqlens_k int32 [batch + 1]; max_seqlen_q /
//   max_seqlen_k at least the longest sequence.
// FA2's options with FA2's meaning: softmax_scale (default 1/sqrt(D)); causal and window_size
// {left, right} (-1 = unlimited) aligned bottom-right; softcap (> 0: s -> softcap * tanh(s /
// softcap)); alibi_slopes fp32 [Hq] or [batch, Hq]. dropout_p must be 0 (inference only);
// deterministic is accepted (the CPU kernel always is). softmax_lse is returned with
// return_attn_probs (FA2's flag; there is no probability matrix) or options.return_lse.
// flexjit's own additions: score_mod / mask_mod, which see b = the sequence and q_idx / kv_idx
// inside it (applied after ALiBi, before the masks), and options.kernel_options BLOCK_M,
// BLOCK_N, USE_AMX, USE_DPBF16. Throws flexjit::Error on bad input.
struct VarlenResult {
  at::Tensor out;          // [total_q, Hq, Dv], q's dtype
  at::Tensor softmax_lse;  // [Hq, total_q] fp32, natural log; undefined unless asked for
};
VarlenResult flash_attn_varlen_func(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p = 0.0,
                                    std::optional<double> softmax_scale = std::nullopt, bool causal = false,
                                    std::pair<int64_t, int64_t> window_size = {-1, -1}, double softcap = 0.0,
                                    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                    bool deterministic = false, bool return_attn_probs = false,
                                    const ModRef& score_mod = {}, const ModRef& mask_mod = {},
                                    const FlexOptions& options = {});

// The gradients of flex_attention(q, k, v, score_mod, block_mask, options), FlashAttention-2 style
// on CPU (no L x L buffer): given dout = dL/d(out), the forward's out and lse (call it with
// return_lse), returns dq, dk, dv in q, k, v's dtypes (computed in fp32) and, for each name in
// grad_buffers (float tensors the score_mod captured: learnable biases), dL/d(buffer) in that
// buffer's dtype; dlse (optional, [B, Hq, Lq]) adds a gradient flowing in through the lse output.
// Deterministic: bitwise the same for any thread count. options.kernel_options
// BLOCK_M / BLOCK_N set the backward's tiles (default 64 x 64). A fully masked row has zero
// gradients. Throws flexjit::Error on bad input.
struct FlexGrads {
  at::Tensor dq, dk, dv;
  std::map<std::string, at::Tensor> buffers;
};
FlexGrads flex_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  const ModRef& score_mod = {}, const TorchBlockMask* block_mask = nullptr,
                                  const FlexOptions& options = {}, const std::vector<std::string>& grad_buffers = {},
                                  const at::Tensor& dlse = {});

// Combines two attention states over disjoint sets of keys for the same queries into the state
// over their union (runtime/merge.h): out_a / out_b [..., L, Dv] (2-4 dims, same shape and float
// dtype, any strides), lse_a / lse_b fp32 [..., L] (natural log, e.g. from return_lse). A state
// with lse -inf kept no key and contributes nothing (its out is not read). Returns new tensors:
// out (out_a's shape and dtype, contiguous) and lse (fp32, lse_a's shape). Throws flexjit::Error
// on mismatched shapes or dtypes.
std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                          const at::Tensor& out_b, const at::Tensor& lse_b);

// A strided view of a CPU tensor (no copy). Throws for other devices or unsupported dtypes.
TensorView view_of(const at::Tensor& t, const std::string& name);

}  // namespace flexjit

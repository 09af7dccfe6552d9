// The torch op library: torch.ops.flexjit.flex_attention, paged_flex_attention,
// varlen_attention, merge_attention_states and create_block_mask, loaded from Python with
// torch.ops.load_library(<build>/libflexjit_torch_ops.so).
//
// Mods travel as strings (a registered name or expression text), their tensors as a list with a
// parallel list of names, their scalars as parallel name / value lists, and a block mask as
// PyTorch's BlockMask tensors. The attention ops and the merge have a CPU kernel and a Meta
// kernel, flex_attention a CUDA kernel too (the schemas: op_schema.h; the CUDA kernel:
// cuda_attention.cpp, shared with the CUDA-only build's ops_cuda_only.cpp); the Meta kernel gives torch.compile the output shapes, so a compiled graph keeps the
// op in it (no graph break). flexjit::Error (a user problem) becomes a Python ValueError with
// flexjit's message; anything else stays a RuntimeError.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "jit/cache.h"
#include "jit/parser.h"
#include "runtime/torch/block_mask_interop.h"
#include "runtime/torch/flex_attention.h"
#include "runtime/torch/op_common.h"
#include "runtime/torch/op_schema.h"

namespace flexjit {
namespace {

using ops::check_all_used;
using ops::collect;
using ops::flex_attention_meta;
using ops::paged_flex_attention_meta;
using ops::ModArgs;
using ops::Names;
using ops::surface_errors;
using ops::Tensors;

// One mod from text or a registered name. A registered mod gets only the buffers it declares
// (the others belong to the other mod); expression text keeps only what it reads (parse_mod).
ModRef make(const std::string& text, ModKind kind, const ModArgs& a) {
  if (text.empty()) return {};
  std::map<std::string, at::Tensor> buffers = a.buffers;
  if (has_mod(text)) {
    const RegisteredMod& m = find_mod(text);
    std::erase_if(buffers, [&](const auto& kv) {
      for (const auto& d : m.mod.buffers)
        if (d.name == kv.first) return false;
      return true;
    });
  }
  try {
    return kind == ModKind::Score ? score_mod(text, buffers, a.params)
                                  : mask_mod(text, buffers, a.params);
  } catch (const ParseError&) {
    // A lone unknown word was most likely meant as a mod name: list the registered ones.
    bool word = std::all_of(text.begin(), text.end(),
                            [](unsigned char c) { return std::isalnum(c) || c == '_'; });
    if (word && !std::isdigit(static_cast<unsigned char>(text[0])))
      find_mod(text);  // throws "unknown mod '...'; registered mods: ..."
    throw;
  }
}

int64_t round_up(int64_t x, int64_t m) { return m > 0 ? (x + m - 1) / m * m : x; }

// The schema's defaults (0, False) mean "not given", so FlexOptions keeps its own defaults; a
// negative PARTITION_SIZE is passed on for the torch layer to refuse with its message.
void set_decode_options(int64_t partition_size, bool force_prefill, FlexOptions* opt) {
  if (partition_size) opt->kernel_options["PARTITION_SIZE"] = partition_size;
  if (force_prefill) opt->kernel_options["FORCE_USE_FLEX_ATTENTION"] = 1;
}

// The block mask of a flex_attention call: PyTorch's BlockMask tensors when given (without a
// mask_mod, partial blocks are attended in full, as with PyTorch's noop_mask), else one built
// for the call from the mask_mod (Python users should build it once with
// flexjit.create_block_mask and pass it in; explicit kernel tiles must tile its blocks), else none.
std::optional<TorchBlockMask> call_block_mask(const at::Tensor& query, const at::Tensor& key, const ModRef& mm,
                                              const std::optional<at::Tensor>& kv_num_blocks,
                                              const std::optional<at::Tensor>& kv_indices,
                                              const std::optional<at::Tensor>& full_kv_num_blocks,
                                              const std::optional<at::Tensor>& full_kv_indices, int64_t q_block_size,
                                              int64_t kv_block_size, int64_t BLOCK_M, int64_t BLOCK_N) {
  const int64_t B = query.size(0), Hq = query.size(1), Lq = query.size(2), Lkv = key.size(2);
  if (kv_num_blocks || kv_indices || full_kv_num_blocks || full_kv_indices) {
    if (!kv_num_blocks || !kv_indices)
      throw Error("a block mask needs kv_num_blocks and kv_indices (full_kv_* are optional)");
    TorchBlockMaskTensors t{*kv_num_blocks,
                            *kv_indices,
                            full_kv_num_blocks.value_or(at::Tensor()),
                            full_kv_indices.value_or(at::Tensor()),
                            q_block_size,
                            kv_block_size};
    return TorchBlockMask{from_torch_block_mask(t, Lq, Lkv), mm};
  }
  if (!mm.empty())
    return create_block_mask(mm, B, Hq, Lq, Lkv, round_up(q_block_size, BLOCK_M), round_up(kv_block_size, BLOCK_N));
  return std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> flex_attention_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::string& score_mod_text, const std::string& mask_mod_text, const Tensors& buffers,
    const Names& buffer_names, const Names& param_names, at::ArrayRef<double> param_values,
    std::optional<double> scale, bool enable_gqa, bool return_lse,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, int64_t q_block_size, int64_t kv_block_size,
    int64_t BLOCK_M, int64_t BLOCK_N, int64_t USE_AMX, int64_t PARTITION_SIZE,
    bool FORCE_USE_FLEX_ATTENTION, int64_t USE_DPBF16, int64_t USE_WGMMA) {
  return surface_errors("flexjit.flex_attention", [&] {
    for (auto [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&value, "value"}})
      if (t->dim() != 4)
        throw Error(std::string(name) + " must be 4-D [B, H, L, D], got " +
                    std::to_string(t->dim()) + "-D");
    ModArgs args = collect(buffers, buffer_names, param_names, param_values);
    ModRef sm = make(score_mod_text, ModKind::Score, args),
           mm = make(mask_mod_text, ModKind::Mask, args);
    check_all_used(args, {&sm.traced, &mm.traced});

    FlexOptions opt;
    opt.scale = scale;
    opt.enable_gqa = enable_gqa;
    opt.return_lse = return_lse;
    if (BLOCK_M) opt.kernel_options["BLOCK_M"] = BLOCK_M;
    if (BLOCK_N) opt.kernel_options["BLOCK_N"] = BLOCK_N;
    if (USE_AMX >= 0) opt.kernel_options["USE_AMX"] = USE_AMX;
    if (USE_DPBF16 >= 0) opt.kernel_options["USE_DPBF16"] = USE_DPBF16;
    if (USE_WGMMA >= 0) opt.kernel_options["USE_WGMMA"] = USE_WGMMA;
    set_decode_options(PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION, &opt);

    std::optional<TorchBlockMask> mask = call_block_mask(query, key, mm, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                                         full_kv_indices, q_block_size, kv_block_size, BLOCK_M, BLOCK_N);
    FlexResult r = flex_attention(query, key, value, sm, mask ? &*mask : nullptr, opt);
    at::Tensor lse = r.lse.defined() ? r.lse : at::empty({0}, query.options().dtype(at::kFloat));
    return std::make_tuple(r.out, lse);
  });
}

// Autograd for the ops without a backward (flex_attention has one, below). Without these kernels PyTorch's fallback would let
// backward() run and leave the inputs' .grad silently unset; with them, forward works as usual
// (also on tensors that require grad) and backward() raises, saying so. Op names the schema,
// its C++ signature, and whether the lse output is differentiable.
template <typename Op>
struct NoBackward : torch::autograd::Function<NoBackward<Op>> {
  template <typename... Args>
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                Args&&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(Op::schema, "")
                         .template typed<typename Op::Signature>();
    auto [out, lse] = op.call(std::forward<Args>(args)...);
    // The attention ops' lse is an extra output (as PyTorch's flex_attention treats it); the
    // merge's lse is a result in its own right, so backward through it must raise too.
    if (!Op::lse_is_result) ctx->mark_non_differentiable({lse});
    return {out, lse};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    TORCH_CHECK(false, Op::python_name,
                " has no backward pass (flexjit.flex_attention has one); run it under torch.no_grad() or "
                "torch.inference_mode(), or use ",
                Op::train_with, " to train");
  }
};


// ---- flex_attention's backward ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> flex_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const std::string& score_mod_text, const std::string& mask_mod_text,
    const Tensors& buffers, const Names& buffer_names, const Names& param_names, at::ArrayRef<double> param_values,
    std::optional<double> scale, bool enable_gqa, const std::optional<at::Tensor>& kv_num_blocks,
    const std::optional<at::Tensor>& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, int64_t q_block_size, int64_t kv_block_size,
    const Names& grad_buffer_names, const std::optional<at::Tensor>& grad_lse) {
  return surface_errors("flexjit.flex_attention_backward", [&] {
    ModArgs args = collect(buffers, buffer_names, param_names, param_values);
    ModRef sm = make(score_mod_text, ModKind::Score, args), mm = make(mask_mod_text, ModKind::Mask, args);
    check_all_used(args, {&sm.traced, &mm.traced});
    std::optional<TorchBlockMask> mask = call_block_mask(query, key, mm, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                                         full_kv_indices, q_block_size, kv_block_size, 0, 0);
    FlexOptions opt;
    opt.scale = scale;
    opt.enable_gqa = enable_gqa;
    const std::vector<std::string> names = grad_buffer_names.value_or(std::vector<std::string>{});
    FlexGrads g = flex_attention_backward(grad_out, query, key, value, out, lse, sm, mask ? &*mask : nullptr, opt, names,
                                          grad_lse.value_or(at::Tensor()));
    std::vector<at::Tensor> dbuf;
    for (const std::string& n : names) dbuf.push_back(g.buffers.at(n));
    return std::make_tuple(g.dq, g.dk, g.dv, dbuf);
  });
}

// Shapes only: the gradients have their inputs' shapes and dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> flex_attention_backward_meta(
    const at::Tensor&, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor&,
    const at::Tensor&, const std::string&, const std::string&, const Tensors& buffers, const Names& buffer_names,
    const Names&, at::ArrayRef<double>, std::optional<double>, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
    int64_t, const Names& grad_buffer_names, const std::optional<at::Tensor>&) {
  std::vector<at::Tensor> dbuf;
  for (const std::string& n : grad_buffer_names.value_or(std::vector<std::string>{})) {
    const auto& names = buffer_names.value_or(std::vector<std::string>{});
    auto it = std::find(names.begin(), names.end(), n);
    TORCH_CHECK_VALUE(it != names.end() && buffers, "flexjit.flex_attention_backward: no buffer named '", n, "'");
    dbuf.push_back(at::empty_like((*buffers)[size_t(it - names.begin())]));
  }
  return std::make_tuple(at::empty_like(query), at::empty_like(key), at::empty_like(value), dbuf);
}

// Autograd: forward runs the op (with the lse it needs for backward), backward runs
// flex_attention_backward, an op of its own, so torch.compile sees both. Gradients flow to query,
// key, value and the float buffers that require grad (learnable biases); lse is an extra output
// when asked for (return_lse) and takes its gradient too (d lse / d score = P).
struct FlexAttentionCall {  // the op's arguments that are not differentiable inputs
  std::string score_mod_text, mask_mod_text;
  Names buffer_names, param_names;
  std::vector<double> param_values;
  std::optional<double> scale;
  bool enable_gqa = false, return_lse = false;
  std::optional<at::Tensor> kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices;
  int64_t q_block_size = 128, kv_block_size = 128, BLOCK_M = 0, BLOCK_N = 0, USE_AMX = -1, PARTITION_SIZE = 0;
  bool FORCE_USE_FLEX_ATTENTION = false;
  int64_t USE_DPBF16 = -1;
  int64_t USE_WGMMA = -1;
};

std::vector<std::string> string_list(const c10::IValue& v) {
  std::vector<std::string> r;
  for (const c10::IValue& e : v.toListRef()) r.push_back(e.toStringRef());
  return r;
}

struct FlexAttentionFunction : torch::autograd::Function<FlexAttentionFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& query,
                                                const at::Tensor& key, const at::Tensor& value,
                                                at::TensorList buffers, const FlexAttentionCall& c) {
    at::AutoDispatchBelowADInplaceOrView below;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flexjit::flex_attention", "")
                         .typed<decltype(flex_attention_cpu)>();
    const std::vector<at::Tensor> buf(buffers.begin(), buffers.end());
    // The backward needs the lse: always computed here (one fp32 per query row), returned only
    // when asked for.
    auto [out, lse] = op.call(query, key, value, c.score_mod_text, c.mask_mod_text, buf, c.buffer_names,
                              c.param_names, c.param_values, c.scale, c.enable_gqa, true, c.kv_num_blocks,
                              c.kv_indices, c.full_kv_num_blocks, c.full_kv_indices, c.q_block_size,
                              c.kv_block_size, c.BLOCK_M, c.BLOCK_N, c.USE_AMX, c.PARTITION_SIZE,
                              c.FORCE_USE_FLEX_ATTENTION, c.USE_DPBF16, c.USE_WGMMA);
    std::vector<at::Tensor> saved{query, key, value, out, lse};
    saved.insert(saved.end(), buf.begin(), buf.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["score_mod"] = c.score_mod_text;
    ctx->saved_data["mask_mod"] = c.mask_mod_text;
    ctx->saved_data["buffer_names"] = c.buffer_names.value_or(std::vector<std::string>{});
    ctx->saved_data["param_names"] = c.param_names.value_or(std::vector<std::string>{});
    ctx->saved_data["param_values"] = c.param_values;
    ctx->saved_data["scale"] = c.scale;
    ctx->saved_data["enable_gqa"] = c.enable_gqa;
    ctx->saved_data["kv_num_blocks"] = c.kv_num_blocks;
    ctx->saved_data["kv_indices"] = c.kv_indices;
    ctx->saved_data["full_kv_num_blocks"] = c.full_kv_num_blocks;
    ctx->saved_data["full_kv_indices"] = c.full_kv_indices;
    ctx->saved_data["q_block_size"] = c.q_block_size;
    ctx->saved_data["kv_block_size"] = c.kv_block_size;
    ctx->saved_data["return_lse"] = c.return_lse;
    if (c.return_lse) return {out, lse};
    at::Tensor none = at::empty({0}, query.options().dtype(at::kFloat));
    ctx->mark_non_differentiable({none});
    return {out, none};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("flexjit::flex_attention_backward", "")
                         .typed<decltype(flex_attention_backward_cpu)>();
    auto saved = ctx->get_saved_variables();
    const std::vector<at::Tensor> buf(saved.begin() + 5, saved.end());
    const auto names = string_list(ctx->saved_data["buffer_names"]);
    // The float buffers whose gradient autograd wants (input i + 3: after query, key, value).
    std::vector<std::string> wanted;
    for (size_t i = 0; i < buf.size(); ++i)
      if (ctx->needs_input_grad(3 + i) && at::isFloatingType(buf[i].scalar_type())) wanted.push_back(names[i]);
    const bool any = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2) ||
                     !wanted.empty();
    torch::autograd::variable_list result(4 + buf.size());
    if (!any) return result;
    at::Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(saved[3]);
    auto opt_tensor = [&](const char* k) {
      const c10::IValue& v = ctx->saved_data[k];
      return v.isNone() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(v.toTensor());
    };
    const c10::IValue& scale = ctx->saved_data["scale"];
    auto [dq, dk, dv, dbuf] =
        op.call(g, saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["score_mod"].toStringRef(),
                ctx->saved_data["mask_mod"].toStringRef(), buf, names,
                string_list(ctx->saved_data["param_names"]),
                ctx->saved_data["param_values"].toDoubleVector(),
                scale.isNone() ? std::optional<double>() : std::optional<double>(scale.toDouble()),
                ctx->saved_data["enable_gqa"].toBool(), opt_tensor("kv_num_blocks"), opt_tensor("kv_indices"),
                opt_tensor("full_kv_num_blocks"), opt_tensor("full_kv_indices"),
                ctx->saved_data["q_block_size"].toInt(), ctx->saved_data["kv_block_size"].toInt(), wanted,
                ctx->saved_data["return_lse"].toBool() && grads[1].defined() ? std::optional<at::Tensor>(grads[1])
                                                                            : std::optional<at::Tensor>());
    result[0] = ctx->needs_input_grad(0) ? dq : at::Tensor();
    result[1] = ctx->needs_input_grad(1) ? dk : at::Tensor();
    result[2] = ctx->needs_input_grad(2) ? dv : at::Tensor();
    for (size_t i = 0, w = 0; i < buf.size(); ++i)
      if (w < wanted.size() && names[i] == wanted[w]) result[3 + i] = dbuf[w++];
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> flex_attention_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::string& score_mod_text, const std::string& mask_mod_text, const Tensors& buffers,
    const Names& buffer_names, const Names& param_names, at::ArrayRef<double> param_values,
    std::optional<double> scale, bool enable_gqa, bool return_lse,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, int64_t q_block_size, int64_t kv_block_size,
    int64_t BLOCK_M, int64_t BLOCK_N, int64_t USE_AMX, int64_t PARTITION_SIZE,
    bool FORCE_USE_FLEX_ATTENTION, int64_t USE_DPBF16, int64_t USE_WGMMA) {
  FlexAttentionCall c{score_mod_text, mask_mod_text, buffer_names, param_names,
                      std::vector<double>(param_values.begin(), param_values.end()), scale, enable_gqa, return_lse,
                      kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_block_size, kv_block_size,
                      BLOCK_M, BLOCK_N, USE_AMX, PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION, USE_DPBF16, USE_WGMMA};
  const std::vector<at::Tensor> none;
  auto r = FlexAttentionFunction::apply(query, key, value, at::TensorList(buffers ? *buffers : none), c);
  return std::make_tuple(r[0], r[1]);
}

// ---- paged_flex_attention: decoding against a paged KV cache ----

std::tuple<at::Tensor, at::Tensor> paged_flex_attention_cpu(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const std::string& score_mod_text,
    const std::string& mask_mod_text, const Tensors& buffers, const Names& buffer_names,
    const Names& param_names, at::ArrayRef<double> param_values, std::optional<double> scale,
    bool enable_gqa, bool return_lse, int64_t BLOCK_M, int64_t BLOCK_N, int64_t PARTITION_SIZE, int64_t USE_AMX) {
  return surface_errors("flexjit.paged_flex_attention", [&] {
    ModArgs args = collect(buffers, buffer_names, param_names, param_values);
    ModRef sm = make(score_mod_text, ModKind::Score, args),
           mm = make(mask_mod_text, ModKind::Mask, args);
    check_all_used(args, {&sm.traced, &mm.traced});
    FlexOptions opt;
    opt.scale = scale;
    opt.enable_gqa = enable_gqa;
    opt.return_lse = return_lse;
    if (BLOCK_M) opt.kernel_options["BLOCK_M"] = BLOCK_M;
    if (BLOCK_N) opt.kernel_options["BLOCK_N"] = BLOCK_N;
    if (USE_AMX >= 0) opt.kernel_options["USE_AMX"] = USE_AMX;
    set_decode_options(PARTITION_SIZE, false, &opt);
    FlexResult r = paged_flex_attention(query, k_cache, v_cache, block_table, seq_lens, sm, mm, opt);
    at::Tensor lse = r.lse.defined() ? r.lse : at::empty({0}, query.options().dtype(at::kFloat));
    return std::make_tuple(r.out, lse);
  });
}

struct PagedFlexAttentionOp {
  static constexpr const char* schema = "flexjit::paged_flex_attention";
  static constexpr const char* python_name = "flexjit.paged_flex_attention";
  static constexpr const char* train_with = "flexjit.flex_attention on contiguous K/V";
  static constexpr bool lse_is_result = false;
  using Signature = decltype(paged_flex_attention_cpu);
};

std::tuple<at::Tensor, at::Tensor> paged_flex_attention_autograd(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const std::string& score_mod_text,
    const std::string& mask_mod_text, const Tensors& buffers, const Names& buffer_names,
    const Names& param_names, at::ArrayRef<double> param_values, std::optional<double> scale,
    bool enable_gqa, bool return_lse, int64_t BLOCK_M, int64_t BLOCK_N, int64_t PARTITION_SIZE, int64_t USE_AMX) {
  auto r = NoBackward<PagedFlexAttentionOp>::apply(
      query, k_cache, v_cache, block_table, seq_lens, score_mod_text, mask_mod_text, buffers,
      buffer_names, param_names, param_values, scale, enable_gqa, return_lse, BLOCK_M, BLOCK_N,
      PARTITION_SIZE, USE_AMX);
  return std::make_tuple(r[0], r[1]);
}

// ---- varlen_attention: FlashAttention-2's flash_attn_varlen_func ----

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::string& score_mod_text,
    const std::string& mask_mod_text, const Tensors& buffers, const Names& buffer_names,
    const Names& param_names, at::ArrayRef<double> param_values, bool return_lse, int64_t BLOCK_M,
    int64_t BLOCK_N, int64_t USE_AMX, int64_t USE_DPBF16) {
  return surface_errors("flexjit.varlen_attention", [&] {
    ModArgs args = collect(buffers, buffer_names, param_names, param_values);
    ModRef sm = make(score_mod_text, ModKind::Score, args),
           mm = make(mask_mod_text, ModKind::Mask, args);
    check_all_used(args, {&sm.traced, &mm.traced});
    FlexOptions opt;
    opt.return_lse = return_lse;
    if (BLOCK_M) opt.kernel_options["BLOCK_M"] = BLOCK_M;
    if (BLOCK_N) opt.kernel_options["BLOCK_N"] = BLOCK_N;
    if (USE_AMX >= 0) opt.kernel_options["USE_AMX"] = USE_AMX;
    if (USE_DPBF16 >= 0) opt.kernel_options["USE_DPBF16"] = USE_DPBF16;
    VarlenResult r = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            0.0, softmax_scale, causal, {window_left, window_right}, softcap,
                                            alibi_slopes, false, false, sm, mm, opt);
    at::Tensor lse = r.softmax_lse.defined() ? r.softmax_lse : at::empty({0}, q.options().dtype(at::kFloat));
    return std::make_tuple(r.out, lse);
  });
}

// Shapes only: out [total_q, Hq, Dv] in q's dtype, lse [Hq, total_q] fp32 (or [0]). The
// cu_seqlens contents are data, checked by the CPU kernel.
std::tuple<at::Tensor, at::Tensor> varlen_attention_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t, int64_t, std::optional<double>, bool, int64_t, int64_t, double,
    const std::optional<at::Tensor>&, const std::string&, const std::string&, const Tensors&, const Names&,
    const Names&, at::ArrayRef<double>, bool return_lse, int64_t, int64_t, int64_t, int64_t) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}})
    TORCH_CHECK_VALUE(t->dim() == 3, "flexjit.varlen_attention: ", name,
                      " must be 3-D [total, H, D] (packed sequences), got ", t->dim(), "-D");
  auto st = q.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "flexjit.varlen_attention: q has dtype ", st, "; supported: float32, bfloat16, float16");
  TORCH_CHECK_VALUE(k.scalar_type() == st && v.scalar_type() == st,
                    "flexjit.varlen_attention: q, k, v must share a dtype, got ", st, ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  for (auto [t, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"}, {&cu_seqlens_k, "cu_seqlens_k"}})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kInt, "flexjit.varlen_attention: ", name,
                      " must be int32 [batch + 1], got ", t->scalar_type(), " with ", t->dim(),
                      " dims (convert with .to(torch.int32))");
  at::Tensor out = at::empty_symint({q.sym_size(0), q.sym_size(1), v.sym_size(2)}, q.options());
  at::Tensor lse = return_lse ? at::empty_symint({q.sym_size(1), q.sym_size(0)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  return std::make_tuple(out, lse);
}

struct VarlenAttentionOp {
  static constexpr const char* schema = "flexjit::varlen_attention";
  static constexpr const char* python_name = "flexjit.varlen_attention";
  static constexpr const char* train_with = "PyTorch's scaled_dot_product_attention on padded input";
  static constexpr bool lse_is_result = false;
  using Signature = decltype(varlen_attention_cpu);
};

std::tuple<at::Tensor, at::Tensor> varlen_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::string& score_mod_text,
    const std::string& mask_mod_text, const Tensors& buffers, const Names& buffer_names,
    const Names& param_names, at::ArrayRef<double> param_values, bool return_lse, int64_t BLOCK_M,
    int64_t BLOCK_N, int64_t USE_AMX, int64_t USE_DPBF16) {
  auto r = NoBackward<VarlenAttentionOp>::apply(
      q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, score_mod_text, mask_mod_text, buffers, buffer_names, param_names,
      param_values, return_lse, BLOCK_M, BLOCK_N, USE_AMX, USE_DPBF16);
  return std::make_tuple(r[0], r[1]);
}

// ---- merge_attention_states ----

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a,
                                                              const at::Tensor& lse_a,
                                                              const at::Tensor& out_b,
                                                              const at::Tensor& lse_b) {
  return surface_errors("flexjit.merge_attention_states",
                        [&] { return merge_attention_states(out_a, lse_a, out_b, lse_b); });
}

// Shapes only: out like out_a (contiguous), lse like lse_a (fp32). Ranks and dtypes are checked
// here; sizes are compared by the CPU kernel (comparing symbolic sizes would add guards).
std::tuple<at::Tensor, at::Tensor> merge_attention_states_meta(const at::Tensor& out_a,
                                                               const at::Tensor& lse_a,
                                                               const at::Tensor& out_b,
                                                               const at::Tensor& lse_b) {
  TORCH_CHECK_VALUE(out_a.dim() >= 2 && out_a.dim() <= 4,
                    "flexjit.merge_attention_states: out_a must have 2 to 4 dims [..., L, Dv], got ",
                    out_a.dim(), "-D");
  auto st = out_a.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "flexjit.merge_attention_states: out_a has dtype ", st,
                    "; supported: float32, bfloat16, float16");
  TORCH_CHECK_VALUE(out_b.dim() == out_a.dim() && out_b.scalar_type() == st,
                    "flexjit.merge_attention_states: out_b must have out_a's rank and dtype (",
                    out_a.dim(), "-D ", st, "), got ", out_b.dim(), "-D ", out_b.scalar_type());
  for (auto [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}})
    TORCH_CHECK_VALUE(t->dim() == out_a.dim() - 1 && t->scalar_type() == at::kFloat,
                      "flexjit.merge_attention_states: ", name, " must be fp32 with ",
                      out_a.dim() - 1, " dims (out_a's leading dims), got ", t->scalar_type(),
                      " with ", t->dim(), " dims");
  return std::make_tuple(at::empty_symint(out_a.sym_sizes(), out_a.options()),
                         at::empty_symint(lse_a.sym_sizes(), lse_a.options()));
}

struct MergeAttentionStatesOp {
  static constexpr const char* schema = "flexjit::merge_attention_states";
  static constexpr const char* python_name = "flexjit.merge_attention_states";
  static constexpr const char* train_with = "the same formula in torch ops";
  static constexpr bool lse_is_result = true;
  using Signature = decltype(merge_attention_states_cpu);
};

std::tuple<at::Tensor, at::Tensor> merge_attention_states_autograd(const at::Tensor& out_a,
                                                                   const at::Tensor& lse_a,
                                                                   const at::Tensor& out_b,
                                                                   const at::Tensor& lse_b) {
  auto r = NoBackward<MergeAttentionStatesOp>::apply(out_a, lse_a, out_b, lse_b);
  return std::make_tuple(r[0], r[1]);
}

// Our BlockMask builder (interval analysis + exact JIT'd classification, no dense mask) with
// its result in PyTorch's layout, for BlockMask.from_kv_blocks. B or H come back as 1 when
// the mask_mod does not read b or h. Data-dependent shapes, so CPU only (build masks outside
// compiled regions, as with PyTorch's create_block_mask).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> create_block_mask_cpu(
    const std::string& mask_mod_text, int64_t B, int64_t H, int64_t Q_LEN, int64_t KV_LEN,
    const Tensors& buffers, const Names& buffer_names, const Names& param_names,
    at::ArrayRef<double> param_values, int64_t q_block_size, int64_t kv_block_size) {
  return surface_errors("flexjit.create_block_mask", [&] {
    if (mask_mod_text.empty())
      throw Error("create_block_mask needs a mask_mod (a registered name or expression)");
    ModArgs args = collect(buffers, buffer_names, param_names, param_values);
    ModRef mm = make(mask_mod_text, ModKind::Mask, args);
    check_all_used(args, {&mm.traced});
    TorchBlockMask m = create_block_mask(mm, B, H, Q_LEN, KV_LEN, q_block_size, kv_block_size);
    TorchBlockMaskTensors t = to_torch_block_mask(m.mask);
    return std::make_tuple(t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks, t.full_kv_indices);
  });
}

// The read-only prebuilt kernel directory this process's cache reads (jit/cache.h: resolved once,
// from $FLEXJIT_PREBUILT_DIR or flexjit-kernels beside the op library); "" when there is none.
std::string prebuilt_kernel_dir() { return jit::KernelCache::global().prebuilt_dir(); }

// flex_attention's forward has a CUDA kernel (flex_attention_cuda); its backward does not yet.
// Autograd reaches this when out.backward() runs after a CUDA forward: say so instead of torch's
// "could not run ... with arguments from the 'CUDA' backend".
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> flex_attention_backward_cuda(
    const at::Tensor&, const at::Tensor& query, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::string&, const std::string&, const Tensors&, const Names&, const Names&,
    at::ArrayRef<double>, std::optional<double>, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
    int64_t, const Names&, const std::optional<at::Tensor>&) {
  TORCH_CHECK_VALUE(false, "flexjit.flex_attention_backward: the backward pass runs on CPU only (query is on ",
                    query.device().str(), "); flex_attention has a CUDA forward but no CUDA backward yet. Run "
                    "CUDA calls under torch.no_grad() / torch.inference_mode(), or train with CPU tensors");
}

}  // namespace
}  // namespace flexjit

TORCH_LIBRARY(flexjit, m) { flexjit::define_flexjit_ops(m); }

TORCH_LIBRARY_IMPL(flexjit, CPU, m) {
  m.impl("flex_attention", &flexjit::flex_attention_cpu);
  m.impl("flex_attention_backward", &flexjit::flex_attention_backward_cpu);
  m.impl("paged_flex_attention", &flexjit::paged_flex_attention_cpu);
  m.impl("varlen_attention", &flexjit::varlen_attention_cpu);
  m.impl("merge_attention_states", &flexjit::merge_attention_states_cpu);
}

// CUDA: the prefill and decode kernels (runtime/torch/cuda_attention.cpp, NVRTC-compiled, launched
// on torch's current stream). The other ops have no CUDA kernel; torch then names the backends
// they have.
TORCH_LIBRARY_IMPL(flexjit, CUDA, m) {
  m.impl("flex_attention", &flexjit::ops::flex_attention_cuda);
  m.impl("flex_attention_backward", &flexjit::flex_attention_backward_cuda);
  m.impl("paged_flex_attention", &flexjit::ops::paged_flex_attention_cuda);
}

TORCH_LIBRARY_IMPL(flexjit, Meta, m) {
  m.impl("flex_attention", &flexjit::flex_attention_meta);
  m.impl("flex_attention_backward", &flexjit::flex_attention_backward_meta);
  m.impl("paged_flex_attention", &flexjit::paged_flex_attention_meta);
  m.impl("varlen_attention", &flexjit::varlen_attention_meta);
  m.impl("merge_attention_states", &flexjit::merge_attention_states_meta);
}

TORCH_LIBRARY_IMPL(flexjit, Autograd, m) {
  m.impl("flex_attention", &flexjit::flex_attention_autograd);
  m.impl("paged_flex_attention", &flexjit::paged_flex_attention_autograd);
  m.impl("varlen_attention", &flexjit::varlen_attention_autograd);
  m.impl("merge_attention_states", &flexjit::merge_attention_states_autograd);
}

// create_block_mask reads no tensors (only optional buffers), so it cannot dispatch on them:
// CompositeExplicitAutograd makes it callable with an empty buffer list.
TORCH_LIBRARY_IMPL(flexjit, CompositeExplicitAutograd, m) {
  m.impl("create_block_mask", &flexjit::create_block_mask_cpu);
  m.impl("prebuilt_kernel_dir", &flexjit::prebuilt_kernel_dir);
}

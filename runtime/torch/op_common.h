// What both op libraries' kernels share (ops.cpp: the full build's CPU, CUDA, Meta and Autograd
// kernels; ops_cuda_only.cpp: the CUDA-only build's): the mods' arguments as the schemas pass them,
// flexjit::Error -> Python ValueError, and flex_attention's Meta kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "jit/parser.h"
#include "jit/trace.h"
#include "jit/types.h"

namespace flexjit::ops {

// The mods' captured tensors and scalars, by name, from the op's parallel lists.
struct ModArgs {
  std::map<std::string, at::Tensor> buffers;
  std::map<std::string, double> params;
};

// A schema cannot default a list of tensors or strings to [], so those are optional (None =
// empty).
using Tensors = std::optional<std::vector<at::Tensor>>;
using Names = std::optional<std::vector<std::string>>;

inline ModArgs collect(const Tensors& buffers_opt, const Names& buffer_names_opt, const Names& param_names_opt,
                       at::ArrayRef<double> param_values) {
  const std::vector<std::string> none, &buffer_names = buffer_names_opt ? *buffer_names_opt : none,
                                       &param_names = param_names_opt ? *param_names_opt : none;
  const at::TensorList buffers = buffers_opt ? at::TensorList(*buffers_opt) : at::TensorList();
  if (buffers.size() != buffer_names.size())
    throw Error("got " + std::to_string(buffers.size()) + " buffers but " +
                std::to_string(buffer_names.size()) + " buffer names; pass one name per tensor");
  if (param_names.size() != param_values.size())
    throw Error("got " + std::to_string(param_names.size()) + " param names but " +
                std::to_string(param_values.size()) + " values; pass one value per name");
  ModArgs a;
  for (size_t i = 0; i < buffers.size(); ++i)
    if (!a.buffers.emplace(buffer_names[i], buffers[i]).second)
      throw Error("buffer '" + buffer_names[i] + "' is given twice");
  for (size_t i = 0; i < param_names.size(); ++i)
    if (!a.params.emplace(param_names[i], param_values[i]).second)
      throw Error("param '" + param_names[i] + "' is given twice");
  return a;
}

// A buffer or param that no mod reads is almost always a typo (or a registered mod's param
// spelled differently); say so instead of silently running with the default.
inline void check_all_used(const ModArgs& a, const std::vector<const TracedMod*>& mods) {
  std::set<std::string> buffers, params;
  for (const TracedMod* m : mods) {
    for (const auto& d : m->buffers) buffers.insert(d.name);
    for (const auto& [n, v] : m->bindings.params) params.insert(n);
  }
  for (const auto& [n, t] : a.buffers)
    if (!buffers.count(n))
      throw Error("buffer '" + n + "' is given but neither score_mod nor mask_mod reads it");
  for (const auto& [n, v] : a.params)
    if (!params.count(n))
      throw Error("param '" + n + "' is given but neither score_mod nor mask_mod reads it");
}

// Runs `f`, turning flexjit's user errors into c10::ValueError (Python ValueError) that carry
// flexjit's message unchanged.
template <typename F>
auto surface_errors(const char* op, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const ParseError& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const Error& e) {
    // The runtime's own messages already start with the function's name.
    std::string msg = e.what(), name = std::string(op).substr(sizeof("flexjit.") - 1);
    TORCH_CHECK_VALUE(false, msg.rfind(name, 0) == 0 ? msg : std::string(op) + ": " + msg);
  }
}

// Shapes only: out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] fp32 (or [0]). Checks what
// can be checked without data, so torch.compile reports bad ranks and dtypes at trace time.
inline std::tuple<at::Tensor, at::Tensor> flex_attention_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::string&,
    const std::string&, const Tensors&, const Names&, const Names&, at::ArrayRef<double>,
    std::optional<double>, bool, bool return_lse, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t,
    int64_t) {
  for (auto [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&value, "value"}})
    TORCH_CHECK_VALUE(t->dim() == 4, "flexjit.flex_attention: ", name,
                      " must be 4-D [B, H, L, D], got ", t->dim(), "-D");
  auto st = query.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "flexjit.flex_attention: query has dtype ", st,
                    "; supported: float32, bfloat16, float16");
  TORCH_CHECK_VALUE(key.scalar_type() == st && value.scalar_type() == st,
                    "flexjit.flex_attention: query, key, value must share a dtype, got ", st, ", ",
                    key.scalar_type(), ", ", value.scalar_type());
  at::Tensor out =
      at::empty_symint({query.sym_size(0), query.sym_size(1), query.sym_size(2), value.sym_size(3)},
                       query.options());
  at::Tensor lse = return_lse
                       ? at::empty_symint({query.sym_size(0), query.sym_size(1), query.sym_size(2)},
                                          query.options().dtype(at::kFloat))
                       : at::empty({0}, query.options().dtype(at::kFloat));
  return std::make_tuple(out, lse);
}

// Shapes only: out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] fp32 (or [0]). The tables'
// contents (page indices, lengths) are data, checked by the kernels.
inline std::tuple<at::Tensor, at::Tensor> paged_flex_attention_meta(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const std::string&,
    const std::string&, const Tensors&, const Names&, const Names&, at::ArrayRef<double>,
    std::optional<double>, bool, bool return_lse, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK_VALUE(query.dim() == 4, "flexjit.paged_flex_attention: query must be 4-D [B, Hq, Lq, D], got ",
                    query.dim(), "-D");
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    TORCH_CHECK_VALUE(t->dim() == 4, "flexjit.paged_flex_attention: ", name,
                      " must be 4-D [num_pages, page_size, Hkv, D], got ", t->dim(), "-D");
  // Only a static Lq is checked here: comparing a symbolic one would add a guard to the graph.
  if (auto lq = query.sym_size(2).maybe_as_int(); lq && *lq > 16)
    TORCH_CHECK_VALUE(false, "flexjit.paged_flex_attention: paged attention runs the decode kernel, for up to "
                      "16 query rows per sequence; got Lq=", *lq, ". Run longer queries (prefill) with "
                      "flex_attention on contiguous K/V");
  auto st = query.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "flexjit.paged_flex_attention: query has dtype ", st,
                    "; supported: float32, bfloat16, float16");
  TORCH_CHECK_VALUE(k_cache.scalar_type() == st && v_cache.scalar_type() == st,
                    "flexjit.paged_flex_attention: query, k_cache, v_cache must share a dtype, got ", st,
                    ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.scalar_type() == at::kInt,
                    "flexjit.paged_flex_attention: block_table must be int32 [B, max_pages], got ",
                    block_table.scalar_type(), " with ", block_table.dim(),
                    " dims (convert with .to(torch.int32))");
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt,
                    "flexjit.paged_flex_attention: seq_lens must be int32 [B], got ",
                    seq_lens.scalar_type(), " with ", seq_lens.dim(),
                    " dims (convert with .to(torch.int32))");
  at::Tensor out = at::empty_symint(
      {query.sym_size(0), query.sym_size(1), query.sym_size(2), v_cache.sym_size(3)}, query.options());
  at::Tensor lse = return_lse
                       ? at::empty_symint({query.sym_size(0), query.sym_size(1), query.sym_size(2)},
                                          query.options().dtype(at::kFloat))
                       : at::empty({0}, query.options().dtype(at::kFloat));
  return std::make_tuple(out, lse);
}

// flex_attention's CUDA kernel (runtime/torch/cuda_attention.cpp): the op's arguments in schema
// order, q, k, v bf16 / fp16 on one CUDA device. Registered by both op libraries.
std::tuple<at::Tensor, at::Tensor> flex_attention_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::string& score_mod_text,
    const std::string& mask_mod_text, const Tensors& buffers, const Names& buffer_names, const Names& param_names,
    at::ArrayRef<double> param_values, std::optional<double> scale, bool enable_gqa, bool return_lse,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks, const std::optional<at::Tensor>& full_kv_indices,
    int64_t q_block_size, int64_t kv_block_size, int64_t BLOCK_M, int64_t BLOCK_N, int64_t USE_AMX,
    int64_t PARTITION_SIZE, bool FORCE_USE_FLEX_ATTENTION, int64_t USE_DPBF16, int64_t USE_WGMMA);

// paged_flex_attention's CUDA kernel (cuda_attention.cpp): the CUDA decode kernel on a paged cache.
std::tuple<at::Tensor, at::Tensor> paged_flex_attention_cuda(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const std::string& score_mod_text, const std::string& mask_mod_text,
    const Tensors& buffers, const Names& buffer_names, const Names& param_names, at::ArrayRef<double> param_values,
    std::optional<double> scale, bool enable_gqa, bool return_lse, int64_t BLOCK_M, int64_t BLOCK_N,
    int64_t PARTITION_SIZE, int64_t USE_AMX);

}  // namespace flexjit::ops

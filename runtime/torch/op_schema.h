// The schemas of torch.ops.flexjit.*: one definition for both op libraries (ops.cpp in the full
// build, ops_cuda_only.cpp in the CUDA-only build), so the two can never disagree. The schemas are
// a public contract: append new arguments at the end, never rename or reorder.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

namespace flexjit {

// Defines every op of the flexjit namespace in `m` (the body of TORCH_LIBRARY(flexjit, m)). A
// library that has no kernel of an op for a device leaves torch's own "could not run ... with
// arguments from the 'CPU' backend" error for it.
inline void define_flexjit_ops(torch::Library& m) {
  // clang-format off
  m.def("flex_attention(Tensor query, Tensor key, Tensor value, str score_mod=\"\", "
        "str mask_mod=\"\", Tensor[]? buffers=None, str[]? buffer_names=None, "
        "str[]? param_names=None, float[] param_values=[], float? scale=None, "
        "bool enable_gqa=False, bool return_lse=False, Tensor? kv_num_blocks=None, "
        "Tensor? kv_indices=None, Tensor? full_kv_num_blocks=None, Tensor? full_kv_indices=None, "
        "int q_block_size=128, int kv_block_size=128, int BLOCK_M=0, int BLOCK_N=0, int USE_AMX=-1, "
        "int PARTITION_SIZE=0, bool FORCE_USE_FLEX_ATTENTION=False, int USE_DPBF16=-1, int USE_WGMMA=-1) "
        "-> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("flex_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor lse, str score_mod=\"\", str mask_mod=\"\", Tensor[]? buffers=None, str[]? buffer_names=None, "
        "str[]? param_names=None, float[] param_values=[], float? scale=None, bool enable_gqa=False, "
        "Tensor? kv_num_blocks=None, Tensor? kv_indices=None, Tensor? full_kv_num_blocks=None, "
        "Tensor? full_kv_indices=None, int q_block_size=128, int kv_block_size=128, "
        "str[]? grad_buffer_names=None, Tensor? grad_lse=None) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor[] dbuffers)",
        {at::Tag::pt2_compliant_tag});
  m.def("paged_flex_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, str score_mod=\"\", str mask_mod=\"\", Tensor[]? buffers=None, "
        "str[]? buffer_names=None, str[]? param_names=None, float[] param_values=[], "
        "float? scale=None, bool enable_gqa=False, bool return_lse=False, int BLOCK_M=0, "
        "int BLOCK_N=0, int PARTITION_SIZE=0, int USE_AMX=-1) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float? softmax_scale=None, bool causal=False, "
        "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, "
        "str score_mod=\"\", str mask_mod=\"\", Tensor[]? buffers=None, str[]? buffer_names=None, "
        "str[]? param_names=None, float[] param_values=[], bool return_lse=False, int BLOCK_M=0, "
        "int BLOCK_N=0, int USE_AMX=-1, int USE_DPBF16=-1) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
        "-> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("create_block_mask(str mask_mod, int B, int H, int Q_LEN, int KV_LEN, "
        "Tensor[]? buffers=None, str[]? buffer_names=None, str[]? param_names=None, "
        "float[] param_values=[], int q_block_size=128, int kv_block_size=128) "
        "-> (Tensor kv_num_blocks, Tensor kv_indices, Tensor full_kv_num_blocks, "
        "Tensor full_kv_indices)");
  m.def("prebuilt_kernel_dir() -> str");
  // clang-format on
}

}  // namespace flexjit

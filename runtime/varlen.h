// Varlen attention with FlashAttention-2's semantics: sequences of different lengths packed into
// one tensor with cu_seqlens instead of padding. Runs the prefill kernel
// (templates/cpu/flash_prefill.h) in its varlen mode: work items are (sequence, head, q-block),
// listed dearest first, and a tile visits only the KV blocks of its causal / window band, so no
// padded row and no block outside the band is ever computed.
//
// FA2's options map onto the mod pipeline: softcap and ALiBi become a score_mod wrapped around
// the user's (order: scale, softcap, ALiBi, user score_mod, masks), and the causal / window band
// a mask_mod and-ed with the user's, evaluated only on blocks the band cuts. Their runtime data
// (per-sequence offsets, slopes, the softcap value) are buffers and params, so a new softcap or
// new lengths never recompile.
#pragma once

#include <cstdint>
#include <optional>

#include "runtime/attention.h"

namespace flexjit {

struct VarlenOptions {
  std::optional<double> scale;  // softmax_scale: default 1/sqrt(D)
  // Bottom-right aligned when a sequence's query and key counts differ: query i of a sequence
  // with sq queries and sk keys sits at key position i + sk - sq. causal = window_right 0.
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1 = unlimited on that side
  double softcap = 0;                           // > 0: s -> softcap * tanh(s / softcap), s scaled
  // fp32 [Hq] or [batch, Hq] (null: none): bias -slope * |i + sk - sq - j|.
  const TensorView* alibi_slopes = nullptr;
};

// FA2's flash_attn_varlen_func on packed views:
//   q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv] (fp32, bf16 or fp16, any
//   strides; Hq a multiple of Hkv: GQA / MQA), cu_seqlens_q / cu_seqlens_k int32 [batch + 1]
//   (0, then non-decreasing; sequences may be empty, and q and k lengths differ per sequence),
//   max_seqlen_q / max_seqlen_k at least the longest sequence,
//   out [total_q, Hq, Dv] (q's dtype), lse fp32 [Hq, total_q] (natural log) or null.
// Rows that no sequence covers (past cu_seqlens_q[batch]) and rows whose band holds no key get
// out 0 and lse -inf. The user's mods see b = the sequence and q_idx / kv_idx inside it.
// opt: BLOCK_M / BLOCK_N, USE_AMX / USE_DPBF16, threads, the pool and use_tuning are honoured
// (enable_gqa is implied, decode options do not apply). Throws flexjit::Error on bad input.
void varlen_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, const TensorView& out, const TensorView* lse, const ModSet& mods,
                      const ModBindings& bind, const VarlenOptions& vopt = {}, const AttentionOptions& opt = {},
                      AttentionReport* report = nullptr);

}  // namespace flexjit

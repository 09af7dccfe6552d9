// A float64 reference attention (used by the tests, the demo and `flexjit run --check`). It reads the kernel's
// inputs as stored (already rounded to the kernel dtype), computes in double, and evaluates
// mods with ir::eval, independently of codegen and templates. A plain fp32 version gives the
// "low-precision baseline" error that tolerances are scaled by.
#pragma once

#include <vector>

#include "jit/mods.h"
#include "runtime/varlen.h"

namespace flexjit {

struct RefResult {
  std::vector<double> out;  // [B, Hq, Lq, Dv] contiguous
  std::vector<double> lse;  // [B, Hq, Lq], natural log; -inf for fully masked rows
};

// q [B,Hq,Lq,D], k/v [Bkv,Hkv,Lkv,D/Dv] strided views. `fp32` = compute in float instead.
// `rows`, if non-empty, limits the work to those query rows (others stay 0 / -inf), so large
// shapes can be spot-checked.
RefResult reference_attention(const TensorView& q, const TensorView& k, const TensorView& v, const ModSet& mods,
                              const ModBindings& bind, double scale, bool fp32 = false,
                              const std::vector<int64_t>& rows = {});

// The same for a paged KV cache (paged_flex_attention's contract): sequence b has seq_lens[b]
// keys, key j in page block_table[b, j / page_size] at slot j % page_size, and its query i sits
// at the absolute position seq_lens[b] - Lq + i (what the mods see as q_idx). A sequence of
// length 0 gives out 0, lse -inf.
RefResult reference_paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                                    const TensorView& block_table, const TensorView& seq_lens, const ModSet& mods,
                                    const ModBindings& bind, double scale, bool fp32 = false,
                                    const std::vector<int64_t>& rows = {});

// FlashAttention-2's varlen semantics, written out directly (not through the mods the runtime
// composes): q [total_q, Hq, D], k / v [total_k, Hkv, D / Dv] packed by cu_seqlens (int32
// [batch + 1]); per sequence, score = scale * q.k, then softcap, ALiBi -slope * |i + sk - sq - j|,
// the user's score_mod, then the causal / window band (bottom-right) and the user's mask_mod;
// the user mods see b = the sequence and in-sequence positions. out [total_q, Hq, Dv] and
// lse [Hq, total_q] in that (row-major) order; rows of no sequence or with no key: 0 / -inf.
RefResult reference_varlen_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                                     const std::vector<int32_t>& cu_seqlens_q,
                                     const std::vector<int32_t>& cu_seqlens_k, const ModSet& mods,
                                     const ModBindings& bind, const VarlenOptions& opt, bool fp32 = false);

// The gradients of reference_attention's result given dout = dL/d(out), in float64, written out
// from the softmax's derivative: dv = P^T dout, dz = P (dP - rowsum(P dP)), ds = dz * score_mod'
// and dq = scale ds k, dk = scale ds^T q. Derivatives of the mods are central finite differences
// of ir::eval (never jit/grad): score_mod' per score, and for each buffer in grad_buffers the
// partial per element (cost: elements x B x Hq x Lq x Lkv evaluations, small shapes only).
// dq [B, Hq, Lq, D], dk / dv [Bkv, Hkv, Lkv, D / Dv] (Bkv = 1: summed over the batch), dbuf in
// grad_buffers order, each row-major with the buffer's sizes.
struct RefGrads {
  std::vector<double> dq, dk, dv;
  std::vector<std::vector<double>> dbuf;
};
// dlse (optional, [B, Hq, Lq]): dL/d(lse) as well, adding dlse * P to dz.
RefGrads reference_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& dout, const ModSet& mods, const ModBindings& bind,
                                      double scale, const std::vector<std::string>& grad_buffers = {},
                                      const TensorView* dlse = nullptr);

// Max |out - ref.out| over query rows `rows` of every (b, h); out is [B, Hq, Lq, Dv], any strides.
double max_abs_error(const TensorView& out, const RefResult& ref, const std::vector<int64_t>& rows);

// Deterministic pseudo-random fill (uniform in [-1, 1)) of a contiguous tensor of any float dtype.
void fill_random(TensorView t, uint64_t seed);

// Converts any view to a contiguous vector of doubles.
std::vector<double> to_doubles(const TensorView& t);

}  // namespace flexjit

// One KV block of the flash loop for a warp's 16 query rows: the steps the CUDA prefill and
// decode kernels share (templates/cuda/flash_prefill.cuh, flash_decode.cuh). After the generated
// mod body (flexjit_score_mod / flexjit_mask_mod, FLEXJIT_HAS_SCORE_MOD / _MASK_MOD) and
// templates/cuda/common.cuh; header-free.
//
//   S = Q K^T                      fjc_block_scores (mma; Q and K through ldmatrix; kMT m16
//                                  tiles per warp share each K / V fragment)
//   S = score_mod(scale S), mask   fjc_block_softmax_row, per row of the thread (two rows):
//   m' = max(m, rowmax S)            base 2 (scores carry log2 e), -inf where masked or outside
//   P = 2^(S - m'), alpha = 2^(m - m')  the call's ranges (the mods are never called there)
//   l = l alpha + rowsum P, O = O alpha
//   O += P V                       fjc_block_pv (P re-packed from the S accumulators into A
//                                  fragments; V through ldmatrix.trans)
// Lane l holds, of each 16 x 8 accumulator tile, rows l / 4 (index 0) and l / 4 + 8 (index 1) at
// columns 2 (l % 4) + {0, 1}.
#ifndef FLEXJIT_CUDA_FLASH_BLOCK_H
#define FLEXJIT_CUDA_FLASH_BLOCK_H

static constexpr float fjc_kLog2e = 1.44269504088896340736f;
static constexpr float fjc_kLn2 = 0.693147180559945309417f;

// Row r (0 or 1) of the thread's O accumulators times alpha.
template <int kOT>
FJC_DEV void fjc_scale_row(float (&o)[kOT][4], int r, float alpha) {
#pragma unroll
  for (int t = 0; t < kOT; ++t) {
    o[t][2 * r] *= alpha;
    o[t][2 * r + 1] *= alpha;
  }
}

// S = Q K^T for kMT m16 tiles of a warp (16 kMT rows) against the block's kNT * 8 keys: sQw points
// at the warp's first Q row (row stride kQS elements, kDP columns), sK at the block's first key
// (row stride kKS). Each K fragment is loaded once for all kMT tiles (FA2's way of halving the
// shared-memory reads per FLOP with two tiles per warp).
template <int kMT, int kNT, int kDP, int kQS, int kKS>
FJC_DEV void fjc_block_scores(float (&s)[kMT][kNT][4], const fjc_u16* sQw, const fjc_u16* sK, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int t = 0; t < kNT; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kDP / 16; ++kk) {
    unsigned qa[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
      fjc_ldmatrix_x4(qa[mt], sQw + (mt * 16 + lane % 16) * kQS + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int t = 0; t < kNT; t += 2) {
      unsigned kb[4];  // b0, b1 of key tile t, then of tile t + 1
      fjc_ldmatrix_x4(kb, sK + (t * 8 + (lane % 8) + (lane / 16) * 8) * kKS + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        fjc_mma(s[mt][t], qa[mt], kb[0], kb[1]);
        fjc_mma(s[mt][t + 1], qa[mt], kb[2], kb[3]);
      }
    }
  }
}

// Row r (0 or 1) of the thread: the mods at (b, h, q_idx, kv0 + col) for columns < nvalid of a row
// inside the call (row_ok), mask_mod on partial blocks only; then the online-softmax step on the
// scores (S becomes P) and the row's max and sum. Returns alpha, the factor the row's O must be
// scaled by before P V is added (the caller scales it: the wgmma engine's O may be in flight). A
// row with no finite score yet uses 0 as its reference: P = 2^-inf = 0 and alpha = 2^(-inf - 0) =
// 0, never -inf - -inf = NaN.
template <int kNT>
FJC_DEV float fjc_block_softmax_p(float (&s)[kNT][4], float& m_run, float& l_run, int r, bool row_ok, fj_i64 b,
                                  fj_i64 h, fj_i64 q_idx, fj_i64 kv0, fj_i64 nvalid, bool partial, float scale,
                                  const struct FlexModArgs* mod, int lane) {
  float mx = FJC_NEG_INF;
#pragma unroll
  for (int t = 0; t < kNT; ++t) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = t * 8 + (lane % 4) * 2 + j;
      const fj_i64 kv_idx = kv0 + col;
      float x = s[t][2 * r + j];
      if (!row_ok || col >= nvalid) {
        x = FJC_NEG_INF;  // mods are only ever called inside the call's ranges
      } else {
#if FLEXJIT_HAS_SCORE_MOD
        x = flexjit_score_mod(x * scale, b, h, q_idx, kv_idx, mod) * fjc_kLog2e;
#else
        x = x * (scale * fjc_kLog2e);
#endif
#if FLEXJIT_HAS_MASK_MOD
        if (partial && !flexjit_mask_mod(b, h, q_idx, kv_idx, mod)) x = FJC_NEG_INF;
#endif
      }
      (void)kv_idx;
      s[t][2 * r + j] = x;
      mx = fmaxf(mx, x);
    }
  }
  (void)b, (void)h, (void)q_idx, (void)partial, (void)mod;
  // The row's 8 columns per tile live in the 4 lanes of a quad.
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m_run, mx);
  const float ref = m_new == FJC_NEG_INF ? 0.0f : m_new;
  const float alpha = exp2f(m_run - ref);
  m_run = m_new;
  float sum = 0.0f;
#pragma unroll
  for (int t = 0; t < kNT; ++t) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float p = exp2f(s[t][2 * r + j] - ref);
      s[t][2 * r + j] = p;
      sum += p;
    }
  }
  l_run = l_run * alpha + sum;
  return alpha;
}

// The same with row r of O scaled at once (the mma.sync engine's O is never in flight).
template <int kNT, int kOT>
FJC_DEV void fjc_block_softmax_row(float (&s)[kNT][4], float (&o)[kOT][4], float& m_run, float& l_run, int r,
                                   bool row_ok, fj_i64 b, fj_i64 h, fj_i64 q_idx, fj_i64 kv0, fj_i64 nvalid,
                                   bool partial, float scale, const struct FlexModArgs* mod, int lane) {
  const float alpha =
      fjc_block_softmax_p<kNT>(s, m_run, l_run, r, row_ok, b, h, q_idx, kv0, nvalid, partial, scale, mod, lane);
  fjc_scale_row<kOT>(o, r, alpha);
}

// O (kMT m16 tiles x kOT * 8 columns) += P V: P in the S accumulators (16 keys = two S tiles per
// k-step), V from sV (the block's first key, row stride kVS); each V fragment loaded once for all
// kMT tiles.
template <int kMT, int kNT, int kOT, int kVS>
FJC_DEV void fjc_block_pv(float (&o)[kMT][kOT][4], const float (&s)[kMT][kNT][4], const fjc_u16* sV, int lane) {
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {
    unsigned pa[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      pa[mt][0] = fjc_pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      pa[mt][1] = fjc_pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      pa[mt][2] = fjc_pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      pa[mt][3] = fjc_pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int t = 0; t < kOT; t += 2) {
      unsigned vb[4];  // b0, b1 of output tile t, then of tile t + 1
      fjc_ldmatrix_x4_trans(vb, sV + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kVS + t * 8 + (lane / 16) * 8);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        fjc_mma(o[mt][t], pa[mt], vb[0], vb[1]);
        fjc_mma(o[mt][t + 1], pa[mt], vb[2], vb[3]);
      }
    }
  }
}

#endif  // FLEXJIT_CUDA_FLASH_BLOCK_H

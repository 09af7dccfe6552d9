// AMX tile machinery shared by the CPU prefill and decode kernels' AMX engines
// (cpu/prefill_amx.h, cpu/decode_amx.h): bf16 and fp16 Q K^T and P V on AMX tiles (tdpbf16ps,
// fp32 accumulation). Preceded by the spec macros, mod_abi.h, cpu/common.h and cpu/elem.h. The
// runtime picks these engines on hosts with AMX-BF16 once the process may use the tile data state
// (Linux arch_prctl(ARCH_REQ_XCOMP_PERM)); without that permission the first tile instruction
// faults.
//
// Layouts (m: query row of the tile, n: KV row of the block, d / dv: features):
//   qv  Q in VNNI pairs [d/2][m]: the dword (Q[m][2p], Q[m][2p+1]); packed once per item,
//       unscaled (bf16 inputs are multiplied exactly; the scale is applied to fp32 scores)
//   kb  K [n][d] bf16, zero padded; or K read in place when its rows are evenly strided
//   st  S^T then P^T [n][m] fp32 (mods, softmax)
//   pb  P [m][n] bf16: P^T transposed in 16 x 16 blocks and rounded to bf16
//   vb  V in VNNI pairs [n/2][dv]: the dword (V[2p][dv], V[2p+1][dv])
//   ob  O [m][dv] fp32, unnormalised
// so that
//   S^T tile (16 n x 16 m) += K tile (16 n x 32 d) * qv tile (16 d-pairs x 16 m)
//   O tile   (16 m x 16 dv) += P tile (16 m x 32 n) * vb tile (16 n-pairs x 16 dv)
// with one tile configuration for both: eight 16-row x 64-byte tiles, 0-3 accumulators,
// 4-5 the left operands, 6-7 the right ones, used as 2 x 2 blocks of accumulators.
//
// bf16: P is rounded to bf16 for P V, as every bf16 flash attention does; the row sums l use
// the fp32 P. The output is rounded to bf16 anyway.
//
// fp16 (kSplit = 3): AMX-BF16 has no fp16 product (AMX-FP16 is Granite Rapids' and later) and
// AVX512-FP16's FMAs accumulate in fp16 (11-bit sums that overflow past 65504), so each fp16
// operand x is split into two bf16, hi = bf16(x) and lo = bf16(x - hi). An fp16 has 11
// significant bits and bf16 8, so lo holds the remaining <= 3 bits and hi + lo == x EXACTLY
// (every fp16, subnormals included, is a normal number in bf16's range). Then
//   q.k = qhi.khi + qhi.klo + qlo.khi  (+ qlo.klo, dropped: below 2^-16 of |q||k|)
// three tile products per step, each product exact in fp32, accumulated in fp32. P (fp32) is
// split the same way (hi + lo keeps ~16 of its 24 bits, 2^-17 relative) and
//   P V = Phi.Vhi + Phi.Vlo + Plo.Vhi.
// So fp16 gets fp32-accumulated products with ~2^-16 relative error, well below fp16's own
// input rounding (2^-11), at three times the bf16 tile work. The hi and lo halves are separate
// arrays (qv / qv + kQLo, ...); each step of the tile loops below runs all three products.

#if FLEXJIT_DTYPE == 1
static constexpr int kSplit = 1;  // one bf16 product per step
#elif FLEXJIT_DTYPE == 2
static constexpr int kSplit = 3;  // hi.hi + lo.hi + hi.lo (see above)
#else
#error "the AMX engine is bf16 and fp16 only"
#endif
static constexpr int kHalves = kSplit == 1 ? 1 : 2;  // bf16 operand arrays per input: hi (, lo)
#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "the AMX engine needs a host with AMX-TILE, AMX-BF16, AVX512-BF16 and AVX512-BW"
#endif
static_assert(BLOCK_N % 32 == 0, "the AMX engine needs BLOCK_N to be a multiple of 32");

typedef unsigned fjk_u32;
typedef unsigned short fj_v32h_u __attribute__((vector_size(64), aligned(2)));

static constexpr int kMP = (BLOCK_M + 15) / 16 * 16;  // query rows padded to whole tiles
static constexpr int kMV = kMP / 16;
static constexpr int kNP = BLOCK_N;                       // whole 32-row pairs of tiles
static constexpr int kDP = fjk_round_up(HEAD_DIM, 32);    // d padded to whole tile columns
static constexpr int kDVP = fjk_round_up(HEAD_DIM_V, 32); // dv padded to a pair of tiles

// Per-thread scratch, on the stack of the entry (no heap, no statics).
// The lo halves (fp16) follow the hi ones: qv + kQLo, kb + klo (the engine's), pb + kPLo, vb + kVLo.
static constexpr int kQLo = kDP / 2 * kMP;  // dwords
static constexpr int kPLo = kMP * kNP;      // words
static constexpr int kVLo = kNP / 2 * kDVP; // dwords

// ---- tiles ----
struct FjkTileConfig {
  unsigned char palette, start_row, reserved[14];
  unsigned short colsb[16];
  unsigned char rows[16];
};
static_assert(sizeof(struct FjkTileConfig) == 64, "tile configuration is 64 bytes");

#define FJK_TLOAD(tile, ptr, stride_bytes) __builtin_ia32_tileloadd64(tile, (const void*)(ptr), (fj_i64)(stride_bytes))
#define FJK_TSTORE(tile, ptr, stride_bytes) __builtin_ia32_tilestored64(tile, (void*)(ptr), (fj_i64)(stride_bytes))
#define FJK_TDP(c, a, b) __builtin_ia32_tdpbf16ps(c, a, b)

// ---- the fp16 split (kSplit = 3): x = hi + lo, both bf16 ----

// One element's bf16 words: bf16 as it is (lo unused); fp16 as hi = bf16(x), lo = bf16(x - hi).
static inline void fjk_split1(fjk_elem x, unsigned short* hi, unsigned short* lo) {
#if FLEXJIT_DTYPE == 1
  *hi = x;
  *lo = 0;
#else
  const float f = fjk_to_f32(x);
  fjk_from_f32(f, hi);
  fjk_from_f32(f - fjk_to_f32(*hi), lo);
#endif
}
// 32 fp32 values (a: the first 16, b: the next 16) as bf16 words hi and lo: hi = bf16(x),
// lo = bf16(x - hi) (x - hi is exact in fp32); hi + lo == x for fp16 values, and within 2^-17
// relative for any other fp32 (P).
static inline void fjk_split32(fj_v16f a, fj_v16f b, fj_v32h* hi, fj_v32h* lo) {
  const fj_v32h h = fjk_cvt2_bf16(b, a);
  const fj_v16h h0 = __builtin_shufflevector(h, h, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const fj_v16h h1 = __builtin_shufflevector(h, h, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  *hi = h;
  *lo = fjk_cvt2_bf16(b - fjk_bf16_to_f32(h1), a - fjk_bf16_to_f32(h0));
}

// Query row m of qv: qv[p][m] = (row[2p], row[2p + 1]) (fp16: the hi words; the lo words at
// qv + kQLo); features past HEAD_DIM are left as they are (zero).
static inline void fjk_amx_q_row(const fjk_elem* row, fj_i64 s_col, int m, fjk_u32* __restrict qv) {
  FJK_SCALAR_LOOP
  for (int d = 0; d < HEAD_DIM; d += 2) {
    unsigned short h0, l0, h1 = 0, l1 = 0;
    fjk_split1(row[d * s_col], &h0, &l0);
    if (d + 1 < HEAD_DIM) fjk_split1(row[(d + 1) * s_col], &h1, &l1);
    qv[d / 2 * kMP + m] = h0 | (fjk_u32)h1 << 16;
    if (kSplit > 1) qv[kQLo + d / 2 * kMP + m] = l0 | (fjk_u32)l1 << 16;
  }
}

// kb[n][d] = K[n][d] for n < nvalid (fp16: the hi words, the lo words at kb + klo), zero for
// the padding rows up to whole 32-row pairs and for d >= HEAD_DIM. row(n): key n's row (the
// prefill kernel's are strided, the decode kernel's read through row pointers).
template <class RowOf>
static inline void fjk_pack_k(RowOf row, fj_i64 s_col, int nvalid, int npad, int klo,
                              unsigned short* __restrict kb) {
  FJK_SCALAR_LOOP
  for (int n = 0; n < nvalid; ++n) {
    unsigned short* d = kb + n * kDP;
    unsigned short* dl = d + klo;  // fp16 only
    const fjk_elem* s = row(n);
    int c0 = 0;  // features [0, c0) done by the vector loop
    if (s_col == 1) {
      c0 = HEAD_DIM / 32 * 32;
      FJK_ROLLED_LOOP
      for (int c = 0; c < c0; c += 32) {
#if FLEXJIT_DTYPE == 1
        *(fj_v32h*)(d + c) = *(const fj_v32h_u*)(s + c);
#else
        fj_v32h h, l;
        fjk_split32(fjk_load16(s + c), fjk_load16(s + c + 16), &h, &l);
        *(fj_v32h*)(d + c) = h;
        *(fj_v32h*)(dl + c) = l;
#endif
      }
    }
    FJK_SCALAR_LOOP
    for (int c = c0; c < HEAD_DIM; ++c) {
      unsigned short h, l;
      fjk_split1(s[c * s_col], &h, &l);
      d[c] = h;
      if (kSplit > 1) dl[c] = l;
    }
    if (HEAD_DIM < kDP) {
      __builtin_memset(d + HEAD_DIM, 0, 2 * (kDP - HEAD_DIM));
      if (kSplit > 1) __builtin_memset(dl + HEAD_DIM, 0, 2 * (kDP - HEAD_DIM));
    }
  }
  if (nvalid < npad) {
    __builtin_memset(kb + nvalid * kDP, 0, 2 * kDP * (npad - nvalid));
    if (kSplit > 1) __builtin_memset(kb + klo + nvalid * kDP, 0, 2 * kDP * (npad - nvalid));
  }
}

// Rows x (KV row 2p) and y (2p + 1) of 32 features interleaved into 32 dwords at dst (two vectors).
static inline void fjk_store_vnni(fj_v32h x, fj_v32h y, fjk_u32* dst) {
  *(fj_v32h*)dst = __builtin_shufflevector(x, y, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8,
                                           40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47);
  *(fj_v32h*)(dst + 16) = __builtin_shufflevector(x, y, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22,
                                                  54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29,
                                                  61, 30, 62, 31, 63);
}
// 32 features of one KV row as bf16 words (fp16: hi and lo); a row past nvalid is 0.
static inline void fjk_load_v32(const fjk_elem* r, bool has, fj_v32h* hi, fj_v32h* lo) {
  *hi = *lo = (fj_v32h){};
  if (!has) return;
#if FLEXJIT_DTYPE == 1
  *hi = *(const fj_v32h_u*)r;
#else
  fjk_split32(fjk_load16(r), fjk_load16(r + 16), hi, lo);
#endif
}

// vb[p][dv] = (V[2p][dv], V[2p + 1][dv]) (fp16: the hi words, the lo words at vb + kVLo); rows
// >= nvalid and features >= Dv are 0 (P is 0 there too, but 0 * garbage could be NaN).
// pf(n, c): called once per 32 features c of row n read on the vector path (a hook for the
// decode engine's prefetches of the next block; the prefill engine passes a no-op).
template <class RowOf, class Prefetch>
static inline void fjk_pack_v_vnni(RowOf row, fj_i64 s_col, int nvalid, int npad, fjk_u32* __restrict vb, Prefetch pf) {
  if (s_col == 1 && HEAD_DIM_V % 32 == 0) {
    // Two rows of 32 features interleave into 32 dwords (two vectors): one shuffle each.
    FJK_ROLLED_LOOP
    for (int p = 0; p < npad / 2; ++p) {
      const bool has0 = 2 * p < nvalid, has1 = 2 * p + 1 < nvalid;
      const fjk_elem* r0 = row(has0 ? 2 * p : 0);  // (row 0 stands in for a missing row: never read)
      const fjk_elem* r1 = row(has1 ? 2 * p + 1 : 0);
      FJK_ROLLED_LOOP
      for (int c = 0; c < HEAD_DIM_V; c += 32) {
        fj_v32h xh, xl, yh, yl;
        fjk_load_v32(r0 + c, has0, &xh, &xl);
        fjk_load_v32(r1 + c, has1, &yh, &yl);
        pf(2 * p, c);
        pf(2 * p + 1, c);
        fjk_store_vnni(xh, yh, vb + p * kDVP + c);
        if (kSplit > 1) fjk_store_vnni(xl, yl, vb + kVLo + p * kDVP + c);
      }
    }
    return;
  }
  __builtin_memset(vb, 0, sizeof(fjk_u32) * (npad / 2) * kDVP);
  if (kSplit > 1) __builtin_memset(vb + kVLo, 0, sizeof(fjk_u32) * (npad / 2) * kDVP);
  FJK_SCALAR_LOOP
  for (int n = 0; n < nvalid; ++n) {
    const fjk_elem* r = row(n);
    const int shift = 16 * (n & 1);
    FJK_SCALAR_LOOP
    for (int dv = 0; dv < HEAD_DIM_V; ++dv) {
      unsigned short h, l;
      fjk_split1(r[dv * s_col], &h, &l);
      vb[(n / 2) * kDVP + dv] |= (fjk_u32)h << shift;
      if (kSplit > 1) vb[kVLo + (n / 2) * kDVP + dv] |= (fjk_u32)l << shift;
    }
  }
}

// 16 x 16 fp32 transpose in four rounds of interleaving row i with row i + 8.
static inline fj_v16f fjk_zip_lo(fj_v16f a, fj_v16f b) {
  return __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
}
static inline fj_v16f fjk_zip_hi(fj_v16f a, fj_v16f b) {
  return __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}
static inline void fjk_transpose16(fj_v16f* r) {
#pragma clang loop unroll(full)
  for (int round = 0; round < 4; ++round) {
    fj_v16f o[16];
#pragma clang loop unroll(full)
    for (int i = 0; i < 8; ++i) {
      o[2 * i] = fjk_zip_lo(r[i], r[i + 8]);
      o[2 * i + 1] = fjk_zip_hi(r[i], r[i + 8]);
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < 16; ++i) r[i] = o[i];
  }
}

// pb[m][n] = bf16(P^T[n][m]) for n < npad (rows >= nvalid are 0), one 16 x 32 block at a time:
// two 16 x 16 transposes, then one two-vector convert per row of m (fp16: P split into hi and
// lo words, lo at pb + kPLo).
static inline void fjk_pack_p(const float* __restrict st, int nvalid, int npad,
                              unsigned short* __restrict pb) {
  FJK_ROLLED_LOOP
  for (int i = 0; i < kMV; ++i) {
    FJK_ROLLED_LOOP
    for (int n0 = 0; n0 < npad; n0 += 32) {
      fj_v16f lo[16], hi[16];
#pragma clang loop unroll(full)
      for (int r = 0; r < 16; ++r) {
        lo[r] = n0 + r < nvalid ? fjk_load(st + (n0 + r) * kMP + 16 * i) : fjk_splat(0.0f);
        hi[r] = n0 + 16 + r < nvalid ? fjk_load(st + (n0 + 16 + r) * kMP + 16 * i) : fjk_splat(0.0f);
      }
      fjk_transpose16(lo);
      fjk_transpose16(hi);
#pragma clang loop unroll(full)
      for (int r = 0; r < 16; ++r) {
        unsigned short* dst = pb + (16 * i + r) * kNP + n0;
        if (kSplit == 1) {  // low half of the result from the second operand
          *(fj_v32h*)dst = fjk_cvt2_bf16(hi[r], lo[r]);
        } else {
          fj_v32h h, l;
          fjk_split32(lo[r], hi[r], &h, &l);
          *(fj_v32h*)dst = h;
          *(fj_v32h*)(dst + kPLo) = l;
        }
      }
    }
  }
}

// ---- S^T = K Q^T on tiles ----
// One block of products: accumulator 0 += 4 x 6, 1 += 4 x 7, 2 += 5 x 6, 3 += 5 x 7 (left tiles
// 4, 5; right tiles 6, 7), leaving out the second left (kLeft2 = false) or right tile.
template <bool kLeft2, bool kRight2>
static inline void fjk_tdp_block() {
  FJK_TDP(0, 4, 6);
  if (kRight2) FJK_TDP(1, 4, 7);
  if (kLeft2) FJK_TDP(2, 5, 6);
  if (kLeft2 && kRight2) FJK_TDP(3, 5, 7);
}

// Keys [0, 16) of the step are the rows at k0, keys [16, 32) those at k1, each kstride bytes
// apart. Accumulators: tile 0 = (0, m0), 1 = (0, m0 + 16), 2 = (16, m0), 3 = (16, m0 + 16) of
// st; kTwo = false leaves out the second query tile (an odd number of 16-row query tiles). fp16
// runs its three products per step in the order that reloads fewest tiles (8 loads, not 12):
// khi.qlo, khi.qhi (K kept), klo.qhi (Q kept); the lo words of K are klo_bytes after the hi ones
// (fp16's K is always packed), of Q at qv + kQLo.
template <bool kTwo>
static inline void fjk_qk_tiles(const char* k0, const char* k1, fj_i64 kstride, fj_i64 klo_bytes,
                                const fjk_u32* qv, float* st, int m0) {
  __builtin_ia32_tilezero(0);
  __builtin_ia32_tilezero(2);
  if (kTwo) {
    __builtin_ia32_tilezero(1);
    __builtin_ia32_tilezero(3);
  }
  FJK_ROLLED_LOOP
  for (int c = 0; c < kDP / 32; ++c) {
    const char* ka = k0 + 64 * c;
    const char* kc = k1 + 64 * c;
    const fjk_u32* q = qv + 16 * c * kMP + m0;
    FJK_TLOAD(4, ka, kstride);
    FJK_TLOAD(5, kc, kstride);
    if (kSplit > 1) {
      FJK_TLOAD(6, q + kQLo, 4 * kMP);
      if (kTwo) FJK_TLOAD(7, q + kQLo + 16, 4 * kMP);
      fjk_tdp_block<true, kTwo>();
    }
    FJK_TLOAD(6, q, 4 * kMP);
    if (kTwo) FJK_TLOAD(7, q + 16, 4 * kMP);
    fjk_tdp_block<true, kTwo>();
    if (kSplit > 1) {
      FJK_TLOAD(4, ka + klo_bytes, kstride);
      FJK_TLOAD(5, kc + klo_bytes, kstride);
      fjk_tdp_block<true, kTwo>();
    }
  }
  FJK_TSTORE(0, st + m0, 4 * kMP);
  FJK_TSTORE(2, st + 16 * kMP + m0, 4 * kMP);
  if (kTwo) {
    FJK_TSTORE(1, st + m0 + 16, 4 * kMP);
    FJK_TSTORE(3, st + 16 * kMP + m0 + 16, 4 * kMP);
  }
}

// ---- O += P V on tiles ----
// Accumulators: tile 0 = (m0, dv0), 1 = (m0, dv0 + 16), 2 = (m0 + 16, dv0), 3 = (m0 + 16, dv0 + 16),
// so the left tiles 4, 5 are P (rows m0, m0 + 16) and the right ones 6, 7 are V (dv0, dv0 + 16);
// with kTwo = false tile 5 is unused. fp16: phi.vlo, phi.vhi (P kept), plo.vhi (V kept), as in
// Q K^T; the lo words are at pb + kPLo and vb + kVLo.
template <bool kTwo>
static inline void fjk_pv_tiles(const unsigned short* pb, const fjk_u32* vb, float* ob, int npad,
                                int m0, int dv0) {
  FJK_TLOAD(0, ob + m0 * kDVP + dv0, 4 * kDVP);
  FJK_TLOAD(1, ob + m0 * kDVP + dv0 + 16, 4 * kDVP);
  if (kTwo) {
    FJK_TLOAD(2, ob + (m0 + 16) * kDVP + dv0, 4 * kDVP);
    FJK_TLOAD(3, ob + (m0 + 16) * kDVP + dv0 + 16, 4 * kDVP);
  }
  FJK_ROLLED_LOOP
  for (int n0 = 0; n0 < npad; n0 += 32) {
    const unsigned short* p = pb + m0 * kNP + n0;
    const fjk_u32* v = vb + n0 / 2 * kDVP + dv0;
    FJK_TLOAD(4, p, 2 * kNP);
    if (kTwo) FJK_TLOAD(5, p + 16 * kNP, 2 * kNP);
    if (kSplit > 1) {
      FJK_TLOAD(6, v + kVLo, 4 * kDVP);
      FJK_TLOAD(7, v + kVLo + 16, 4 * kDVP);
      fjk_tdp_block<kTwo, true>();
    }
    FJK_TLOAD(6, v, 4 * kDVP);
    FJK_TLOAD(7, v + 16, 4 * kDVP);
    fjk_tdp_block<kTwo, true>();
    if (kSplit > 1) {
      FJK_TLOAD(4, p + kPLo, 2 * kNP);
      if (kTwo) FJK_TLOAD(5, p + kPLo + 16 * kNP, 2 * kNP);
      fjk_tdp_block<kTwo, true>();
    }
  }
  FJK_TSTORE(0, ob + m0 * kDVP + dv0, 4 * kDVP);
  FJK_TSTORE(1, ob + m0 * kDVP + dv0 + 16, 4 * kDVP);
  if (kTwo) {
    FJK_TSTORE(2, ob + (m0 + 16) * kDVP + dv0, 4 * kDVP);
    FJK_TSTORE(3, ob + (m0 + 16) * kDVP + dv0 + 16, 4 * kDVP);
  }
}

// ---- per-block steps (both engines) ----

// Once per entry call (per thread): the tile configuration; released at the end of the call so
// the thread carries no tile state (context switches then skip the 8 KB of tile data).
static inline void fjk_amx_configure() {
  struct FjkTileConfig cfg;
  __builtin_memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  __builtin_ia32_tile_loadconfig(&cfg);
}
static inline void fjk_amx_release() { __builtin_ia32_tilerelease(); }

// S^T rows [0, 32) of st for every query tile, from 16 K rows at k0 and 16 at k1 (kstride bytes
// apart; fp16: their lo words klo_bytes further).
static inline void fjk_amx_scores32(const char* k0, const char* k1, fj_i64 kstride, fj_i64 klo_bytes,
                                    const fjk_u32* qv, float* st) {
  constexpr int kMPairs = kMV / 2;
  FJK_ROLLED_LOOP
  for (int j = 0; j < kMPairs + kMV % 2; ++j) {
    if (j < kMPairs)
      fjk_qk_tiles<true>(k0, k1, kstride, klo_bytes, qv, st, 32 * j);
    else
      fjk_qk_tiles<false>(k0, k1, kstride, klo_bytes, qv, st, 32 * j);
  }
}

// O row m *= alpha[m] for the rows whose alpha is not 1 (kMP rows).
static inline void fjk_amx_rescale(float* ob, const float* alpha) {
  FJK_ROLLED_LOOP
  for (int m = 0; m < kMP; ++m) {
    if (alpha[m] == 1.0f) continue;
    FJK_ROLLED_LOOP
    for (int c = 0; c < kDVP; c += 16) fjk_store(ob + m * kDVP + c, fjk_load(ob + m * kDVP + c) * alpha[m]);
  }
}

// O += P V over keys [0, npad) (npad a multiple of 32), P in pb, V in vb.
static inline void fjk_amx_pv(const unsigned short* pb, const fjk_u32* vb, float* ob, int npad) {
  constexpr int kMPairs = kMV / 2;
  FJK_ROLLED_LOOP
  for (int dv0 = 0; dv0 < kDVP; dv0 += 32) {
    FJK_ROLLED_LOOP
    for (int j = 0; j < kMPairs + kMV % 2; ++j) {
      if (j < kMPairs)
        fjk_pv_tiles<true>(pb, vb, ob, npad, 32 * j, dv0);
      else
        fjk_pv_tiles<false>(pb, vb, ob, npad, 32 * j, dv0);
    }
  }
}

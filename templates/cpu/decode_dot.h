// The dot engine of the CPU decode kernel: a few query rows (a GQA group's heads times Lq <= 16)
// against a long run of keys. Preceded by the spec macros, mod_abi.h, cpu/common.h and
// cpu/elem.h; followed by the driver cpu/flash_decode.h.
//
// Why not the prefill engines: they put query rows along the 16 vector lanes, so with 1-8 rows
// 50-94% of every FMA is padding and decode becomes compute-bound long before it reaches DRAM
// bandwidth. Here vectors run along the head dim instead, so every lane does useful work
// whatever the row count, and each key and value element is loaded once per block (from cache
// when several row chunks share it).
//
// Two ways to multiply, chosen at compile time:
//   fp32 FMAs (fp32 and fp16 caches, and bf16 on hosts without AVX512-BF16): K and V widened to
//     fp32 16 elements at a time; Q pre-multiplied by the score scale.
//   vdpbf16ps (bf16 on hosts with AVX512-BF16): 32 bf16 products per instruction into 16 fp32
//     lanes, no widening. Q K^T reads Q as given (bf16, exact) and scales S afterwards; P V
//     rounds P to bf16 (as the AMX prefill engine does) and pairs keys n, n + 1 the way the
//     instruction wants: V[n] and V[n + 1] interleaved element by element, P[n], P[n + 1] side
//     by side. The interleave (vpunpck{l,h}wd) leaves O's lanes in a fixed permuted order,
//     undone when O is read out (fjk_dec_o).
//
// Layout (per thread):
//   Q  [r][d]   the item's rows; rows and d padded with 0
//   S  [r][n]   scores, then P = 2^(S - ref) in place; keys n along the lanes
//   O  [r][dv]  unnormalised output (fp32)
// Keys and values are read in place through one row pointer per key (krow / vrow), which is
// what lets one kernel read contiguous and paged caches alike.
//
//   S[r][n] = Q[r] . K[n]     kRC rows x kNR keys per register tile: per vector-wide d chunk,
//                             kRC + kNR loads and kRC * kNR FMAs (or dot products); each
//                             accumulator then holds 16 partial sums, reduced 16 at a time by
//                             fjk_reduce16.
//   O[r]   = O[r] * alpha[r] + sum_n P[r][n] V[n]
//                             kRC rows x kDC output vectors per register tile: per key (pair),
//                             kRC broadcasts of P, one load of V per chunk, kRC * kDC FMAs.
//
// The next block's K and V rows are prefetched one chunk per load of the current block's: DRAM
// streams from several places at once (K and V, and the pages of a paged cache), which the
// hardware prefetchers follow only partly. Bursts of prefetches instead overflow the miss
// queues (measured: 8 -> 13 GB/s per thread for fp32 from spreading them out).

#if !defined(FLEXJIT_DTYPE) || !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || \
    !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY)
#error "the decode kernel needs the spec macros defined before it"
#endif
static_assert(HEAD_DIM >= 1 && HEAD_DIM_V >= 1 && BLOCK_M >= 1 && BLOCK_N >= 16, "bad spec");
static_assert(BLOCK_N % 16 == 0, "decode BLOCK_N must be a multiple of 16");
static_assert(GQA_GROUP >= 1, "bad GQA_GROUP");

// bf16 pair dot products: x86 vdpbf16ps (AVX512-BF16), or Arm BFDOT (FEAT_BF16), which pairs its
// operands the same way, four 128-bit BFDOTs per 16-lane step (FJK_DEC_X86 picks the spelling).
#if FLEXJIT_DTYPE == 1 && defined(__AVX512BF16__)
#define FJK_DEC_BF16DOT 1
#define FJK_DEC_X86 1
#elif FLEXJIT_DTYPE == 1 && defined(__aarch64__) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define FJK_DEC_BF16DOT 1
#define FJK_DEC_X86 0
#else
#define FJK_DEC_BF16DOT 0
#endif

// ---- geometry (all compile time) ----
static constexpr int kLane = FJK_DEC_BF16DOT ? 32 : 16;             // K / V elements per load
static constexpr int kDFull = HEAD_DIM / kLane, kDTail = HEAD_DIM % kLane;
static constexpr int kDP = fjk_round_up(HEAD_DIM, kLane);            // Q row stride
static constexpr int kDVChunks = (HEAD_DIM_V + kLane - 1) / kLane;   // V loads per row
static constexpr int kDVFull = HEAD_DIM_V / kLane, kDVTail = HEAD_DIM_V % kLane;
static constexpr int kDVV = FJK_DEC_BF16DOT ? 2 * kDVChunks : kDVChunks;  // O vectors per row
static constexpr int kDVP = 16 * kDVV;                               // O row stride
static constexpr int kNP = BLOCK_N;                                  // S row stride
// S element (row r, key n) of the driver's score block: s[r * kDecLdM + n * kDecLdN].
static constexpr fj_i64 kDecLdN = 1, kDecLdM = kNP;

// Register tiles. With AVX-512 (32 registers, one per 16-lane vector): rows per tile BLOCK_M
// itself up to 4, else whichever of 8, 6, 4 pads least; kRC * kNR Q K^T accumulators and
// kRC * kDC P V accumulators up to 16. Without it (AVX2: 16 ymm registers, two per 16-lane
// vector) the tiles shrink to fit: at most 4 rows, about 8 accumulator registers for Q K^T
// and 12 for P V (the AVX-512 tiles spilled there and held decode at ~20% of the FMA rate).
// Measured exception: fp32 caches with <= 4 rows keep the wide tiles everywhere; memory-bound,
// they ran 0-12% faster than the narrow ones on Zen 2 (not explained beyond that).
#if defined(__AVX512F__) || (FLEXJIT_DTYPE == 0 && BLOCK_M <= 4)
#define FJK_DEC_WIDE 1
static constexpr int kMaxRC = 8, kMaxAccPV = 16;
#else
#define FJK_DEC_WIDE 0
static constexpr int kMaxRC = 4, kMaxAccPV = 6;
#endif
static constexpr int fjk_pick_rc(int m) {
  if (m <= 4) return m;
  int best = kMaxRC;
  if (kMaxRC >= 6 && fjk_round_up(m, 6) < fjk_round_up(m, best)) best = 6;
  if (fjk_round_up(m, 4) < fjk_round_up(m, best)) best = 4;
  if (kMaxRC < 6 && fjk_round_up(m, 3) < fjk_round_up(m, best)) best = 3;
  return best;
}
static constexpr int kRC = fjk_pick_rc(BLOCK_M);
static constexpr int kRP = fjk_round_up(BLOCK_M, kRC);  // rows in scratch
// Keys per Q K^T register tile (divides 16): kRC * kNR accumulators, kRC Q vectors.
#if FJK_DEC_WIDE
static constexpr int kNR = kRC <= 2 ? 8 : kRC <= 4 ? 4 : 2;
#else
static constexpr int kNR = kRC == 1 ? 4 : kRC == 2 ? 2 : 1;
#endif
// Output vectors per P V register tile: the largest divisor of kDVV with kRC * kDC <= kMaxAccPV
// (with dot products an even number: each V chunk gives two).
static constexpr int fjk_pick_dc() {
  int best = FJK_DEC_BF16DOT ? 2 : 1;
  for (int dc = 1; dc <= kDVV; ++dc)
    if (kDVV % dc == 0 && kRC * dc <= kMaxAccPV && (!FJK_DEC_BF16DOT || dc % 2 == 0)) best = dc;
  return best;
}
static constexpr int kDC = fjk_pick_dc();

#if FJK_DEC_BF16DOT
typedef __bf16 fj_v32bf __attribute__((vector_size(64)));                 // 32 x bf16
typedef __bf16 fj_v16bf __attribute__((vector_size(32)));                 // 16 x bf16
typedef unsigned short fj_v32h_u __attribute__((vector_size(64), aligned(2)));
typedef unsigned fj_v16u_u __attribute__((vector_size(64), aligned(4)));
typedef unsigned short fjk_qelem;  // Q as given (bf16 bits); the scale is applied to S
#else
typedef float fjk_qelem;           // Q widened and pre-multiplied by the scale
#endif

static constexpr int kZeroRow = kDP > kDVChunks * kLane ? kDP : kDVChunks * kLane;
// With the narrow tiles, P V reads a block's V rows in several passes (one per register tile of
// output vectors, about six for D 128). Rows a page apart in a paged cache (Hkv * D elements:
// a multiple of 4 KiB) share L1 sets, so every pass missed L1: such blocks are first copied
// into a dense scratch (measured on Zen 2, fp32 paged Llama-8B decode: 80 -> 59 ms at B 4).
static constexpr bool kDecPackV = !FJK_DEC_WIDE;
static constexpr int kVPS = kDVChunks * kLane;  // packed V row stride
// Head units per work item, at most: an item may hold several heads' rows (each its own online
// softmax, see flash_decode.h) so that a paged cache's pages are read once for all their heads.
// Up to 16 units and 128 rows in all.
static constexpr int kMaxUnits = 128 / kRP < 1 ? 1 : 128 / kRP > 16 ? 16 : 128 / kRP;
struct FjkDecTile {
  alignas(64) fjk_qelem q[kMaxUnits * kRP * kDP];
  alignas(64) float s[kRP * kNP];
  alignas(64) float o[kMaxUnits * kRP * kDVP];
  alignas(64) float red[kRC * 16 * 16];  // partial dot products [row][key][16 lanes]
  alignas(64) fjk_elem zero_row[kZeroRow];  // what keys past the block read
  alignas(64) fjk_elem vpack[kDecPackV ? BLOCK_N * kVPS : 1];  // V rows copied densely (kDecPackV)
#if FJK_DEC_BF16DOT
  alignas(64) unsigned short pb[kRP * kNP];  // P rounded to bf16 [r][n]
  float qscale;                              // what S = Q K^T is multiplied by
#endif
  // Row pointers of the keys computed now, and of those read next (prefetched meanwhile;
  // next_n = 0: none).
  const fjk_elem* krow[kNP];
  const fjk_elem* vrow[kNP];
  const fjk_elem* next_krow[kNP];
  const fjk_elem* next_vrow[kNP];
  int next_n;
  float m[kMaxUnits * kRP];      // running row max of the base-2 scores (-inf: nothing kept yet)
  float l[kMaxUnits * kRP];      // running row sum of 2^(s - m)
  float alpha[kMaxUnits * kRP];  // this block's rescale of O and l
};

// One head unit's rows in the tile: its Q, O and softmax state (krow / vrow then point at its
// head's keys).
struct FjkDecUnit {
  fjk_qelem* q;
  float* o;
  float* m;
  float* l;
  float* alpha;
};
static inline struct FjkDecUnit fjk_dec_unit(struct FjkDecTile* t, int u) {
  struct FjkDecUnit x = {t->q + u * kRP * kDP, t->o + u * kRP * kDVP, t->m + u * kRP, t->l + u * kRP,
                         t->alpha + u * kRP};
  return x;
}
static_assert(sizeof(struct FjkDecTile) <= (1 << 20), "decode scratch exceeds 1 MiB of stack");

// ---- small vector helpers ----
// The first kCount (< 16) elements of p, zero-filled: a tail that must not read past the row.
template <int kCount>
static inline fj_v16f fjk_load_part(const fjk_elem* p) {
  fjk_elem tmp[16] = {};
  FJK_SCALAR_LOOP
  for (int i = 0; i < kCount; ++i) tmp[i] = p[i];
  return fjk_load16(tmp);
}
#if FJK_DEC_BF16DOT
// 32 bf16 from memory (any alignment), and the first kCount (< 32) of them zero-filled.
static inline fj_v32bf fjk_load32bf(const unsigned short* p) {
  return __builtin_bit_cast(fj_v32bf, *(const fj_v32h_u*)p);
}
// x86: a masked load (AVX512-BW; masked-off elements are not read). A copy into a zeroed buffer
// instead becomes a <kCount x bfloat> load that LLVM 19 cannot legalise for odd counts ("Do not
// know how to soft promote this operator's operand": the process aborts).
template <int kCount>
static inline fj_v32bf fjk_load32bf_part(const unsigned short* p) {
#if FJK_DEC_X86
  typedef short fj_v32s __attribute__((vector_size(64)));
  const fj_v32s v = __builtin_ia32_loaddquhi512_mask((const fj_v32s*)p, (fj_v32s){}, (unsigned)((1ull << kCount) - 1));
  return __builtin_bit_cast(fj_v32bf, v);
#else
  alignas(64) unsigned short tmp[32] = {};
  FJK_SCALAR_LOOP
  for (int i = 0; i < kCount; ++i) tmp[i] = p[i];
  return __builtin_bit_cast(fj_v32bf, *(const fj_v32h*)tmp);
#endif
}
template <int kCount>
static inline fj_v32bf fjk_load32bf_chunk(const unsigned short* p) {
  if constexpr (kCount >= 32) return fjk_load32bf(p);
  else return fjk_load32bf_part<kCount>(p);
}
#if FJK_DEC_X86
static inline fj_v16f fjk_dpbf16(fj_v16f acc, fj_v32bf a, fj_v32bf b) {
  return __builtin_ia32_dpbf16ps_512(acc, a, b);
}
static inline fj_v16bf fjk_to_bf16x16(fj_v16f x) {  // round to nearest even
  return __builtin_ia32_cvtneps2bf16_512_mask(x, (fj_v16bf){}, (unsigned short)0xffff);
}
#else  // Arm: BFDOT (cpu/common.h) and the portable rounding (P is finite)
static inline fj_v16f fjk_dpbf16(fj_v16f acc, fj_v32bf a, fj_v32bf b) {
  return fjk_bfdot16(acc, __builtin_bit_cast(fj_v16u, a), __builtin_bit_cast(fj_v16u, b));
}
static inline fj_v16bf fjk_to_bf16x16(fj_v16f x) { return __builtin_bit_cast(fj_v16bf, fjk_bf16_rne(x)); }
#endif
#endif

static inline float fjk_hmax(fj_v16f v) {
  v = fjk_max(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = fjk_max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = fjk_max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = fjk_max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}
static inline float fjk_hsum(fj_v16f v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// Sixteen vectors in, one out: lane j = the sum of the 16 lanes of v[j]. Four rounds of
// "add the halves of two vectors side by side" (15 adds, 30 shuffles for 16 sums, instead of
// 16 separate horizontal sums at 4 adds and 4 shuffles each). Each round interleaves its two
// inputs' halves, which leaves lane j holding input bitrev4(j); reading the inputs in
// bit-reversed order undoes that. p: 16 vectors of 16 floats, 64-byte aligned.
static inline fj_v16f fjk_reduce16(const float* p) {
  static constexpr int kRev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  fj_v16f a[8], b[4], c[2];
#pragma clang loop unroll(full)
  for (int i = 0; i < 8; ++i) {
    const fj_v16f x = fjk_load(p + 16 * kRev[2 * i]), y = fjk_load(p + 16 * kRev[2 * i + 1]);
    a[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
#pragma clang loop unroll(full)
  for (int i = 0; i < 4; ++i) {
    const fj_v16f x = a[2 * i], y = a[2 * i + 1];
    b[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
    const fj_v16f x = b[2 * i], y = b[2 * i + 1];
    c[i] = __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// ---- Q K^T ----
// One register tile: rows q[0..kRC) (stride kDP) against keys krow[0..kNR); the kRC x kNR
// accumulators go to red[i][key0 + j][16]. pk: the same keys' rows in the next block,
// prefetched one chunk per load (null: none).
static inline void fjk_dot_tile(const fjk_qelem* __restrict q, const fjk_elem* const* krow,
                                const fjk_elem* const* pk, float* __restrict red, int key0) {
  fj_v16f acc[kNR][kRC];
#pragma clang loop unroll(full)
  for (int j = 0; j < kNR; ++j)
#pragma clang loop unroll(full)
    for (int i = 0; i < kRC; ++i) acc[j][i] = fjk_splat(0.0f);
  const fjk_elem* kr[kNR];
#pragma clang loop unroll(full)
  for (int j = 0; j < kNR; ++j) kr[j] = krow[j];
#if FJK_DEC_BF16DOT
  FJK_ROLLED_LOOP
  for (int c = 0; c < kDFull; ++c) {
    fj_v32bf qv[kRC];
#pragma clang loop unroll(full)
    for (int i = 0; i < kRC; ++i) qv[i] = __builtin_bit_cast(fj_v32bf, *(const fj_v32h*)(q + i * kDP + 32 * c));
#pragma clang loop unroll(full)
    for (int j = 0; j < kNR; ++j) {
      const fj_v32bf kv = fjk_load32bf(kr[j] + 32 * c);
      if (pk != nullptr) __builtin_prefetch(pk[j] + 32 * c, 0, 2);
#pragma clang loop unroll(full)
      for (int i = 0; i < kRC; ++i) acc[j][i] = fjk_dpbf16(acc[j][i], kv, qv[i]);
    }
  }
  if (kDTail) {
#pragma clang loop unroll(full)
    for (int j = 0; j < kNR; ++j) {
      const fj_v32bf kv = fjk_load32bf_part<kDTail ? kDTail : 1>(kr[j] + 32 * kDFull);
#pragma clang loop unroll(full)
      for (int i = 0; i < kRC; ++i)
        acc[j][i] = fjk_dpbf16(acc[j][i], kv, __builtin_bit_cast(fj_v32bf, *(const fj_v32h*)(q + i * kDP + 32 * kDFull)));
    }
  }
#else
  FJK_ROLLED_LOOP
  for (int c = 0; c < kDFull; ++c) {
    fj_v16f qv[kRC];
#pragma clang loop unroll(full)
    for (int i = 0; i < kRC; ++i) qv[i] = fjk_load(q + i * kDP + 16 * c);
#pragma clang loop unroll(full)
    for (int j = 0; j < kNR; ++j) {
      const fj_v16f kv = fjk_load16(kr[j] + 16 * c);
      if (pk != nullptr) __builtin_prefetch(pk[j] + 16 * c, 0, 2);
#pragma clang loop unroll(full)
      for (int i = 0; i < kRC; ++i) acc[j][i] += kv * qv[i];
    }
  }
  if (kDTail) {
#pragma clang loop unroll(full)
    for (int j = 0; j < kNR; ++j) {
      const fj_v16f kv = fjk_load_part<kDTail ? kDTail : 1>(kr[j] + 16 * kDFull);
#pragma clang loop unroll(full)
      for (int i = 0; i < kRC; ++i) acc[j][i] += kv * fjk_load(q + i * kDP + 16 * kDFull);
    }
  }
#endif
#pragma clang loop unroll(full)
  for (int j = 0; j < kNR; ++j)
#pragma clang loop unroll(full)
    for (int i = 0; i < kRC; ++i) fjk_store(red + (i * 16 + key0 + j) * 16, acc[j][i]);
}

// S rows [0, mvalid) of unit u over keys [0, nvalid) of the block whose rows krow points at
// (keys up to the next multiple of 16 read zero_row); lanes past nvalid are set to -inf.
static inline void fjk_dec_scores(struct FjkDecTile* t, const struct FjkDecUnit* u, int mvalid, int nvalid) {
  const int row_tiles = (mvalid + kRC - 1) / kRC;
#if FJK_DEC_BF16DOT
  const float scale = t->qscale;
#endif
  FJK_ROLLED_LOOP
  for (int n0 = 0; n0 < nvalid; n0 += 16) {
    FJK_ROLLED_LOOP
    for (int rt = 0; rt < row_tiles; ++rt) {
      FJK_ROLLED_LOOP
      for (int key0 = 0; key0 < 16; key0 += kNR)
        fjk_dot_tile(u->q + rt * kRC * kDP, t->krow + n0 + key0,
                     rt == 0 && n0 + key0 < t->next_n ? t->next_krow + n0 + key0 : nullptr, t->red, key0);
      FJK_ROLLED_LOOP
      for (int i = 0; i < kRC; ++i) {
        fj_v16f sv = fjk_reduce16(t->red + i * 256);
#if FJK_DEC_BF16DOT
        sv *= scale;
#endif
        sv = fjk_iota() + (float)n0 < (float)nvalid ? sv : fjk_splat(FJK_NEG_INF);
        fjk_store(t->s + (rt * kRC + i) * kNP + n0, sv);
      }
    }
  }
}

// ---- online softmax over one block (base 2; scores already scaled) ----
// Updates m and l of rows [0, mvalid), turns S into P in place and sets alpha. Returns false
// when no row kept any key of the block (P = 0, alpha = 1: the caller skips P V).
static inline bool fjk_dec_softmax(struct FjkDecTile* t, const struct FjkDecUnit* u, int mvalid, int nvalid) {
  const int nvec = (nvalid + 15) / 16;
  bool any = false;
  FJK_ROLLED_LOOP
  for (int r = 0; r < mvalid; ++r) {
    const float* s = t->s + r * kNP;
    fj_v16f mx = fjk_splat(FJK_NEG_INF);
    FJK_ROLLED_LOOP
    for (int v = 0; v < nvec; ++v) mx = fjk_max(mx, fjk_load(s + 16 * v));
    const float bm = fjk_hmax(mx);
    any |= bm != FJK_NEG_INF;
    // As in the prefill driver: the reference max moves only when a score passes it by more
    // than 8, so P stays <= 2^8 and most blocks leave O alone (alpha = 1). -inf guard: a row
    // with nothing kept yet uses 0 as its reference (all its s are -inf, so P = 0, alpha = 0).
    const float m_new = bm > u->m[r] + 8.0f ? bm : u->m[r];
    const float ref = m_new == FJK_NEG_INF ? 0.0f : m_new;
    u->alpha[r] = fjk_exp2(fjk_splat(u->m[r] - ref))[0];
    u->m[r] = m_new;
  }
  if (!any) return false;
  FJK_ROLLED_LOOP
  for (int r = 0; r < mvalid; ++r) {
    float* s = t->s + r * kNP;
    const float ref = u->m[r] == FJK_NEG_INF ? 0.0f : u->m[r];
    fj_v16f sum = fjk_splat(0.0f);
    FJK_ROLLED_LOOP
    for (int v = 0; v < nvec; ++v) {
      const fj_v16f e = fjk_exp2(fjk_load(s + 16 * v) - ref);  // s = -inf gives exactly 0
#if FJK_DEC_BF16DOT
      *(fj_v16bf*)(t->pb + r * kNP + 16 * v) = fjk_to_bf16x16(e);
#else
      fjk_store(s + 16 * v, e);
#endif
      sum += e;
    }
    u->l[r] = u->l[r] * u->alpha[r] + fjk_hsum(sum);
  }
  return true;
}

// ---- O = O * alpha + P V ----
// Keys [0, nvalid) (with dot products, pairs up to the next even key: its P is 0 and its row
// the zero row). The first row tile prefetches the next block's V rows, one chunk per load.
template <int kFirst>  // first output vector of the tile
static inline void fjk_pv_tile(struct FjkDecTile* t, const struct FjkDecUnit* u, int row0, int nvalid) {
  const int prefetch_n = row0 == 0 ? (t->next_n < nvalid ? t->next_n : nvalid) : 0;
  fj_v16f acc[kRC][kDC];
#pragma clang loop unroll(full)
  for (int i = 0; i < kRC; ++i)
#pragma clang loop unroll(full)
    for (int j = 0; j < kDC; ++j)
      acc[i][j] = fjk_load(u->o + (row0 + i) * kDVP + 16 * (kFirst + j)) * u->alpha[row0 + i];
#if FJK_DEC_BF16DOT
  constexpr int kChunk0 = kFirst / 2;  // the tile's V chunks: kChunk0 .. kChunk0 + kDC / 2
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; n += 2) {
    const unsigned short* va = t->vrow[n] + 32 * kChunk0;
    const unsigned short* vb = t->vrow[n + 1] + 32 * kChunk0;
    fj_v32bf lo[kDC / 2], hi[kDC / 2];
#pragma clang loop unroll(full)
    for (int c = 0; c < kDC / 2; ++c) {
      constexpr int kLeft = HEAD_DIM_V - 32 * kChunk0;  // elements of V from this tile's start
      const bool whole = c * 32 + 32 <= kLeft;
      const fj_v32h a = whole ? __builtin_bit_cast(fj_v32h, fjk_load32bf(va + 32 * c))
                              : __builtin_bit_cast(fj_v32h, fjk_load32bf_chunk<kDVTail ? kDVTail : 32>(va + 32 * c));
      const fj_v32h b = whole ? __builtin_bit_cast(fj_v32h, fjk_load32bf(vb + 32 * c))
                              : __builtin_bit_cast(fj_v32h, fjk_load32bf_chunk<kDVTail ? kDVTail : 32>(vb + 32 * c));
      // (V[n][d], V[n+1][d]) pairs: d = 8k + i (lo) and 8k + 4 + i (hi), k < 4, i < 4.
      lo[c] = __builtin_bit_cast(fj_v32bf, __builtin_shufflevector(a, b, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10,
                                                                   42, 11, 43, 16, 48, 17, 49, 18, 50, 19, 51, 24,
                                                                   56, 25, 57, 26, 58, 27, 59));
      hi[c] = __builtin_bit_cast(fj_v32bf, __builtin_shufflevector(a, b, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45,
                                                                   14, 46, 15, 47, 20, 52, 21, 53, 22, 54, 23, 55,
                                                                   28, 60, 29, 61, 30, 62, 31, 63));
    }
    if (n < prefetch_n) {
#pragma clang loop unroll(full)
      for (int c = 0; c < kDC / 2; ++c) {
        __builtin_prefetch(t->next_vrow[n] + 32 * (kChunk0 + c), 0, 2);
        __builtin_prefetch(t->next_vrow[n + 1] + 32 * (kChunk0 + c), 0, 2);
      }
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < kRC; ++i) {
      unsigned pair;
      __builtin_memcpy(&pair, t->pb + (row0 + i) * kNP + n, 4);  // P[n], P[n + 1] in bf16
      const fj_v32bf pp = __builtin_bit_cast(fj_v32bf, (fj_v16u){} + pair);
#pragma clang loop unroll(full)
      for (int c = 0; c < kDC / 2; ++c) {
        acc[i][2 * c] = fjk_dpbf16(acc[i][2 * c], lo[c], pp);
        acc[i][2 * c + 1] = fjk_dpbf16(acc[i][2 * c + 1], hi[c], pp);
      }
    }
  }
#else
  const float* p = t->s + row0 * kNP;
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n) {
    const fjk_elem* vr = t->vrow[n] + 16 * kFirst;
    fj_v16f vv[kDC];
#pragma clang loop unroll(full)
    for (int j = 0; j < kDC; ++j) {
      if (kDVTail && kFirst + j == kDVFull)
        vv[j] = fjk_load_part<kDVTail ? kDVTail : 1>(vr + 16 * j);
      else
        vv[j] = fjk_load16(vr + 16 * j);
    }
    if (n < prefetch_n) {
#pragma clang loop unroll(full)
      for (int j = 0; j < kDC; ++j) __builtin_prefetch(t->next_vrow[n] + 16 * (kFirst + j), 0, 2);
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < kRC; ++i) {
      const float pn = p[i * kNP + n];
#pragma clang loop unroll(full)
      for (int j = 0; j < kDC; ++j) acc[i][j] += pn * vv[j];
    }
  }
#endif
#pragma clang loop unroll(full)
  for (int i = 0; i < kRC; ++i)
#pragma clang loop unroll(full)
    for (int j = 0; j < kDC; ++j) fjk_store(u->o + (row0 + i) * kDVP + 16 * (kFirst + j), acc[i][j]);
}
template <int kFirst>
static inline void fjk_pv_rows(struct FjkDecTile* t, const struct FjkDecUnit* u, int row0, int nvalid) {
  if constexpr (kFirst < kDVV) {
    fjk_pv_tile<kFirst>(t, u, row0, nvalid);
    fjk_pv_rows<kFirst + kDC>(t, u, row0, nvalid);
  }
}
// V rows [0, nvalid) into the dense scratch, repointing vrow (kDecPackV; `sparse`: the rows are
// not already one dense run).
static inline void fjk_dec_pack_v(struct FjkDecTile* t, int nvalid, bool sparse) {
  if (!kDecPackV || !sparse) return;
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n) {
    __builtin_memcpy(t->vpack + n * kVPS, t->vrow[n], sizeof(fjk_elem) * HEAD_DIM_V);
    t->vrow[n] = t->vpack + n * kVPS;
  }
}
static inline void fjk_dec_pv(struct FjkDecTile* t, const struct FjkDecUnit* u, int mvalid, int nvalid) {
  const int row_tiles = (mvalid + kRC - 1) / kRC;
  FJK_ROLLED_LOOP
  for (int rt = 0; rt < row_tiles; ++rt) fjk_pv_rows<0>(t, u, rt * kRC, nvalid);
}

// Element d of row r of unit u's O (undoing the dot-product path's lane order).
static inline float fjk_dec_o(const struct FjkDecUnit* u, int r, int d) {
#if FJK_DEC_BF16DOT
  const int e = d % 32, w = e % 8;
  return u->o[r * kDVP + d / 32 * 32 + (w < 4 ? 0 : 16) + e / 8 * 4 + (w & 3)];
#else
  return u->o[r * kDVP + d];
#endif
}

// Row r of unit u's Q: the query row `row` (element stride s_col) times c.
static inline void fjk_dec_q_row(struct FjkDecTile* t, const struct FjkDecUnit* u, int r, const fjk_elem* row,
                                 fj_i64 s_col, float c) {
  fjk_qelem* dst = u->q + r * kDP;
#if FJK_DEC_BF16DOT
  t->qscale = c;  // S = c (Q K^T): Q stays exact
  FJK_SCALAR_LOOP
  for (int d = 0; d < HEAD_DIM; ++d) dst[d] = row[d * s_col];
#else
  (void)t;
  FJK_SCALAR_LOOP
  for (int d = 0; d < HEAD_DIM; ++d) dst[d] = fjk_to_f32(row[d * s_col]) * c;
#endif
}
// Rows [mvalid, the end of its register tile) of unit u's Q are zero: computed alongside, ignored.
static inline void fjk_dec_q_pad(const struct FjkDecUnit* u, int mvalid) {
  const int padded = fjk_round_up(mvalid, kRC);
  if (padded > mvalid) __builtin_memset(u->q + mvalid * kDP, 0, sizeof(fjk_qelem) * (padded - mvalid) * kDP);
}

// ---- per entry call and per item ----
static inline void fjk_dec_engine_begin(struct FjkDecTile* t) {
  __builtin_memset(t->zero_row, 0, sizeof(t->zero_row));
  __builtin_memset(t->q, 0, sizeof(t->q));  // padding rows and columns stay 0
}
static inline void fjk_dec_engine_end(struct FjkDecTile* t) { (void)t; }
// O = 0 and the softmax state of the rows of `units` units.
static inline void fjk_dec_item_begin(struct FjkDecTile* t, int units) {
  __builtin_memset(t->o, 0, sizeof(float) * units * kRP * kDVP);
  for (int r = 0; r < units * kRP; ++r) {
    t->m[r] = FJK_NEG_INF;
    t->l[r] = 0.0f;
    t->alpha[r] = 1.0f;
  }
}

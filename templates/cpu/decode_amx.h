// The AMX engine of the CPU decode kernel: Q K^T and P V of many query rows per KV head on AMX
// tiles (bf16, and fp16 as bf16 hi + lo halves). Preceded by cpu/amx_tiles.h (the layouts, the
// fp16 split and the tile steps, shared with the prefill kernel's AMX engine); followed by the
// driver cpu/flash_decode.h. Same interface as cpu/decode_dot.h.
//
// Why: the dot engine runs vectors along the head dim, so its work per key grows with the rows
// of a work item (a GQA group's heads x Lq). With a few rows decoding is bound by reading K and
// V; with 8 and more (MQA, GQA 8 and up, speculative verification with Lq > 1) the dot products
// bind instead (measured on Zen 4: 490 cycles per key for MQA's 32 rows). A tile product does
// 16 x 16 x 32 multiply-adds at once, so here the rows cost little more than one row.
//
// Per work item and unit (a KV head's rows, BLOCK_M of them, padded to whole 16-row tiles):
//   q  Q in VNNI pairs [d/2][m] (unscaled; S is scaled after the product, as in prefill)
//   o  O [m][dv] fp32;  m, l, alpha [m]: the online softmax state of each row
// and per visited block (shared by the units, one after the other):
//   s  S^T then P^T [n][m] fp32: the driver applies the mods with ld = kMP, ld_m = 1
//   kb 32 keys of K packed (zero-padded, fp16 split) where they cannot be read in place
//   pb, vb  P and V packed for the P V tiles (amx_tiles.h)
// K is read in place, 16 keys per tile, when those keys' rows are evenly spaced (a contiguous
// cache, or a paged one with pages of 16 keys or more) and D is a multiple of 32 (bf16);
// otherwise the 32 rows are copied through the row pointers first. V is always repacked (VNNI).

static_assert(BLOCK_M >= 1, "bad BLOCK_M");

// S element (row m, key n) of the driver's score block: s[m * kDecLdM + n * kDecLdN].
static constexpr fj_i64 kDecLdN = kMP, kDecLdM = 1;
static constexpr int kKLo = 32 * kDP;  // kb: one 32-key step (words); fp16's lo words follow
static constexpr int kZeroRow = kDP > kDVP ? kDP : kDVP;
// Head units per work item, at most (several for paged caches: flash_decode.h): 128 rows in all,
// 16 units at most. runtime/tuning.cpp decode_max_units mirrors it.
static constexpr int kMaxUnits = 128 / kMP < 1 ? 1 : 128 / kMP > 16 ? 16 : 128 / kMP;

struct FjkDecTile {
  alignas(64) fjk_u32 q[kMaxUnits * kHalves * kQLo];
  alignas(64) float o[kMaxUnits * kMP * kDVP];
  alignas(64) float m[kMaxUnits * kMP];      // running row max of the base-2 scores (-inf: none yet)
  alignas(64) float l[kMaxUnits * kMP];      // running row sum of 2^(s - m)
  alignas(64) float alpha[kMaxUnits * kMP];  // this block's rescale of O and l
  alignas(64) float s[kNP * kMP];
  alignas(64) unsigned short kb[kHalves * kKLo];
  alignas(64) unsigned short pb[kHalves * kPLo];
  alignas(64) fjk_u32 vb[kHalves * kVLo];
  alignas(64) fjk_elem zero_row[kZeroRow];  // what keys past the block read
  // Row pointers of the keys computed now, and of those read next (next_n = 0: none).
  const fjk_elem* krow[kNP];
  const fjk_elem* vrow[kNP];
  const fjk_elem* next_krow[kNP];
  const fjk_elem* next_vrow[kNP];
  int next_n;
  float qscale;  // what S = Q K^T is multiplied by
};
static_assert(sizeof(struct FjkDecTile) <= (1 << 20), "decode scratch exceeds 1 MiB of stack");

struct FjkDecUnit {
  fjk_u32* q;
  float* o;
  float* m;
  float* l;
  float* alpha;
};
static inline struct FjkDecUnit fjk_dec_unit(struct FjkDecTile* t, int u) {
  struct FjkDecUnit x = {t->q + u * kHalves * kQLo, t->o + u * kMP * kDVP, t->m + u * kMP, t->l + u * kMP,
                         t->alpha + u * kMP};
  return x;
}

// Whether the rows rows[0..16) and rows[16..32) are each evenly spaced, `stride` bytes apart
// (a contiguous cache; a paged one with pages of 16 keys or more).
static inline bool fjk_dec_even32(const fjk_elem* const* rows, fj_i64 stride) {
  bool even = true;
  FJK_SCALAR_LOOP
  for (int j = 1; j < 16; ++j) {
    even &= (const char*)rows[j] - (const char*)rows[0] == stride * j;
    even &= (const char*)rows[16 + j] - (const char*)rows[16] == stride * j;
  }
  return even;
}

// ---- Q K^T ----
// S^T rows [0, nvalid) of unit u's rows, scaled by qscale. Rows [nvalid, round_up(nvalid, 32))
// hold raw products of zero keys: the softmax and pack_p stop at nvalid.
static inline void fjk_dec_scores(struct FjkDecTile* t, const struct FjkDecUnit* u, int mvalid, int nvalid) {
  (void)mvalid;
  const int npad = fjk_round_up(nvalid, 32);
  FJK_ROLLED_LOOP
  for (int n0 = 0; n0 < npad; n0 += 32) {
    const fjk_elem* const* rows = t->krow + n0;
    const bool whole = kSplit == 1 && HEAD_DIM % 32 == 0 && n0 + 32 <= nvalid;  // bf16 K readable in place
    fj_i64 kstride = whole ? (const char*)rows[1] - (const char*)rows[0] : 0;
    const char *k0, *k1;
    if (whole && fjk_dec_even32(rows, kstride)) {
      k0 = (const char*)rows[0];
      k1 = (const char*)rows[16];
    } else {
      fjk_pack_k([=](int n) { return rows[n]; }, 1, nvalid - n0 < 32 ? nvalid - n0 : 32, 32, kKLo, t->kb);
      kstride = 2 * kDP;
      k0 = (const char*)t->kb;
      k1 = k0 + 16 * kstride;
    }
    fjk_amx_scores32(k0, k1, kstride, 2 * kKLo, u->q, t->s + n0 * kMP);
  }
  fjk_scale_st<kMV, kMP>(t->s, nvalid, t->qscale);  // cpu/common.h
}

// ---- online softmax over one block (base 2; scores already scaled) ----
// cpu/common.h fjk_softmax_st on the unit's rows (S^T layout: the row max is a vector max down
// the keys). Updates m and l of the unit's rows, turns S^T into P^T in place and sets alpha.
// Returns false when no real row kept any key of the block (the caller skips P V; the state is
// left as it was).
static inline bool fjk_dec_softmax(struct FjkDecTile* t, const struct FjkDecUnit* u, int mvalid, int nvalid) {
  fj_v16f m[kMV], l[kMV], alpha[kMV];
  fj_v16i valid[kMV];
  for (int i = 0; i < kMV; ++i) {
    m[i] = fjk_load(u->m + 16 * i);
    l[i] = fjk_load(u->l + 16 * i);
    valid[i] = fjk_iota() + (float)(16 * i) < (float)mvalid;
  }
  if (!fjk_softmax_st<kMV, kMP>(t->s, nvalid, 1.0f, m, l, valid, alpha)) return false;
  for (int i = 0; i < kMV; ++i) {
    fjk_store(u->m + 16 * i, m[i]);
    fjk_store(u->l + 16 * i, l[i]);
    fjk_store(u->alpha + 16 * i, alpha[i]);
  }
  return true;
}

// ---- O = O * alpha + P V ----
// V rows [0, nvalid) in VNNI pairs (every layout: the pairs interleave two keys' rows;
// `sparse` is the dot engine's concern). Meanwhile the next block's K and V rows are prefetched,
// a cache line of each per line of V read: DRAM then streams K and V (and a paged cache's
// pages) a block ahead, where the hardware prefetchers follow them only partly.
static inline void fjk_dec_pack_v(struct FjkDecTile* t, int nvalid, bool sparse) {
  (void)sparse;
  const fjk_elem* const* rows = t->vrow;
  const fjk_elem* const* nk = t->next_krow;
  const fjk_elem* const* nv = t->next_vrow;
  const int next_n = t->next_n;
  fjk_pack_v_vnni([=](int n) { return rows[n]; }, 1, nvalid, fjk_round_up(nvalid, 32), t->vb, [=](int n, int c) {
    if (n >= next_n) return;
    if (c < HEAD_DIM) __builtin_prefetch(nk[n] + c, 0, 2);
    __builtin_prefetch(nv[n] + c, 0, 2);
  });
}
static inline void fjk_dec_pv(struct FjkDecTile* t, const struct FjkDecUnit* u, int mvalid, int nvalid) {
  (void)mvalid;
  const int npad = fjk_round_up(nvalid, 32);
  fjk_pack_p(t->s, nvalid, npad, t->pb);
  fjk_amx_rescale(u->o, u->alpha);
  fjk_amx_pv(t->pb, t->vb, u->o, npad);
}

// Element d of row r of unit u's O.
static inline float fjk_dec_o(const struct FjkDecUnit* u, int r, int d) { return u->o[r * kDVP + d]; }

// Row r of unit u's Q: the query row `row` (element stride s_col); S is scaled by c afterwards.
static inline void fjk_dec_q_row(struct FjkDecTile* t, const struct FjkDecUnit* u, int r, const fjk_elem* row,
                                 fj_i64 s_col, float c) {
  t->qscale = c;
  fjk_amx_q_row(row, s_col, r, u->q);
}
// Rows [mvalid, kMP) of unit u's Q are zero (their columns of S^T are computed alongside, ignored).
static inline void fjk_dec_q_pad(const struct FjkDecUnit* u, int mvalid) {
  if (mvalid >= kMP) return;
  for (int h = 0; h < kHalves; ++h)
    FJK_SCALAR_LOOP
    for (int p = 0; p < kDP / 2; ++p) __builtin_memset(u->q + h * kQLo + p * kMP + mvalid, 0, 4 * (kMP - mvalid));
}

// ---- per entry call and per item ----
static inline void fjk_dec_engine_begin(struct FjkDecTile* t) {
  __builtin_memset(t->zero_row, 0, sizeof(t->zero_row));
  __builtin_memset(t->q, 0, sizeof(t->q));  // features past HEAD_DIM stay 0
  fjk_amx_configure();
}
static inline void fjk_dec_engine_end(struct FjkDecTile* t) {
  (void)t;
  fjk_amx_release();
}
// O = 0 and the softmax state of the rows of `units` units.
static inline void fjk_dec_item_begin(struct FjkDecTile* t, int units) {
  __builtin_memset(t->o, 0, sizeof(float) * units * kMP * kDVP);
  for (int r = 0; r < units * kMP; ++r) {
    t->m[r] = FJK_NEG_INF;
    t->l[r] = 0.0f;
    t->alpha[r] = 1.0f;
  }
}

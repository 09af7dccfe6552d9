// The AMX engine of the CPU prefill kernel: bf16 and fp16 Q K^T and P V on AMX tiles.
// Preceded by cpu/prefill_item.h and cpu/amx_tiles.h (the layouts, the fp16 split, the tile
// steps), followed by the driver cpu/flash_prefill.h, which calls the engine interface at the end.

// Per-thread scratch, on the stack of the entry (no heap, no statics); fp16's lo halves follow
// the hi ones (kb + kKLo, see amx_tiles.h).
static constexpr int kKLo = kNP * kDP;  // words
struct FjkTile {
  alignas(64) fjk_u32 qv[kHalves * kQLo];
  alignas(64) float st[kNP * kMP];
  alignas(64) unsigned short kb[kHalves * kKLo];
  alignas(64) unsigned short pb[kHalves * kPLo];
  alignas(64) fjk_u32 vb[kHalves * kVLo];
  alignas(64) float ob[kMP * kDVP];
  fj_v16f m[kMV];      // running row max of the base-2 scores (-inf: nothing seen yet)
  fj_v16f l[kMV];      // running row sum of 2^(s - m)
  fj_v16i valid[kMV];  // lane is a real query row
};
static_assert(sizeof(struct FjkTile) <= (1 << 20), "tile scratch exceeds 1 MiB of stack");

// qv[p][m] = (Q[m][2p], Q[m][2p + 1]) for the valid rows (fp16: their hi words, and the lo
// words at qv + kQLo); padding rows and features are 0.
static inline void fjk_pack_q_vnni(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                   fjk_u32* __restrict qv) {
  if (it->mvalid < kMP || HEAD_DIM < kDP) __builtin_memset(qv, 0, sizeof(fjk_u32) * kHalves * kQLo);
  FJK_SCALAR_LOOP
  for (int m = 0; m < it->mvalid; ++m) fjk_amx_q_row(fjk_q_row(a, it, m), a->q_strides[3], m, qv);
}

// ---- the engine interface (what cpu/flash_prefill.h calls) ----

// Scores come out of fjk_block_scores as raw q.k; the driver applies qscale.
static constexpr bool kFjkScoresScaled = false;

static inline void fjk_engine_begin(struct FjkTile* t) {
  (void)t;
  fjk_amx_configure();
}
static inline void fjk_engine_end(struct FjkTile* t) {
  (void)t;
  fjk_amx_release();
}

static inline void fjk_item_begin(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                  struct FjkTile* t) {
  fjk_pack_q_vnni(a, it, t->qv);
  __builtin_memset(t->ob, 0, sizeof(t->ob));
}

// S^T rows [0, nvalid) (raw q.k) for the KV block at kv0 (next_kv0 unused: no prefetch, see below).
static inline void fjk_block_scores(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                    struct FjkTile* t, fj_i64 kv0, int nvalid, fj_i64 next_kv0) {
  const fj_i64 s_row = a->k_strides[2], s_col = a->k_strides[3];
  const fjk_elem* src = it->k + kv0 * s_row;
  const int npad = fjk_round_up(nvalid, 32);
  const char* kbase;
  fj_i64 kstride;
  if (kSplit == 1 && s_col == 1 && HEAD_DIM % 32 == 0 && nvalid == npad) {  // tiles read bf16 K in place
    kbase = (const char*)src;
    kstride = 2 * s_row;
  } else {
    fjk_pack_k([=](int n) { return src + n * s_row; }, s_col, nvalid, npad, kKLo, t->kb);
    kbase = (const char*)t->kb;
    kstride = 2 * kDP;
  }
  (void)next_kv0;  // no software prefetch: measured slower than the hardware's on AMX
  FJK_ROLLED_LOOP
  for (int n0 = 0; n0 < npad; n0 += 32) {
    const char* k0 = kbase + n0 * kstride;
    fjk_amx_scores32(k0, k0 + 16 * kstride, kstride, 2 * kKLo, t->qv, t->st + n0 * kMP);
  }
}

// O = O * alpha + P V with P^T in st rows [0, nvalid) (next_kv0 unused, as above).
static inline void fjk_block_pv(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                struct FjkTile* t, const fj_v16f* alpha, fj_i64 kv0, int nvalid,
                                fj_i64 next_kv0) {
  const int npad = fjk_round_up(nvalid, 32);
  fjk_pack_p(t->st, nvalid, npad, t->pb);
  const fjk_elem* src = it->v + kv0 * a->v_strides[2];
  const fj_i64 s_row = a->v_strides[2];
  fjk_pack_v_vnni([=](int n) { return src + n * s_row; }, a->v_strides[3], nvalid, npad, t->vb, [](int, int) {});
  // Rescale the rows of O whose reference max moved (alpha != 1; rare, see the driver).
  bool rescale = false;
  for (int i = 0; i < kMV; ++i) rescale |= fjk_any(alpha[i] != 1.0f);
  if (rescale) {
    alignas(64) float al[kMP];
    for (int i = 0; i < kMV; ++i) fjk_store(al + 16 * i, alpha[i]);
    fjk_amx_rescale(t->ob, al);
  }
  (void)next_kv0;
  fjk_amx_pv(t->pb, t->vb, t->ob, npad);
}

// out[row m] = O[m] * inv_l[m] for the item's rows.
static inline void fjk_item_write_out(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                      const struct FjkTile* t, const float* inv_l) {
  const fj_i64 os_col = a->out_strides[3];
  FJK_SCALAR_LOOP
  for (int m = 0; m < it->mvalid; ++m) {
    fjk_elem* orow = fjk_out_row(a, it, m);
    const float* o = t->ob + m * kDVP;
    FJK_ROLLED_LOOP
    for (int dv = 0; dv < HEAD_DIM_V; ++dv) fjk_from_f32(o[dv] * inv_l[m], orow + dv * os_col);
  }
}

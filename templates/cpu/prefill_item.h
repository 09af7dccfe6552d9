// Shared by the CPU prefill kernel's parts: one work item's coordinates. Preceded in the TU by
// the spec macros, mod_abi.h, cpu/common.h and cpu/elem.h; followed by one engine
// (cpu/prefill_fma.h, cpu/prefill_dpbf16.h, each after cpu/prefill_lanes.h, or cpu/prefill_amx.h:
// the tile scratch, packing and the two matmuls) and
// the driver (cpu/flash_prefill.h).

#if !defined(FLEXJIT_DTYPE) || !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || \
    !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY)
#error "the prefill kernel needs the spec macros defined before it"
#endif

static_assert(HEAD_DIM >= 1 && HEAD_DIM_V >= 1 && BLOCK_M >= 1 && BLOCK_N >= 1, "bad spec");
static_assert(GQA_GROUP >= 1, "bad GQA_GROUP");

// One work item's coordinates and base pointers. Without pack_gqa the tile's rows are query
// rows q0.. of head hq. With pack_gqa (decode: a few query rows, GQA) they are the GQA_GROUP * Lq
// (head, query) pairs of one KV head, so K and V are streamed once per group, not once per
// query head: row r of the pairs is head hq + r / Lq, query r % Lq, and the tile holds pairs
// q0.. (hq is then the group's first head).
struct FjkItem {
  fj_i64 b, hq, q0;  // batch (varlen: sequence), query head (first of the group if packed), first row
  fj_i64 bt, qoff;   // q / out / lse batch index and first row of the item's sequence (varlen: 0, cu_seqlens_q[b])
  fj_i64 lkv;        // keys of the item's sequence (Lkv unless varlen)
  fj_i64 packed_lq;  // 0: not packed; else Lq
  int mvalid;        // rows of this tile that exist
  const fjk_elem* k; // k[bk, hkv, 0, 0] (varlen: the sequence's first key)
  const fjk_elem* v; // v[bk, hkv, 0, 0] (likewise)
  float qscale;      // what scores are multiplied by before the mods (see flash_prefill.h)
};
static inline fj_i64 fjk_row_head(const struct FjkItem* it, int m) {
  return it->packed_lq ? it->hq + (it->q0 + m) / it->packed_lq : it->hq;
}
static inline fj_i64 fjk_row_q(const struct FjkItem* it, int m) {
  return it->packed_lq ? (it->q0 + m) % it->packed_lq : it->q0 + m;
}
// Row m of the tile in q and in out (each at its own strides).
static inline const fjk_elem* fjk_q_row(const struct FlexPrefillArgs* a, const struct FjkItem* it, int m) {
  return (const fjk_elem*)a->q + it->bt * a->q_strides[0] + fjk_row_head(it, m) * a->q_strides[1] +
         (it->qoff + fjk_row_q(it, m)) * a->q_strides[2];
}
static inline fjk_elem* fjk_out_row(const struct FlexPrefillArgs* a, const struct FjkItem* it, int m) {
  return (fjk_elem*)a->out + it->bt * a->out_strides[0] + fjk_row_head(it, m) * a->out_strides[1] +
         (it->qoff + fjk_row_q(it, m)) * a->out_strides[2];
}

// ---- prefetching the next block (the FMA and vdpbf16ps engines) ----
// K and V stream from L3 (a head's K and V outgrow L2 at a few thousand rows) once per work
// item, and a plain pack loop would wait on every line. While one block is computed, each
// micro-kernel call prefetches (into L2) a share of the next block's rows, one cache line per
// inner step: K during Q K^T, V during P V. The next pack then reads from L2.
struct FjkPrefetch {
  const char* base;  // first row of the next block
  fj_i64 stride;     // row stride in bytes
  int rows;          // rows to prefetch (0: none)
};
static inline struct FjkPrefetch fjk_prefetch_plan(const fjk_elem* rows, fj_i64 s_row,
                                                   fj_i64 s_col, fj_i64 first, fj_i64 Lkv) {
  struct FjkPrefetch pf = {nullptr, 0, 0};
  if (first < 0 || first >= Lkv || s_col != 1) return pf;  // no next block / not row-contiguous
  pf.base = (const char*)(rows + first * s_row);
  pf.stride = s_row * (fj_i64)sizeof(fjk_elem);
  pf.rows = Lkv - first < BLOCK_N ? (int)(Lkv - first) : BLOCK_N;
  return pf;
}
// The share of one micro-kernel call: rows [r0, r0 + n) of the plan, kWidth elements each,
// one line per step i < lines.
template <int kWidth>
struct FjkPrefetchShare {
  static constexpr int kLinesPerRow = (kWidth * (int)sizeof(fjk_elem) + 63) / 64;
  const char* base;
  fj_i64 stride;
  int lines;
  FjkPrefetchShare(const struct FjkPrefetch* pf, int r0, int n)
      : base(pf->base), stride(pf->stride) {
    const int rows = pf->rows - r0 < n ? pf->rows - r0 : n;
    lines = rows > 0 ? rows * kLinesPerRow : 0;
    base += r0 * stride;
  }
  void step(int i) const {
    if (i < lines)
      __builtin_prefetch(base + (i / kLinesPerRow) * stride + (i % kLinesPerRow) * 64, 0, 2);
  }
};

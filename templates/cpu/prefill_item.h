// Shared by the CPU prefill kernel's parts: one work item's coordinates. Preceded in the TU by
// the spec macros, mod_abi.h, cpu/common.h and cpu/elem.h; followed by one engine
// (cpu/prefill_fma.h or cpu/prefill_amx.h: the tile scratch, packing and the two matmuls) and
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
  fj_i64 b, hq, q0;  // batch, query head (first of the group if packed), first row
  fj_i64 packed_lq;  // 0: not packed; else Lq
  int mvalid;        // rows of this tile that exist
  const fjk_elem* k; // k[bk, hkv, 0, 0]
  const fjk_elem* v; // v[bk, hkv, 0, 0]
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
  return (const fjk_elem*)a->q + it->b * a->q_strides[0] + fjk_row_head(it, m) * a->q_strides[1] +
         fjk_row_q(it, m) * a->q_strides[2];
}
static inline fjk_elem* fjk_out_row(const struct FlexPrefillArgs* a, const struct FjkItem* it, int m) {
  return (fjk_elem*)a->out + it->b * a->out_strides[0] + fjk_row_head(it, m) * a->out_strides[1] +
         fjk_row_q(it, m) * a->out_strides[2];
}

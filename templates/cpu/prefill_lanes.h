// The query-rows-along-lanes layout shared by the FMA and vdpbf16ps prefill engines: tile
// geometry, register blocking and the output write. Preceded by cpu/prefill_item.h, followed by
// the engine (cpu/prefill_fma.h or cpu/prefill_dpbf16.h), which defines FjkTile with the
// transposed, unnormalised output `ot` [dv][m] (row stride kMP).

// ---- tile geometry (all compile time) ----
static constexpr int kMP = (BLOCK_M + 15) / 16 * 16;  // query rows padded to whole vectors
static constexpr int kMV = kMP / 16;                  // vectors per transposed row

// Register blocking. The query vectors are taken kMVC at a time (a chunk: up to 4 vectors,
// 64 rows); the Q K^T kernel keeps kMVC x kNG accumulators (kNG KV rows), the P V kernel
// kMVC x kDG (kDG output features): ~20-24 of the 32 zmm registers, leaving room for the
// kMVC operand vectors. Per step each issues kMVC vector loads and kNG (kDG) broadcasts for
// kMVC * kNG FMAs. The group size is picked near the register limit so that it (nearly)
// divides the width it tiles; the width is then padded to whole groups (zero rows/columns
// computed and ignored, at most a few percent) so no tail kernel is instantiated, which
// would cost compile time.
//
// Without AVX-512 (AVX2: 16 ymm registers) a 16-lane vector takes two registers, so the blocking
// narrows to one query vector (2 registers) by up to 6 rows: 12 accumulator registers, 2 for the
// operand and 1 for the broadcast, 15 of 16. (The 32-register blocking spilled there and ran at
// half the speed.)
#if defined(__AVX512F__)
static constexpr int kMVC = kMV <= 4 ? kMV
                           : kMV % 4 == 0 ? 4
                           : kMV % 3 == 0 ? 3
                           : kMV % 2 == 0 ? 2 : 1;
static constexpr int kMaxGroup = 24 / kMVC;
#else
static constexpr int kMVC = 1;
static constexpr int kMaxGroup = 6;
#endif
static constexpr int fjk_pick_group(int width) {
  int best = kMaxGroup;
  for (int g = kMaxGroup; g >= 1 && 4 * g >= 3 * kMaxGroup; --g)
    if (fjk_round_up(width, g) < fjk_round_up(width, best)) best = g;
  return best;
}
// Row strides of packed K and V blocks, in elements of 4 bytes (floats, or dwords of bf16 pairs):
// whole vectors, plus one cache line when that is a multiple of 64 elements (64, 128, 256),
// which would otherwise put a column's rows into a few L1 sets.
static constexpr int fjk_row_stride(int width) {
  return fjk_round_up(width, 16) + (fjk_round_up(width, 16) % 64 == 0 ? 16 : 0);
}

// out[row m] = O^T[.][m] * inv_l[m] for the item's rows.
static inline void fjk_write_out_t(const struct FlexPrefillArgs* a, const struct FjkItem* it,
                                   const float* ot, const float* inv_l) {
  const fj_i64 os_col = a->out_strides[3];
  FJK_SCALAR_LOOP
  for (int m = 0; m < it->mvalid; ++m) {
    fjk_elem* orow = fjk_out_row(a, it, m);
    FJK_SCALAR_LOOP
    for (int dv = 0; dv < HEAD_DIM_V; ++dv)
      fjk_from_f32(ot[dv * kMP + m] * inv_l[m], orow + dv * os_col);
  }
}

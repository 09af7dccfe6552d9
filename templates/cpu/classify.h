// Block classification for building a BlockMask from a mask_mod (no dense mask needed).
//
// Preceded in the TU by FLEXJIT_ENTRY, mod_abi.h, cpu/common.h and the generated mod body.
// For each listed block (b, h, q_block, kv_block) it evaluates mask_mod over the block clipped
// to Lq x Lkv and writes out[i] = 0 (no element kept, or the clipped block is empty),
// 2 (every element kept) or 1 (some kept: "partial").

#if !defined(FLEXJIT_ENTRY)
#error "classify.h needs FLEXJIT_ENTRY defined before it"
#endif

// 0 / 1 / 2 for one block. Rows are counted in full (a branch-free, vectorisable loop over
// kv_idx); the scan stops after the first row at which both a kept and a masked element
// have been seen, since the block is then partial whatever the rest holds.
static inline signed char fjk_classify_block(const struct FlexClassifyArgs* a, fj_i64 b,
                                             fj_i64 h, fj_i64 qb, fj_i64 kb) {
  const fj_i64 q0 = qb * a->q_block_size, kv0 = kb * a->kv_block_size;
  const fj_i64 q1 = q0 + a->q_block_size < a->Lq ? q0 + a->q_block_size : a->Lq;
  const fj_i64 kv1 = kv0 + a->kv_block_size < a->Lkv ? kv0 + a->kv_block_size : a->Lkv;
  if (q0 >= q1 || kv0 >= kv1) return 0;  // clipped block is empty
#if FLEXJIT_HAS_MASK_MOD
  const struct FlexModArgs* mod = &a->mod;
  const fj_i64 width = kv1 - kv0;
  bool any_kept = false, any_masked = false;
  for (fj_i64 q = q0; q < q1; ++q) {
    fj_i64 kept = 0;
    for (fj_i64 kv = kv0; kv < kv1; ++kv) kept += flexjit_mask_mod(b, h, q, kv, mod) ? 1 : 0;
    any_kept |= kept > 0;
    any_masked |= kept < width;
    if (any_kept && any_masked) return 1;
  }
  return any_kept ? 2 : 0;
#else
  (void)b; (void)h;
  return 2;  // no mask_mod: every element is kept
#endif
}

extern "C" void FLEXJIT_ENTRY(const struct FlexClassifyArgs* a, fj_i64 begin, fj_i64 end) {
  for (fj_i64 i = begin; i < end; ++i) {
    const int* blk = a->blocks + 4 * i;
    a->out[i] = fjk_classify_block(a, blk[0], blk[1], blk[2], blk[3]);
  }
}

// CPU flash decoding with FlexAttention score_mod / mask_mod: the driver.
//
// Preceded in the TU by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
// GQA_GROUP, FLEXJIT_ENTRY), mod_abi.h, cpu/common.h, cpu/elem.h and one engine (scratch, Q K^T,
// softmax, P V): cpu/decode_dot.h (vectors along the head dim) or cpu/decode_amx.h (AMX tiles,
// after cpu/amx_tiles.h). Like the prefill kernel it contains no mod
// code: the mods are the separately compiled FlexApplyModsFn, called once per visited block.
//
// One work item = the rows of one (b, head chunk, row block) against one partition of the
// sequence's keys (FlexDecodeArgs in mod_abi.h). A head chunk is heads_per_item head units (a
// KV head's GQA group, or one query head), each with its own online softmax; the visit of a
// block runs them one after the other, so a paged cache's pages (whose slots interleave the KV
// heads) are read once for all their heads instead of once per head. Per visited block of
// BLOCK_N keys and per unit the steps are the prefill kernel's (flash_prefill.h), on S (the dot
// engine) or S^T (the AMX engine, whose softmax is the prefill kernel's, cpu/common.h):
//   S   = (scale [* log2 e]) Q K^T;  S = score_mod(S), mask  (-inf where masked)
//   m'  = max(m, rowmax S);  P = 2^(S - m');  alpha = 2^(m - m')
//   l   = l * alpha + rowsum P;  O = O * alpha + P V
// and at the end of the partition either out = O / l, lse = ln 2 (m + log2 l) (one partition),
// or the same pair in fp32 into the workspace, for the runtime's merge:
//   out = sum_p e^(lse_p - lse) out_p,   lse = ln sum_p e^(lse_p).

// ---- split compilation (cpu/split.h) ----
// Part 1 is fjk_dec_visit (one block of keys for every head unit), part 2 the rest.
#define FLEXJIT_PARTS 2
#if FLEXJIT_PART != 0
#define fjk_dec_visit FJK_PASTE(FLEXJIT_ENTRY, _dec_visit)
#endif

// One work item's coordinates. Unit u (of `units`) is head unit h0 + u: with pack_gqa KV head
// h0 + u and its GQA_GROUP query heads, else query head h0 + u.
struct FjkDecItem {
  fj_i64 b;          // sequence
  fj_i64 h0;         // first head unit
  int units;         // head units of the item
  int packed;        // a unit's rows are (head, query) pairs of a GQA group
  fj_i64 r0;         // first row of this row block among a unit's rows
  int mvalid;        // rows of each unit in this item
  fj_i64 lq;         // query rows per head (Lq)
  fj_i64 qoff;       // q_idx of query 0 (paged: seq_len - Lq; contiguous: 0)
  fj_i64 len;        // the sequence's number of keys
};
static inline fj_i64 fjk_dec_kv_head(const struct FjkDecItem* it, int u) {
  return it->packed ? it->h0 + u : (it->h0 + u) / GQA_GROUP;
}
// Row r of unit u: query head and query index (0 .. Lq).
static inline fj_i64 fjk_dec_head(const struct FjkDecItem* it, int u, int r) {
  return it->packed ? (it->h0 + u) * GQA_GROUP + (it->r0 + r) / it->lq : it->h0 + u;
}
static inline fj_i64 fjk_dec_query(const struct FjkDecItem* it, int r) {
  return it->packed ? (it->r0 + r) % it->lq : it->r0 + r;
}

// Q rows of every unit, times c, into the engine's Q scratch.
static inline void fjk_dec_pack_q(const struct FlexDecodeArgs* a, const struct FjkDecItem* it,
                                  float c, struct FjkDecTile* t) {
  for (int u = 0; u < it->units; ++u) {
    const struct FjkDecUnit unit = fjk_dec_unit(t, u);
    FJK_SCALAR_LOOP
    for (int r = 0; r < it->mvalid; ++r)
      fjk_dec_q_row(t, &unit, r,
                    (const fjk_elem*)a->q + it->b * a->q_strides[0] + fjk_dec_head(it, u, r) * a->q_strides[1] +
                        fjk_dec_query(it, r) * a->q_strides[2],
                    a->q_strides[3], c);
    fjk_dec_q_pad(&unit, it->mvalid);
  }
}

// Row pointers of KV head hkv's keys [kv0, kv0 + nvalid) into krow / vrow; pointers up to the
// next multiple of 16 read the zero row. Paged caches are walked page by page (one division
// per page, not per key).
static inline void fjk_dec_rows(const struct FlexDecodeArgs* a, const struct FjkDecItem* it, fj_i64 hkv,
                                const fjk_elem** krow, const fjk_elem** vrow, const fjk_elem* zero_row,
                                fj_i64 kv0, int nvalid) {
  const fjk_elem* kb = (const fjk_elem*)a->k;
  const fjk_elem* vb = (const fjk_elem*)a->v;
  if (a->block_table == nullptr) {
    const fj_i64 bk = a->Bkv == 1 ? 0 : it->b;
    const fjk_elem* k = kb + bk * a->k_strides[0] + hkv * a->k_strides[1] + kv0 * a->k_strides[2];
    const fjk_elem* v = vb + bk * a->v_strides[0] + hkv * a->v_strides[1] + kv0 * a->v_strides[2];
    FJK_SCALAR_LOOP
    for (int n = 0; n < nvalid; ++n) {
      krow[n] = k + n * a->k_strides[2];
      vrow[n] = v + n * a->v_strides[2];
    }
  } else {
    const int* pages = a->block_table + it->b * a->block_table_stride;
    const fj_i64 ps = a->page_size;
    int n = 0;
    while (n < nvalid) {
      const fj_i64 pos = kv0 + n, page = pages[pos / ps], slot = pos % ps;
      const int run = ps - slot < nvalid - n ? (int)(ps - slot) : nvalid - n;
      const fjk_elem* k = kb + page * a->k_strides[0] + slot * a->k_strides[1] + hkv * a->k_strides[2];
      const fjk_elem* v = vb + page * a->v_strides[0] + slot * a->v_strides[1] + hkv * a->v_strides[2];
      FJK_SCALAR_LOOP
      for (int j = 0; j < run; ++j) {
        krow[n + j] = k + j * a->k_strides[1];
        vrow[n + j] = v + j * a->v_strides[1];
      }
      n += run;
    }
  }
  const int padded = (nvalid + 15) / 16 * 16;
  FJK_SCALAR_LOOP
  for (int n = nvalid; n < padded; ++n) krow[n] = vrow[n] = zero_row;
}

// score_mod and mask_mod on unit u's S rows [0, mvalid) x keys [0, nvalid): one call per run of
// rows of one query head (in the engine's layout: FlexModTile ld = kDecLdN, ld_m = kDecLdM).
static inline void fjk_dec_apply_mods(const struct FlexDecodeArgs* a, const struct FjkDecItem* it, int u,
                                      struct FjkDecTile* t, fj_i64 kv0, int nvalid, bool partial) {
  const bool mask = partial && a->has_mask_mod;
  if (a->apply_mods == nullptr || !(mask || a->has_score_mod)) return;
  struct FlexModTile tile;
  tile.ld = kDecLdN;
  tile.ld_m = kDecLdM;
  tile.b = it->b;
  tile.kv0 = kv0;
  tile.nvalid = nvalid;
  tile.mask = mask ? 1 : 0;
  for (int r = 0; r < it->mvalid;) {
    const fj_i64 q = fjk_dec_query(it, r);
    const fj_i64 left = it->packed ? it->lq - q : it->mvalid - r;
    const int run = left < it->mvalid - r ? (int)left : it->mvalid - r;
    tile.s = t->s + r * kDecLdM;
    tile.h = fjk_dec_head(it, u, r);
    tile.q0 = it->qoff + q;
    tile.mvalid = run;
    a->apply_mods(&tile, &a->mod);
    r += run;
  }
}

// One block of keys [kv0, kv0 + nvalid), unit by unit. While a unit is computed its rows in the
// block at next_kv0 (next_n keys, 0: none) are prefetched, a whole block ahead (prefetching the
// next unit's rows of this block instead, one unit ahead, measured 11.5 against 14.5 GB/s on one
// thread for B=4 Hkv=8 KV 32k bf16 in shuffled pages of 16). Not inlined: the walk calls it
// from two places.
FJK_SPLIT_LINKAGE __attribute__((noinline)) void fjk_dec_visit(const struct FlexDecodeArgs* a,
                                                               const struct FjkDecItem* it,
                                                               struct FjkDecTile* t, fj_i64 kv0,
                                                               int nvalid, bool partial,
                                                               fj_i64 next_kv0, int next_n)
#if FLEXJIT_PART == 2
    ;
#else
{
  for (int u = 0; u < it->units; ++u) {
    fjk_dec_rows(a, it, fjk_dec_kv_head(it, u), t->krow, t->vrow, t->zero_row, kv0, nvalid);
    t->next_n = next_n;
    if (next_n > 0)
      fjk_dec_rows(a, it, fjk_dec_kv_head(it, u), t->next_krow, t->next_vrow, t->zero_row, next_kv0, next_n);
    const struct FjkDecUnit unit = fjk_dec_unit(t, u);
    fjk_dec_scores(t, &unit, it->mvalid, nvalid);
    fjk_dec_apply_mods(a, it, u, t, kv0, nvalid, partial);
    if (fjk_dec_softmax(t, &unit, it->mvalid, nvalid)) {
      fjk_dec_pack_v(t, nvalid, a->block_table != nullptr || a->v_strides[2] != HEAD_DIM_V);
      fjk_dec_pv(t, &unit, it->mvalid, nvalid);
    }
  }
}
#endif  // FLEXJIT_PART != 2

#if FLEXJIT_PART != 1  // the rest of the kernel: part 2 (or the whole kernel)

// The walk over an item's blocks runs one block behind the blocks it is given, so each visit
// knows the block after it.
struct FjkDecWalk {
  fj_i64 kv0;
  int n;        // keys of the pending block (0: none pending)
  bool partial;
};
static inline void fjk_dec_walk_to(const struct FlexDecodeArgs* a, const struct FjkDecItem* it,
                                   struct FjkDecTile* t, struct FjkDecWalk* w, fj_i64 kv0, int n,
                                   bool partial) {
  if (w->n > 0) fjk_dec_visit(a, it, t, w->kv0, w->n, w->partial, kv0, n);
  w->kv0 = kv0;
  w->n = n;
  w->partial = partial;
}

// Walks the BLOCK_N sub-blocks of `count` listed mask blocks that fall in [begin, end).
__attribute__((noinline)) static void fjk_dec_walk_listed(const struct FlexDecodeArgs* a,
                                                          const struct FjkDecItem* it,
                                                          struct FjkDecTile* t, struct FjkDecWalk* w,
                                                          const int* idx, int count, bool partial,
                                                          fj_i64 begin, fj_i64 end) {
  const fj_i64 mbs = a->mask.kv_block_size;
  for (int j = 0; j < count; ++j) {
    const fj_i64 base = (fj_i64)idx[j] * mbs;
    if (base >= end || base + mbs <= begin) continue;
    const fj_i64 lo = base > begin ? base : begin, hi = base + mbs < end ? base + mbs : end;
    for (fj_i64 kv0 = lo; kv0 < hi; kv0 += BLOCK_N)
      fjk_dec_walk_to(a, it, t, w, kv0, hi - kv0 < BLOCK_N ? (int)(hi - kv0) : BLOCK_N, partial);
  }
}

// ---- one work item ----
__attribute__((noinline)) static void fjk_dec_run_item(const struct FlexDecodeArgs* a,
                                                       struct FjkDecTile* t, fj_i64 item) {
  const fj_i64 heads = a->pack_gqa ? a->Hkv : a->Hq;
  const fj_i64 per_item = a->heads_per_item;  // <= kMaxUnits (the runtime checks)
  const fj_i64 chunks = (heads + per_item - 1) / per_item;
  const fj_i64 rows = a->pack_gqa ? GQA_GROUP * a->Lq : a->Lq;
  const fj_i64 row_blocks = (rows + BLOCK_M - 1) / BLOCK_M;
  const fj_i64 p = item % a->num_partitions;
  fj_i64 rest = item / a->num_partitions;
  const fj_i64 rb = rest % row_blocks;
  rest /= row_blocks;
  const fj_i64 c = rest % chunks, b = rest / chunks;

  struct FjkDecItem it;
  it.b = b;
  it.packed = a->pack_gqa;
  it.h0 = c * per_item;
  it.units = heads - it.h0 < per_item ? (int)(heads - it.h0) : (int)per_item;
  it.r0 = rb * BLOCK_M;
  it.mvalid = rows - it.r0 < BLOCK_M ? (int)(rows - it.r0) : BLOCK_M;
  it.lq = a->Lq;
  it.len = a->block_table != nullptr ? (fj_i64)a->seq_lens[b] : a->Lkv;
  it.qoff = a->block_table != nullptr ? it.len - a->Lq : 0;

  // Scores carry `scale`, and log2 e as well when no score_mod needs the natural-scale score.
  const bool score_mod = a->apply_mods != nullptr && a->has_score_mod;
  fjk_dec_pack_q(a, &it, score_mod ? a->scale : a->scale * FJK_LOG2E, t);
  fjk_dec_item_begin(t, it.units);

  // An empty sequence (paged, seq_len 0) has no keys: every row is fully masked.
  const fj_i64 begin = p * a->partition_size;
  const fj_i64 end = begin + a->partition_size < it.len ? begin + a->partition_size : it.len;
  struct FjkDecWalk walk = {0, 0, false};
  if (begin < end) {
    if (a->mask.kv_num_blocks == nullptr) {
      for (fj_i64 kv0 = begin; kv0 < end; kv0 += BLOCK_N)
        fjk_dec_walk_to(a, &it, t, &walk, kv0, end - kv0 < BLOCK_N ? (int)(end - kv0) : BLOCK_N,
                        a->has_mask_mod != 0);
    } else {
      // Items of several units need a mask that does not differ by head (the runtime checks).
      const fj_i64 mb = a->mask.B == 1 ? 0 : b, mh = a->mask.H == 1 ? 0 : fjk_dec_head(&it, 0, 0);
      const fj_i64 row = (mb * a->mask.H + mh) * a->mask.q_blocks;  // q-block 0
      fjk_dec_walk_listed(a, &it, t, &walk, a->mask.kv_indices + row * a->mask.kv_indices_stride,
                          a->mask.kv_num_blocks[row], true, begin, end);
      if (a->mask.full_kv_num_blocks != nullptr)
        fjk_dec_walk_listed(a, &it, t, &walk, a->mask.full_kv_indices + row * a->mask.full_kv_indices_stride,
                            a->mask.full_kv_num_blocks[row], false, begin, end);
    }
  }
  if (walk.n > 0) fjk_dec_visit(a, &it, t, walk.kv0, walk.n, walk.partial, 0, 0);

  // Epilogue. A row that kept no key (l = 0) gets out 0 and lse -inf instead of 0/0 = NaN.
  // Partial states: item i's rows at [i][u * BLOCK_M + r] of a heads_per_item * BLOCK_M stride.
  for (int u = 0; u < it.units; ++u) {
    const struct FjkDecUnit unit = fjk_dec_unit(t, u);
    FJK_SCALAR_LOOP
    for (int r = 0; r < it.mvalid; ++r) {
      const float l = unit.l[r];
      const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
      const float lse = l > 0.0f ? (float)(FJK_LN2 * ((double)unit.m[r] + fjk_log2(l))) : FJK_NEG_INF;
      if (a->ws_out != nullptr) {
        const fj_i64 row = item * per_item * BLOCK_M + u * BLOCK_M + r;
        float* dst = a->ws_out + row * HEAD_DIM_V;
        FJK_SCALAR_LOOP
        for (int dv = 0; dv < HEAD_DIM_V; ++dv) dst[dv] = fjk_dec_o(&unit, r, dv) * inv_l;
        a->ws_lse[row] = lse;
      } else {
        const fj_i64 hq = fjk_dec_head(&it, u, r), qi = fjk_dec_query(&it, r);
        fjk_elem* dst = (fjk_elem*)a->out + b * a->out_strides[0] + hq * a->out_strides[1] +
                        qi * a->out_strides[2];
        FJK_SCALAR_LOOP
        for (int dv = 0; dv < HEAD_DIM_V; ++dv)
          fjk_from_f32(fjk_dec_o(&unit, r, dv) * inv_l, dst + dv * a->out_strides[3]);
        if (a->lse != nullptr)
          a->lse[b * a->lse_strides[0] + hq * a->lse_strides[1] + qi * a->lse_strides[2]] = lse;
      }
    }
  }
}

extern "C" void FLEXJIT_ENTRY(const struct FlexDecodeArgs* a, fj_i64 begin, fj_i64 end) {
  struct FjkDecTile t;
  fjk_dec_engine_begin(&t);
  for (fj_i64 item = begin; item < end; ++item) fjk_dec_run_item(a, &t, item);
  fjk_dec_engine_end(&t);
}
#endif  // FLEXJIT_PART != 1

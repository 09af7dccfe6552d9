// CUDA flash decoding (split-KV) with FlexAttention score_mod / mask_mod, on tensor cores
// (mma.sync m16n8k16, bf16 or fp16 operands, fp32 accumulation), for sm_80+. The contract is
// FlexCudaDecodeArgs' (templates/cuda/abi.cuh): contiguous or paged KV, GQA groups packed into
// one tile's rows so K and V are read once per group, partitions of partition_size keys whose
// partial states a second entry merges.
//
// Preceded in the translation unit by the spec macros (FLEXJIT_DTYPE, HEAD_DIM, HEAD_DIM_V,
// BLOCK_M = 16, BLOCK_N, GQA_GROUP, FLEXJIT_KV_STAGES, FLEXJIT_DECODE_WARPS, FLEXJIT_ENTRY,
// FLEXJIT_ENTRY_MERGE), templates/mod_abi.h, templates/cuda/abi.cuh, templates/cuda/common.cuh,
// the generated mod body (flexjit_score_mod / flexjit_mask_mod, inlined) and
// templates/cuda/flash_block.cuh (the per-block steps, shared with prefill). Header-free.
//
// One CTA = one row tile (16 packed rows) of one head unit of sequence b, over partition p's keys
// [p * partition_size, min((p + 1) * partition_size, len)). Its FLEXJIT_DECODE_WARPS warps share
// the Q tile and take the partition's KV blocks of BLOCK_N keys in turn (warp w: blocks w,
// w + warps, ...), each with its own K/V stages (cp.async, FLEXJIT_KV_STAGES deep) and its own
// online softmax, the prefill kernel's steps:
//   S = Q K^T; S = score_mod(scale S), mask; m' = max(m, rowmax S); P = 2^(S - m');
//   l = l 2^(m - m') + rowsum P; O = O 2^(m - m') + P V
// Then the warps' states meet in shared memory: M = max_w m_w, L = sum_w l_w 2^(m_w - M),
// O = sum_w O_w 2^(m_w - M) / L, lse = ln 2 (M + log2 L); a row that kept no key gets 0 and -inf.
// Decode is memory-bound: the warps keep several K/V loads in flight per CTA, and the grid
// (partitions x row tiles x units x B) is what fills the GPU.

#if !defined(HEAD_DIM) || !defined(HEAD_DIM_V) || !defined(BLOCK_M) || !defined(BLOCK_N) ||       \
    !defined(GQA_GROUP) || !defined(FLEXJIT_ENTRY) || !defined(FLEXJIT_ENTRY_MERGE) ||            \
    !defined(FLEXJIT_DTYPE) || !defined(FLEXJIT_KV_STAGES) || !defined(FLEXJIT_DECODE_WARPS)
#error "flash_decode.cuh needs the spec macros defined before it"
#endif

static constexpr int kWarps = FLEXJIT_DECODE_WARPS;
static constexpr int kThreads = kWarps * 32;
static constexpr int kDP = (HEAD_DIM + 15) / 16 * 16;
static constexpr int kDVP = (HEAD_DIM_V + 15) / 16 * 16;
#if FLEXJIT_DTYPE == 0
// fp32 K/V: CUDA cores (no tensor-core path keeps fp32 accuracy): lane j of a warp scores key j
// of a 32-key block against the 16 rows, and owns output columns lane + 32 i. Rows padded by one
// 16-byte chunk (4 floats).
typedef float fjd_elem;
static constexpr int kQW = HEAD_DIM, kKW = HEAD_DIM, kVW = HEAD_DIM_V;  // loaded widths
static constexpr int kQS = HEAD_DIM + 4, kKS = HEAD_DIM + 4, kVS = HEAD_DIM_V + 4;
static constexpr int kPBytes = 4 * kWarps * BLOCK_M * 32;  // each warp's P (16 rows x 32 keys)
static_assert(BLOCK_N == 32, "fp32 decode: one key per lane, BLOCK_N 32");
#else
typedef fjc_u16 fjd_elem;
static constexpr int kQW = kDP, kKW = kDP, kVW = kDVP;
static constexpr int kQS = kDP + 8;
static constexpr int kKS = kDP + 8;
static constexpr int kVS = kDVP + 8;
static constexpr int kPBytes = 0;
#endif
static constexpr int kNT = BLOCK_N / 8;
static constexpr int kOT = kDVP / 8;
static constexpr int kMergeThreads = 128;
static_assert(BLOCK_M == 16, "the decode kernel's row tile is one m16 tile");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N >= 16 && BLOCK_N <= 128, "BLOCK_N: a multiple of 16 up to 128");
static_assert(kWarps >= 1 && kWarps <= 8, "1..8 warps");
static_assert(HEAD_DIM % 8 == 0 && HEAD_DIM_V % 8 == 0, "D and Dv: multiples of 8 (16-byte rows)");
static_assert(FLEXJIT_KV_STAGES == 1 || FLEXJIT_KV_STAGES == 2, "1 or 2 K/V stages");

// Shared memory: the Q tile, then each warp's K/V stages; after the KV loop the same space holds
// the warps' (m, l, O) for the merge.
// fp32: each warp's P scratch sits between the Q tile and the K/V stages.
static constexpr int kKvBytes = (int)sizeof(fjd_elem) * kWarps * FLEXJIT_KV_STAGES * BLOCK_N * (kKS + kVS);
static constexpr int kMergeBytes = 4 * kWarps * BLOCK_M * (kDVP + 2);
static constexpr int kSmemBytes =
    (int)sizeof(fjd_elem) * BLOCK_M * kQS + kPBytes + (kKvBytes > kMergeBytes ? kKvBytes : kMergeBytes);

// An output element: fp32 as is, bf16 / fp16 rounded to nearest even.
FJC_DEV void fjd_store(fjd_elem* row, int col, float v) {
#if FLEXJIT_DTYPE == 0
  row[col] = v;
#else
  row[col] = fjc_to_elem(v);
#endif
}

// ---- rows: packed row pr of a unit is (head, query) ----
struct FjdRows {
  fj_i64 unit, rows, lq;
  int pack;
  fj_i64 tiles, r0;  // row tiles of a unit; the first row of this CTA's tile
};
// The rows of row-tile index y = unit * tiles + tile (grid y of the partition kernel, x of the merge).
FJC_DEV struct FjdRows fjd_rows(const struct FlexCudaDecodeArgs& a, fj_i64 y) {
  struct FjdRows R;
  R.rows = a.pack_gqa ? GQA_GROUP * a.Lq : a.Lq;
  R.lq = a.Lq;
  R.pack = a.pack_gqa;
  R.tiles = (R.rows + BLOCK_M - 1) / BLOCK_M;
  R.unit = y / R.tiles;
  R.r0 = (y % R.tiles) * BLOCK_M;
  return R;
}
FJC_DEV fj_i64 fjd_head(const struct FjdRows& R, fj_i64 pr) { return R.pack ? R.unit * GQA_GROUP + pr / R.lq : R.unit; }
FJC_DEV fj_i64 fjd_query(const struct FjdRows& R, fj_i64 pr) { return R.pack ? pr % R.lq : pr; }

// ---- K or V rows of one block: key kv0 + r ----
struct FjdKvRows {
  const fjd_elem* base;  // contiguous: at (b, hkv); paged: at hkv
  fj_i64 s_pos;         // contiguous: position stride
  const int* pages;     // paged: sequence b's block-table row (null: contiguous)
  fj_i64 page_size, s_page, s_slot, max_pages, num_pages;
  int* range_error;     // set when a page index is out of range (page 0 is read instead)
  fj_i64 kv0;
  __device__ __forceinline__ const fjd_elem* operator()(int r) const {
    const fj_i64 n = kv0 + r;
    if (pages == nullptr) return base + n * s_pos;
    const fj_i64 col = n / page_size;
    fj_i64 pg = col < max_pages ? (fj_i64)pages[col] : -1;
    if (pg < 0 || pg >= num_pages) {
      *range_error = 1;
      pg = 0;
    }
    return base + pg * s_page + (n % page_size) * s_slot;
  }
};

// ---- the KV blocks of a partition, in order ----
// Without a block mask: every BLOCK_N block of [begin, end), partial when there is a mask_mod.
// With one: the listed partial blocks of the unit's mask row (q-block 0), then its full blocks,
// clipped to [begin, end) and cut into BLOCK_N sub-blocks (BLOCK_N divides kv_block_size and
// partition_size, so sub-blocks start at multiples of BLOCK_N).
struct FjdWalk {
  // Partial and full lists (idx0 null: no block mask). Fields, not arrays: an array indexed by the
  // cursor would live in local memory.
  const int* idx0;
  const int* idx1;
  int count0, count1;
  fj_i64 mbs, begin, end;
  int list, j;        // cursor: list, next entry
  fj_i64 next, hi;    // next sub-block start; end of the current entry's range
  fj_i64 kv_blocks;   // the mask's KV blocks: indices past them are skipped and flagged
  int* range_error;
};
struct FjdBlock {
  fj_i64 kv0;
  int n;
  bool partial, valid;
};
FJC_DEV struct FjdBlock fjd_next(struct FjdWalk& w) {
  struct FjdBlock blk;
  blk.kv0 = 0;
  blk.n = 0;
  blk.partial = false;
  blk.valid = false;
  if (w.idx0 == nullptr) {
    if (w.next < w.end) {
      blk.kv0 = w.next;
      blk.n = (int)(w.end - w.next < BLOCK_N ? w.end - w.next : BLOCK_N);
      blk.partial = FLEXJIT_HAS_MASK_MOD != 0;
      blk.valid = true;
      w.next += BLOCK_N;
    }
    return blk;
  }
  while (w.next >= w.hi) {
    if (w.list > 1) return blk;
    const int* idx = w.list == 0 ? w.idx0 : w.idx1;
    if (idx == nullptr || w.j >= (w.list == 0 ? w.count0 : w.count1)) {
      ++w.list;
      w.j = 0;
      continue;
    }
    const int blk = idx[w.j++];
    if (blk < 0 || blk >= w.kv_blocks) {  // a device mask is not checked on the host: skip, flag
      *w.range_error = 1;
      continue;
    }
    const fj_i64 base = (fj_i64)blk * w.mbs;
    w.next = base > w.begin ? base : w.begin;
    w.hi = base + w.mbs < w.end ? base + w.mbs : w.end;
  }
  blk.kv0 = w.next;
  blk.n = (int)(w.hi - w.next < BLOCK_N ? w.hi - w.next : BLOCK_N);
  blk.partial = w.list == 0;
  blk.valid = true;
  w.next += BLOCK_N;
  return blk;
}
// Skips `skip` blocks, then returns the next.
FJC_DEV struct FjdBlock fjd_take(struct FjdWalk& w, int skip) {
  for (int i = 0; i < skip; ++i) (void)fjd_next(w);
  return fjd_next(w);
}

// ---- a warp's state and its steps per KV block: tensor cores (bf16 / fp16) or CUDA cores (fp32) ----
#if FLEXJIT_DTYPE == 0
static constexpr int kCV = (HEAD_DIM_V + 31) / 32;  // output columns per lane: lane + 32 i
struct FjdState {
  float m[BLOCK_M];       // running row max, base 2 (the same in every lane)
  float lp[BLOCK_M];      // this lane's share of the running row sum (its keys')
  float o[BLOCK_M][kCV];  // output columns lane + 32 i
};
FJC_DEV void fjd_state_init(struct FjdState& st) {
#pragma unroll
  for (int r = 0; r < BLOCK_M; ++r) {
    st.m[r] = FJC_NEG_INF;
    st.lp[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < kCV; ++i) st.o[r][i] = 0.0f;
  }
}
FJC_DEV float fjd_warp_max(float x) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, s));
  return x;
}
FJC_DEV float fjd_warp_sum(float x) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
  return x;
}
// Lane j scores key cur.kv0 + j against the 16 rows (Q and K rows from shared memory), the mods,
// each row's max over the warp, P = 2^(S - m') into the warp's P scratch, then O += P V with each
// lane summing its columns over the 32 keys.
FJC_DEV void fjd_block(struct FjdState& st, const float* sQ, const float* sK, const float* sV, float* sPw,
                       const struct FjdBlock& cur, const struct FjdRows& R, fj_i64 r0, fj_i64 qoff, fj_i64 b,
                       float scale, const struct FlexModArgs* mod, int lane) {
  float s[BLOCK_M];
#pragma unroll
  for (int r = 0; r < BLOCK_M; ++r) s[r] = 0.0f;
  const float* kj = sK + lane * kKS;
#pragma unroll 4
  for (int d = 0; d < HEAD_DIM; d += 4) {
    const float k0 = kj[d], k1 = kj[d + 1], k2 = kj[d + 2], k3 = kj[d + 3];
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
      const float* qr = sQ + r * kQS + d;
      s[r] = fmaf(qr[3], k3, fmaf(qr[2], k2, fmaf(qr[1], k1, fmaf(qr[0], k0, s[r]))));
    }
  }
  const fj_i64 kv_idx = cur.kv0 + lane;
#pragma unroll
  for (int r = 0; r < BLOCK_M; ++r) {
    const fj_i64 pr = r0 + r;
    float x = s[r];
    if (pr >= R.rows || lane >= cur.n) {
      x = FJC_NEG_INF;  // mods are only ever called inside the call's ranges
    } else {
      const fj_i64 h = fjd_head(R, pr), q_idx = qoff + fjd_query(R, pr);
#if FLEXJIT_HAS_SCORE_MOD
      x = flexjit_score_mod(x * scale, b, h, q_idx, kv_idx, mod) * fjc_kLog2e;
#else
      x = x * (scale * fjc_kLog2e);
#endif
#if FLEXJIT_HAS_MASK_MOD
      if (cur.partial && !flexjit_mask_mod(b, h, q_idx, kv_idx, mod)) x = FJC_NEG_INF;
#endif
      (void)h, (void)q_idx;
    }
    const float m_new = fmaxf(st.m[r], fjd_warp_max(x));
    const float ref = m_new == FJC_NEG_INF ? 0.0f : m_new;  // no finite score yet: P = 0, never NaN
    const float alpha = exp2f(st.m[r] - ref);
    st.m[r] = m_new;
    const float pv = exp2f(x - ref);
    st.lp[r] = st.lp[r] * alpha + pv;
#pragma unroll
    for (int i = 0; i < kCV; ++i) st.o[r][i] *= alpha;
    sPw[r * 32 + lane] = pv;
  }
  (void)b, (void)mod, (void)kv_idx;
  __syncwarp();
  for (int jj = 0; jj < 32; ++jj) {
    float v[kCV];
#pragma unroll
    for (int i = 0; i < kCV; ++i) {
      const int c = lane + 32 * i;
      v[i] = c < HEAD_DIM_V ? sV[jj * kVS + c] : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < BLOCK_M; ++r) {
      const float pj = sPw[r * 32 + jj];
#pragma unroll
      for (int i = 0; i < kCV; ++i) st.o[r][i] = fmaf(pj, v[i], st.o[r][i]);
    }
  }
  __syncwarp();  // the P scratch is rewritten by the next block
}
// The warp's (m, l, O) into the merge area.
FJC_DEV void fjd_state_store(const struct FjdState& st, float* sm_m, float* sm_l, float* sm_o, int warp, int lane) {
#pragma unroll
  for (int r = 0; r < BLOCK_M; ++r) {
    const float l = fjd_warp_sum(st.lp[r]);
    if (lane == 0) {
      sm_m[warp * BLOCK_M + r] = st.m[r];
      sm_l[warp * BLOCK_M + r] = l;
    }
#pragma unroll
    for (int i = 0; i < kCV; ++i) {
      const int c = lane + 32 * i;
      if (c < kDVP) sm_o[(warp * BLOCK_M + r) * kDVP + c] = c < HEAD_DIM_V ? st.o[r][i] : 0.0f;
    }
  }
}
#else
struct FjdState {
  float o[1][kOT][4];  // one m16 tile per warp
  float m_run[2];      // rows lane / 4 and lane / 4 + 8: running max, base 2
  float l_run[2];      // this thread's share of their running sums
};
FJC_DEV void fjd_state_init(struct FjdState& st) {
#pragma unroll
  for (int t = 0; t < kOT; ++t) st.o[0][t][0] = st.o[0][t][1] = st.o[0][t][2] = st.o[0][t][3] = 0.0f;
  st.m_run[0] = st.m_run[1] = FJC_NEG_INF;
  st.l_run[0] = st.l_run[1] = 0.0f;
}
// The block on tensor cores (flash_block.cuh's steps, one m16 tile).
FJC_DEV void fjd_block(struct FjdState& st, const fjc_u16* sQ, const fjc_u16* sK, const fjc_u16* sV, float* sPw,
                       const struct FjdBlock& cur, const struct FjdRows& R, fj_i64 r0, fj_i64 qoff, fj_i64 b,
                       float scale, const struct FlexModArgs* mod, int lane) {
  (void)sPw;
  float s[1][kNT][4];
  fjc_block_scores<1, kNT, kDP, kQS, kKS>(s, sQ, sK, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const fj_i64 pr = r0 + lane / 4 + 8 * r;
    const bool row_ok = pr < R.rows;
    fjc_block_softmax_row<kNT, kOT>(s[0], st.o[0], st.m_run[r], st.l_run[r], r, row_ok, b,
                                    fjd_head(R, row_ok ? pr : r0), qoff + fjd_query(R, row_ok ? pr : r0), cur.kv0,
                                    cur.n, cur.partial, scale, mod, lane);
  }
  fjc_block_pv<1, kNT, kOT, kVS>(st.o, s, sV, lane);
}
FJC_DEV void fjd_state_store(const struct FjdState& st, float* sm_m, float* sm_l, float* sm_o, int warp, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = st.l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = lane / 4 + 8 * r;
    if (lane % 4 == 0) {
      sm_m[warp * BLOCK_M + row] = st.m_run[r];
      sm_l[warp * BLOCK_M + row] = l;
    }
#pragma unroll
    for (int t = 0; t < kOT; ++t) {
      const int col = t * 8 + (lane % 4) * 2;
      sm_o[(warp * BLOCK_M + row) * kDVP + col] = st.o[0][t][2 * r];
      sm_o[(warp * BLOCK_M + row) * kDVP + col + 1] = st.o[0][t][2 * r + 1];
    }
  }
}
#endif

// ---- the partition kernel ----
extern "C" __global__ void __launch_bounds__(kThreads)
    FLEXJIT_ENTRY(const __grid_constant__ struct FlexCudaDecodeArgs a) {
  FJC_DYNAMIC_SMEM(fjc_smem_raw);
  fjd_elem* const sQ = (fjd_elem*)fjc_smem_raw;
  float* const sP = (float*)(sQ + BLOCK_M * kQS);  // fp32 only: each warp's P
  fjd_elem* const sKV = (fjd_elem*)((unsigned char*)sP + kPBytes);
  __shared__ int mod_error;
  __shared__ int range_error;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const fj_i64 p = blockIdx.x, b = blockIdx.z;
  const fj_i64 units = a.pack_gqa ? a.Hkv : a.Hq;
  const struct FjdRows R = fjd_rows(a, blockIdx.y);
  const fj_i64 row_tiles = R.tiles, r0 = R.r0;
  const fj_i64 hkv = a.pack_gqa ? R.unit : R.unit / GQA_GROUP;
  const bool paged = a.block_table != nullptr;
  const fj_i64 len_raw = paged ? (fj_i64)a.seq_lens[b] : a.Lkv;
  const fj_i64 len = len_raw < 0 ? 0 : len_raw;
  const fj_i64 qoff = paged ? len - a.Lq : 0;
  const fj_i64 begin = p * a.partition_size;
  const fj_i64 end = begin + a.partition_size < len ? begin + a.partition_size : len;

  struct FjdKvRows kr, vr;
  if (paged) {
    kr.base = (const fjd_elem*)a.k + hkv * a.k_strides[2];
    vr.base = (const fjd_elem*)a.v + hkv * a.v_strides[2];
    kr.pages = vr.pages = a.block_table + b * a.block_table_stride;
    kr.page_size = vr.page_size = a.page_size;
    kr.s_page = a.k_strides[0], kr.s_slot = a.k_strides[1];
    vr.s_page = a.v_strides[0], vr.s_slot = a.v_strides[1];
    kr.s_pos = vr.s_pos = 0;
    kr.max_pages = vr.max_pages = a.max_pages;
    kr.num_pages = vr.num_pages = a.num_pages;
  } else {
    const fj_i64 bk = a.Bkv == 1 ? 0 : b;
    kr.base = (const fjd_elem*)a.k + bk * a.k_strides[0] + hkv * a.k_strides[1];
    vr.base = (const fjd_elem*)a.v + bk * a.v_strides[0] + hkv * a.v_strides[1];
    kr.s_pos = a.k_strides[2];
    vr.s_pos = a.v_strides[2];
    kr.pages = vr.pages = nullptr;
    kr.page_size = vr.page_size = 1;
    kr.s_page = kr.s_slot = vr.s_page = vr.s_slot = 0;
    kr.max_pages = vr.max_pages = kr.num_pages = vr.num_pages = 0;
  }
  kr.kv0 = vr.kv0 = 0;
  kr.range_error = vr.range_error = &range_error;

  if (threadIdx.x == 0) {
    mod_error = 0;
    // A sequence the grid's partitions do not cover, or one shorter than its queries.
    range_error = paged && (len_raw < 0 || len > a.num_partitions * a.partition_size || (len > 0 && len < a.Lq)) ? 1 : 0;
  }
  __syncthreads();  // the flags are set before anyone may raise them
  struct FlexModArgs mod;
  mod.buffers = a.buffers;
  mod.params = a.params;
  mod.error_flag = &mod_error;

  // The Q tile: 16 packed rows, each a (head, query) row of q.
  const fjd_elem* const qb = (const fjd_elem*)a.q + b * a.q_strides[0];
  fjc_load_rows<BLOCK_M, kQW, HEAD_DIM, kQS, kThreads>(
      sQ,
      [&](int r) { return qb + fjd_head(R, r0 + r) * a.q_strides[1] + fjd_query(R, r0 + r) * a.q_strides[2]; },
      R.rows - r0, (int)threadIdx.x, a.q);
  fjc_cp_async_commit();

  // This warp's blocks: w, w + warps, ...
  struct FjdWalk walk;
  walk.begin = begin;
  walk.end = end;
  walk.list = 0;
  walk.j = 0;
  walk.next = begin;
  walk.hi = begin;
  walk.idx0 = walk.idx1 = nullptr;
  walk.count0 = walk.count1 = 0;
  walk.mbs = BLOCK_N;
  walk.kv_blocks = 0;
  walk.range_error = &range_error;
  if (a.mask.kv_num_blocks != nullptr) {
    const fj_i64 mb = a.mask.B == 1 ? 0 : b, mh = a.mask.H == 1 ? 0 : fjd_head(R, r0);
    const fj_i64 row = (mb * a.mask.H + mh) * a.mask.q_blocks;  // q-block 0
    walk.idx0 = a.mask.kv_indices + row * a.mask.kv_indices_stride;
    walk.count0 = fjc_clamp_count(a.mask.kv_num_blocks[row], a.mask.kv_indices_stride, &range_error);
    if (a.mask.full_kv_num_blocks != nullptr) {
      walk.idx1 = a.mask.full_kv_indices + row * a.mask.full_kv_indices_stride;
      walk.count1 = fjc_clamp_count(a.mask.full_kv_num_blocks[row], a.mask.full_kv_indices_stride, &range_error);
    }
    walk.mbs = a.mask.kv_block_size;
    walk.kv_blocks = a.mask.kv_blocks;
  }
  fjd_elem* const myK = sKV + warp * FLEXJIT_KV_STAGES * BLOCK_N * (kKS + kVS);
  fjd_elem* const myV = myK + FLEXJIT_KV_STAGES * BLOCK_N * kKS;
  auto load_kv = [&](const struct FjdBlock& blk, int stage) {
    kr.kv0 = vr.kv0 = blk.kv0;
    fjc_load_rows<BLOCK_N, kKW, HEAD_DIM, kKS, 32>(myK + stage * BLOCK_N * kKS, kr, blk.n, lane, a.k);
    fjc_load_rows<BLOCK_N, kVW, HEAD_DIM_V, kVS, 32>(myV + stage * BLOCK_N * kVS, vr, blk.n, lane, a.v);
  };
  struct FjdBlock cur = fjd_take(walk, warp);  // none when the partition is empty
  if (cur.valid) load_kv(cur, 0);
  fjc_cp_async_commit();
  fjc_cp_async_wait<1>();  // the Q tile (this thread's part)
  __syncthreads();         // ... and everyone's

  struct FjdState st;
  fjd_state_init(st);
  int stage = 0;

  while (cur.valid) {
    const struct FjdBlock nxt = fjd_take(walk, kWarps - 1);
    if (FLEXJIT_KV_STAGES == 2 && nxt.valid) {
      load_kv(nxt, stage ^ 1);  // overlaps this block's math
      fjc_cp_async_commit();
      fjc_cp_async_wait<1>();
    } else {
      fjc_cp_async_wait<0>();
    }
    __syncwarp();
    fjd_block(st, sQ, myK + stage * BLOCK_N * kKS, myV + stage * BLOCK_N * kVS, sP + warp * BLOCK_M * 32, cur, R, r0,
              qoff, b, a.scale, &mod, lane);
    __syncwarp();  // this stage is overwritten by the load after next (or next, with one stage)
    if (FLEXJIT_KV_STAGES == 1 && nxt.valid) {
      load_kv(nxt, 0);
      fjc_cp_async_commit();
    }
    cur = nxt;
    stage = FLEXJIT_KV_STAGES == 2 ? stage ^ 1 : 0;
  }

  // ---- the warps' states meet in shared memory (over the K/V stages, now idle) ----
  __syncthreads();
  float* const sm_m = (float*)sKV;              // [kWarps][16]
  float* const sm_l = sm_m + kWarps * BLOCK_M;  // [kWarps][16]
  float* const sm_o = sm_l + kWarps * BLOCK_M;  // [kWarps][16][kDVP]
  fjd_state_store(st, sm_m, sm_l, sm_o, warp, lane);
  __syncthreads();
  const fj_i64 slot0 = ((b * units * row_tiles + blockIdx.y) * a.num_partitions + p) * BLOCK_M;
  for (int e = threadIdx.x; e < BLOCK_M * HEAD_DIM_V; e += kThreads) {
    const int row = e / HEAD_DIM_V, col = e % HEAD_DIM_V;
    const fj_i64 pr = r0 + row;
    if (pr >= R.rows) continue;
    float M = FJC_NEG_INF;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_m[w * BLOCK_M + row]);
    const float ref = M == FJC_NEG_INF ? 0.0f : M;
    float L = 0.0f, acc = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(sm_m[w * BLOCK_M + row] - ref);
      L += sm_l[w * BLOCK_M + row] * f;
      acc += sm_o[(w * BLOCK_M + row) * kDVP + col] * f;
    }
    const float val = L > 0.0f ? acc / L : 0.0f;
    const float lse = L > 0.0f ? fjc_kLn2 * (M + log2f(L)) : FJC_NEG_INF;
    if (a.ws_out == nullptr) {
      const fj_i64 h = fjd_head(R, pr), qi = fjd_query(R, pr);
      fjd_elem* orow = (fjd_elem*)a.out + b * a.out_strides[0] + h * a.out_strides[1] + qi * a.out_strides[2];
      fjd_store(orow, col, val);
      if (col == 0 && a.lse != nullptr) a.lse[b * a.lse_strides[0] + h * a.lse_strides[1] + qi * a.lse_strides[2]] = lse;
    } else {
      a.ws_out[(slot0 + row) * HEAD_DIM_V + col] = val;
      if (col == 0) a.ws_lse[slot0 + row] = lse;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && (mod_error || range_error) && a.error_flag != nullptr)
    atomicOr(a.error_flag, (mod_error ? 1 : 0) | (range_error ? 2 : 0));
}

// ---- the merge: partitions' (out, lse) -> out, lse; grid (units * row_tiles, B) ----
// Natural-log states: LSE = M + ln sum_p e^(lse_p - M), out = sum_p e^(lse_p - LSE) out_p. A
// partition that kept no key (lse -inf) contributes nothing and its out is not read; a row none
// of whose partitions kept a key gets 0 and -inf.
extern "C" __global__ void __launch_bounds__(kMergeThreads)
    FLEXJIT_ENTRY_MERGE(const __grid_constant__ struct FlexCudaDecodeArgs a) {
  const fj_i64 b = blockIdx.y;
  const fj_i64 units = a.pack_gqa ? a.Hkv : a.Hq;
  const struct FjdRows R = fjd_rows(a, blockIdx.x);
  const fj_i64 row_tiles = R.tiles, r0 = R.r0;
  const fj_i64 np = a.num_partitions;
  const fj_i64 slot0 = (b * units * row_tiles + blockIdx.x) * np * BLOCK_M;  // partition 0, row 0
  for (int e = threadIdx.x; e < BLOCK_M * HEAD_DIM_V; e += kMergeThreads) {
    const int row = e / HEAD_DIM_V, col = e % HEAD_DIM_V;
    const fj_i64 pr = r0 + row;
    if (pr >= R.rows) continue;
    float M = FJC_NEG_INF;
    for (fj_i64 q = 0; q < np; ++q) M = fmaxf(M, a.ws_lse[slot0 + q * BLOCK_M + row]);
    float L = 0.0f, acc = 0.0f;
    if (M != FJC_NEG_INF) {
      for (fj_i64 q = 0; q < np; ++q) {
        const float lq = a.ws_lse[slot0 + q * BLOCK_M + row];
        if (lq == FJC_NEG_INF) continue;
        const float f = expf(lq - M);
        L += f;
        acc += f * a.ws_out[(slot0 + q * BLOCK_M + row) * HEAD_DIM_V + col];
      }
    }
    const fj_i64 h = fjd_head(R, pr), qi = fjd_query(R, pr);
    fjd_elem* orow = (fjd_elem*)a.out + b * a.out_strides[0] + h * a.out_strides[1] + qi * a.out_strides[2];
    fjd_store(orow, col, L > 0.0f ? acc / L : 0.0f);
    if (col == 0 && a.lse != nullptr)
      a.lse[b * a.lse_strides[0] + h * a.lse_strides[1] + qi * a.lse_strides[2]] =
          L > 0.0f ? M + logf(L) : FJC_NEG_INF;
  }
}

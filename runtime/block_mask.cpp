#include "runtime/block_mask.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <sstream>

#include "jit/interval.h"
#include "jit/pipeline.h"
#include "runtime/bound_mods.h"

namespace flexjit::runtime {
namespace {

enum : int8_t { kEmpty = 0, kPartial = 1, kFull = 2, kUndecided = -1 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Turns a per-block classification [B*H*QB][KVB] into the index arrays.
void assemble(BlockMask& m, const std::vector<int8_t>& cls) {
  int64_t rows = m.B * m.H * m.num_q_blocks, kvb = m.num_kv_blocks;
  m.kv_num_blocks.assign(rows, 0);
  m.full_kv_num_blocks.assign(rows, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < kvb; ++j) {
      int8_t c = cls[r * kvb + j];
      m.kv_num_blocks[r] += c == kPartial;
      m.full_kv_num_blocks[r] += c == kFull;
    }
  m.kv_stride = std::max<int64_t>(1, *std::max_element(m.kv_num_blocks.begin(), m.kv_num_blocks.end()));
  m.full_kv_stride =
      std::max<int64_t>(1, *std::max_element(m.full_kv_num_blocks.begin(), m.full_kv_num_blocks.end()));
  m.kv_indices.assign(rows * m.kv_stride, 0);
  m.full_kv_indices.assign(rows * m.full_kv_stride, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t np = 0, nf = 0;
    for (int64_t j = 0; j < kvb; ++j) {
      int8_t c = cls[r * kvb + j];
      if (c == kPartial) m.kv_indices[r * m.kv_stride + np++] = int32_t(j);
      if (c == kFull) m.full_kv_indices[r * m.full_kv_stride + nf++] = int32_t(j);
    }
  }
}

void check_sizes(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t qbs, int64_t kvbs) {
  if (B < 1 || H < 1 || Lq < 1 || Lkv < 1)
    throw Error("create_block_mask: B, H, Lq and Lkv must be >= 1 (got B=" + std::to_string(B) +
                " H=" + std::to_string(H) + " Lq=" + std::to_string(Lq) + " Lkv=" + std::to_string(Lkv) + ")");
  if (qbs < 1 || kvbs < 1 || qbs > (1 << 20) || kvbs > (1 << 20))
    throw Error("create_block_mask: block sizes must be in 1..2^20 (got " + std::to_string(qbs) + "x" +
                std::to_string(kvbs) + ")");
  runtime::check_mod_index_range(B, H, Lq, Lkv, "create_block_mask");
  if (ceil_div(Lq, qbs) * ceil_div(Lkv, kvbs) * B * H > (int64_t(1) << 31))
    throw Error("create_block_mask: more than 2^31 blocks; use larger block sizes");
}

}  // namespace

size_t BlockMask::bytes() const {
  return 4 * (kv_num_blocks.size() + kv_indices.size() + full_kv_num_blocks.size() + full_kv_indices.size());
}

int64_t BlockMask::partial_blocks() const {
  int64_t n = 0;
  for (int32_t x : kv_num_blocks) n += x;
  return n;
}

int64_t BlockMask::full_blocks() const {
  int64_t n = 0;
  for (int32_t x : full_kv_num_blocks) n += x;
  return n;
}

double BlockMask::density() const {
  double all = double(B * H * num_q_blocks * num_kv_blocks);
  return all > 0 ? double(partial_blocks() + full_blocks()) / all : 0.0;
}

std::string BlockMask::describe() const {
  std::ostringstream os;
  os << "BlockMask B=" << B << " H=" << H << " Lq=" << Lq << " Lkv=" << Lkv << " blocks=" << q_block_size
     << "x" << kv_block_size << " partial=" << partial_blocks() << " full=" << full_blocks() << " ("
     << int(density() * 1000) / 10.0 << "% visited, " << bytes() << " bytes)";
  return os.str();
}

BlockMask make_geometry(int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t qbs, int64_t kvbs) {
  check_sizes(B, H, Lq, Lkv, qbs, kvbs);
  BlockMask m;
  m.B = B;
  m.H = H;
  m.Lq = Lq;
  m.Lkv = Lkv;
  m.q_block_size = qbs;
  m.kv_block_size = kvbs;
  m.num_q_blocks = ceil_div(Lq, qbs);
  m.num_kv_blocks = ceil_div(Lkv, kvbs);
  return m;
}

FlexBlockMaskArgs kernel_args(const BlockMask& m) {
  FlexBlockMaskArgs a{};
  a.kv_num_blocks = m.kv_num_blocks.data();
  a.kv_indices = m.kv_indices.data();
  a.full_kv_num_blocks = m.full_kv_num_blocks.empty() ? nullptr : m.full_kv_num_blocks.data();
  a.full_kv_indices = m.full_kv_indices.empty() ? nullptr : m.full_kv_indices.data();
  a.B = m.B;
  a.H = m.H;
  a.q_blocks = m.num_q_blocks;
  a.kv_blocks = m.num_kv_blocks;
  a.q_block_size = m.q_block_size;
  a.kv_block_size = m.kv_block_size;
  a.kv_indices_stride = m.kv_stride;
  a.full_kv_indices_stride = m.full_kv_stride;
  return a;
}

BlockMask dense_block_mask(int64_t Lq, int64_t Lkv, int64_t qbs, int64_t kvbs) {
  BlockMask m = make_geometry(1, 1, Lq, Lkv, qbs, kvbs);
  assemble(m, std::vector<int8_t>(m.num_q_blocks * m.num_kv_blocks, kFull));
  return m;
}

namespace {

// The element ranges of one block: [q0, q1) x [kv0, kv1); empty ranges classify as empty.
struct BlockRange {
  int64_t b, h, q0, q1, kv0, kv1;
};

// Classifies every block of m (rows = m.B * m.H * m.num_q_blocks, num_kv_blocks each) whose
// element ranges range_of(row, kv_block) gives, and fills m's index arrays: interval analysis
// first, then the mods kernel's exact classifier for the blocks that analysis left undecided.
template <typename RangeOf>
void classify_into(BlockMask& m, const ModSet& mods, const ModBindings& bind, const BoundMods& bound,
                   RangeOf range_of, BlockMaskBuildStats* stats, std::chrono::steady_clock::time_point t0) {
  const int64_t KVB = m.num_kv_blocks, rows = m.B * m.H * m.num_q_blocks;
  // Pass 1: interval analysis per block, one evaluator per row of blocks (it memoises slices).
  std::vector<ir::BoundBuffer> buffers;
  for (const auto& [n, v] : bind.buffers) buffers.push_back({n, v});
  std::vector<int8_t> cls(rows * KVB);
  tbb::parallel_for(int64_t(0), rows, [&](int64_t r) {
    ir::IntervalEvaluator ev(bind.params, buffers);
    for (int64_t kb = 0; kb < KVB; ++kb) {
      const BlockRange g = range_of(r, kb);
      if (g.q0 >= g.q1 || g.kv0 >= g.kv1) {
        cls[r * KVB + kb] = kEmpty;
        continue;
      }
      ev.set_point(ir::Var::B, g.b);
      ev.set_point(ir::Var::H, g.h);
      ev.set_range(ir::Var::QIdx, g.q0, g.q1 - 1);
      ev.set_range(ir::Var::KvIdx, g.kv0, g.kv1 - 1);
      int d = ev.decide(mods.mask_mod);
      cls[r * KVB + kb] = d == 1 ? kFull : d == 0 ? kEmpty : kUndecided;
    }
  });

  // Pass 2: exact evaluation of the undecided blocks by a compiled classify kernel, over the
  // same element ranges.
  std::vector<int32_t> todo;
  std::vector<long long> todo_ranges;  // fj_i64
  std::vector<int64_t> todo_pos;
  for (int64_t i = 0; i < rows * KVB; ++i) {
    if (cls[i] != kUndecided) continue;
    const BlockRange g = range_of(i / KVB, i % KVB);
    todo.insert(todo.end(), {int32_t(g.b), int32_t(g.h), 0, 0});
    todo_ranges.insert(todo_ranges.end(), {g.q0, g.q1, g.kv0, g.kv1});
    todo_pos.push_back(i);
  }
  std::string classify_cache;
  if (!todo_pos.empty()) {
    jit::KernelSpec spec;
    spec.kind = jit::KernelKind::Mods;  // the same binary flex_attention uses for these mods
    jit::KernelHandle k = jit::get_kernel(spec, mods);
    classify_cache = k.cache;
    FlexModKernels mk{};
    reinterpret_cast<FlexModKernelsFn>(k.fn)(&mk);
    FlexClassifyFn fn = mk.classify;
    std::vector<signed char> out(todo_pos.size());
    FlexClassifyArgs a{};
    a.blocks = todo.data();
    a.out = out.data();
    a.Lq = m.Lq;
    a.Lkv = m.Lkv;
    a.q_block_size = m.q_block_size;
    a.kv_block_size = m.kv_block_size;
    a.ranges = todo_ranges.data();
    a.mod = bound.args();
    const int64_t n = int64_t(out.size());
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 16),
                      [&](const tbb::blocked_range<int64_t>& rg) { fn(&a, rg.begin(), rg.end()); });
    bound.check_error_flag("create_block_mask");
    for (size_t i = 0; i < todo_pos.size(); ++i) cls[todo_pos[i]] = out[i];
  }
  assemble(m, cls);
  if (stats) {
    stats->blocks = rows * KVB;
    stats->evaluated = int64_t(todo_pos.size());
    stats->decided_by_interval = stats->blocks - stats->evaluated;
    stats->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    stats->classify_cache = classify_cache;
  }
}

}  // namespace

BlockMask create_block_mask(const ModSet& mods, const ModBindings& bind, int64_t B, int64_t H, int64_t Lq,
                            int64_t Lkv, int64_t qbs, int64_t kvbs, BlockMaskBuildStats* stats) {
  auto t0 = std::chrono::steady_clock::now();
  if (!mods.mask_mod) throw Error("create_block_mask needs a mask_mod");
  validate(mods);
  check_sizes(B, H, Lq, Lkv, qbs, kvbs);
  BoundMods bound(mods, bind);  // checks every binding up front

  BlockMask m = make_geometry(ir::uses_var(mods.mask_mod, ir::Var::B) ? B : 1,
                              ir::uses_var(mods.mask_mod, ir::Var::H) ? H : 1, Lq, Lkv, qbs, kvbs);
  const int64_t QB = m.num_q_blocks;
  classify_into(
      m, mods, bind, bound,
      [&](int64_t r, int64_t kb) {
        const int64_t qb = r % QB, h = (r / QB) % m.H, b = r / (QB * m.H);
        return BlockRange{b, h, qb * qbs, std::min(Lq, (qb + 1) * qbs), kb * kvbs, std::min(Lkv, (kb + 1) * kvbs)};
      },
      stats, t0);
  return m;
}

BlockMask create_paged_block_mask(const ModSet& mods, const ModBindings& bind, int64_t B, int64_t H, int64_t Lq,
                                  const std::vector<int64_t>& seq_lens, int64_t kvbs, BlockMaskBuildStats* stats) {
  auto t0 = std::chrono::steady_clock::now();
  if (!mods.mask_mod) throw Error("create_block_mask needs a mask_mod");
  validate(mods);
  if (int64_t(seq_lens.size()) != B) internal_error(__FILE__, __LINE__, "one seq_len per sequence");
  const int64_t max_len = std::max<int64_t>(1, *std::max_element(seq_lens.begin(), seq_lens.end()));
  check_sizes(B, H, Lq, max_len, Lq, kvbs);
  BoundMods bound(mods, bind);

  // One q-block per sequence holding its Lq rows at their absolute positions; sequences of
  // different lengths differ even when the mask_mod does not read b.
  const bool same_len = std::all_of(seq_lens.begin(), seq_lens.end(), [&](int64_t l) { return l == seq_lens[0]; });
  const bool per_b = ir::uses_var(mods.mask_mod, ir::Var::B) || !same_len;
  BlockMask m = make_geometry(per_b ? B : 1, ir::uses_var(mods.mask_mod, ir::Var::H) ? H : 1, Lq, max_len, Lq, kvbs);
  classify_into(
      m, mods, bind, bound,
      [&](int64_t r, int64_t kb) {
        const int64_t h = r % m.H, b = r / m.H, len = seq_lens[size_t(b)];
        // len 0: no keys, no queries (a padding slot): every block empty.
        const int64_t q0 = len > 0 ? len - Lq : 0, q1 = len > 0 ? len : 0;
        return BlockRange{b, h, q0, q1, kb * kvbs, std::min(len, (kb + 1) * kvbs)};
      },
      stats, t0);
  return m;
}

void check_block_mask(const BlockMask& m, int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t block_m,
                      int64_t block_n, const std::string& who) {
  // Runs on every call: messages are built only on failure.
  auto fail = [&](const std::string& msg) { throw Error(who + ": " + msg); };
#define CHECK_MASK(cond, msg) \
  do {                        \
    if (!(cond)) fail(msg);   \
  } while (0)
  CHECK_MASK(m.B == 1 || m.B == B, "block_mask has B=" + std::to_string(m.B) + " but q has batch " + std::to_string(B) +
                                    " (use 1 to broadcast)");
  CHECK_MASK(m.H == 1 || m.H == H, "block_mask has H=" + std::to_string(m.H) + " but q has " + std::to_string(H) +
                                    " heads (use 1 to broadcast)");
  // Blocks were classified over [0, m.Lq) x [0, m.Lkv): a mask for shorter lengths is wrong for
  // the extra positions even when its blocks happen to cover them.
  CHECK_MASK(m.Lq >= Lq && m.Lkv >= Lkv && m.num_q_blocks * m.q_block_size >= Lq && m.num_kv_blocks * m.kv_block_size >= Lkv,
          "block_mask was built for Lq=" + std::to_string(m.Lq) + ", Lkv=" + std::to_string(m.Lkv) +
              " but the call has Lq=" + std::to_string(Lq) + ", Lkv=" + std::to_string(Lkv) +
              "; rebuild it for these lengths");
  CHECK_MASK(m.q_block_size % block_m == 0 && m.kv_block_size % block_n == 0,
          "block_mask block size " + std::to_string(m.q_block_size) + "x" + std::to_string(m.kv_block_size) +
              " must be a multiple of the kernel's BLOCK_M x BLOCK_N = " + std::to_string(block_m) + "x" +
              std::to_string(block_n));
  int64_t rows = m.B * m.H * m.num_q_blocks;
  CHECK_MASK(int64_t(m.kv_num_blocks.size()) == rows && int64_t(m.kv_indices.size()) == rows * m.kv_stride,
          "block_mask arrays have inconsistent sizes");
  CHECK_MASK(m.full_kv_num_blocks.empty() ||
              (int64_t(m.full_kv_num_blocks.size()) == rows &&
               int64_t(m.full_kv_indices.size()) == rows * m.full_kv_stride),
          "block_mask full-block arrays have inconsistent sizes");
  // Indices are trusted by the kernel: check them once here so bad input cannot read out of
  // bounds. (Every call runs this over every index: messages are built only on failure.)
  auto check_rows = [&](const std::vector<int32_t>& num, const std::vector<int32_t>& idx, int64_t stride) {
    for (int64_t r = 0; r < rows; ++r) {
      if (num[r] < 0 || num[r] > stride)
        fail("block_mask row " + std::to_string(r) + " lists " + std::to_string(num[r]) +
                           " blocks, more than its width");
      for (int32_t j = 0; j < num[r]; ++j) {
        const int32_t kb = idx[r * stride + j];
        if (kb < 0 || kb >= m.num_kv_blocks) fail("block_mask index " + std::to_string(kb) + " out of range");
      }
    }
  };
  check_rows(m.kv_num_blocks, m.kv_indices, m.kv_stride);
  if (!m.full_kv_num_blocks.empty()) check_rows(m.full_kv_num_blocks, m.full_kv_indices, m.full_kv_stride);
#undef CHECK_MASK
}

}  // namespace flexjit::runtime

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

BlockMask dense_block_mask(int64_t Lq, int64_t Lkv, int64_t qbs, int64_t kvbs) {
  BlockMask m = make_geometry(1, 1, Lq, Lkv, qbs, kvbs);
  assemble(m, std::vector<int8_t>(m.num_q_blocks * m.num_kv_blocks, kFull));
  return m;
}

BlockMask create_block_mask(const ModSet& mods, const ModBindings& bind, int64_t B, int64_t H, int64_t Lq,
                            int64_t Lkv, int64_t qbs, int64_t kvbs, BlockMaskBuildStats* stats) {
  auto t0 = std::chrono::steady_clock::now();
  if (!mods.mask_mod) throw Error("create_block_mask needs a mask_mod");
  validate(mods);
  check_sizes(B, H, Lq, Lkv, qbs, kvbs);
  BoundMods bound(mods, bind);  // checks every binding up front

  BlockMask m = make_geometry(ir::uses_var(mods.mask_mod, ir::Var::B) ? B : 1,
                              ir::uses_var(mods.mask_mod, ir::Var::H) ? H : 1, Lq, Lkv, qbs, kvbs);
  const int64_t QB = m.num_q_blocks, KVB = m.num_kv_blocks, rows = m.B * m.H * QB;

  // Pass 1: interval analysis per block, one evaluator per row of blocks (it memoises slices).
  std::vector<ir::BoundBuffer> buffers;
  for (const auto& [n, v] : bind.buffers) buffers.push_back({n, v});
  std::vector<int8_t> cls(rows * KVB);
  tbb::parallel_for(int64_t(0), rows, [&](int64_t r) {
    int64_t qb = r % QB, h = (r / QB) % m.H, b = r / (QB * m.H);
    ir::IntervalEvaluator ev(bind.params, buffers);
    ev.set_point(ir::Var::B, b);
    ev.set_point(ir::Var::H, h);
    ev.set_range(ir::Var::QIdx, qb * qbs, std::min(Lq, (qb + 1) * qbs) - 1);
    for (int64_t kb = 0; kb < KVB; ++kb) {
      ev.set_range(ir::Var::KvIdx, kb * kvbs, std::min(Lkv, (kb + 1) * kvbs) - 1);
      int d = ev.decide(mods.mask_mod);
      cls[r * KVB + kb] = d == 1 ? kFull : d == 0 ? kEmpty : kUndecided;
    }
  });

  // Pass 2: exact evaluation of the undecided blocks by a compiled classify kernel.
  std::vector<int32_t> todo;
  std::vector<int64_t> todo_pos;
  for (int64_t i = 0; i < rows * KVB; ++i) {
    if (cls[i] != kUndecided) continue;
    int64_t r = i / KVB, kb = i % KVB;
    int64_t qb = r % QB, h = (r / QB) % m.H, b = r / (QB * m.H);
    todo.insert(todo.end(), {int32_t(b), int32_t(h), int32_t(qb), int32_t(kb)});
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
    a.Lq = Lq;
    a.Lkv = Lkv;
    a.q_block_size = qbs;
    a.kv_block_size = kvbs;
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
  return m;
}

}  // namespace flexjit::runtime

// LABELS: numerics emulated
// The CUDA flash-decoding kernels (templates/cuda/flash_decode.cuh: partitions, then the merge)
// run on the CPU under the CUDA emulator (tests/support/cuda_emulator.h) against the float64
// reference, through the real planning (runtime/cuda_decode): KV lengths 1, P-1, P, P+1, 4097
// and 65536 around a partition size P, GQA groups 1, 3, 4 and 8, up to 16 query rows (several
// row tiles), contiguous and paged caches (shuffled page tables, an empty sequence, pages of 16
// and 64), every built-in mod, block masks, fully masked rows, bf16 and fp16, Dv != D, one K/V
// stage and fewer warps where shared memory is short, and bad page indices flagged, not read.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "jit/instantiate.h"
#include "runtime/block_mask.h"
#include "runtime/cuda_decode.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/support/cuda_emulated_kernels.h"
#include "tests/support/cuda_emulator.h"
#include "tests/support/numerics.h"

namespace flexjit {
namespace {

namespace emu = testing::cuda_emulator;
using EntryFn = void (*)(FlexCudaDecodeArgs);

struct Case {
  DType dtype = DType::BF16;
  int D = 128, Dv = 128;
  int B = 1, Hq = 2, Hkv = 2;
  int64_t Lq = 1, Lkv = 64;        // contiguous KV length
  std::vector<int64_t> seq_lens;   // non-empty: a paged cache with these lengths
  int64_t page_size = 16;
  std::string score_mod, mask_mod;
  int64_t mask_block = 0;          // BlockMask KV block (0: none)
  int64_t partition = 256;         // PARTITION_SIZE (0: the cost model)
  int block_n = 0;
  int smem_optin = 0;
  double scale = 0;
  bool bad_page = false;           // one block-table entry out of range: flagged, zero-filled
  bool corrupt_mask = false;       // a BlockMask count and index out of range: flagged, skipped
};

std::string name_of(const Case& c) {
  std::string n = std::string(dtype_name(c.dtype)) + "_D" + std::to_string(c.D);
  if (c.Dv != c.D) n += "_Dv" + std::to_string(c.Dv);
  n += "_B" + std::to_string(c.B) + "_H" + std::to_string(c.Hq) + "x" + std::to_string(c.Hkv) + "_Lq" +
       std::to_string(c.Lq);
  if (c.seq_lens.empty()) {
    n += "_Lkv" + std::to_string(c.Lkv);
  } else {
    n += "_paged" + std::to_string(c.page_size);
    for (int64_t l : c.seq_lens) n += "_" + std::to_string(l);
  }
  auto clean = [](std::string s) {
    std::string o;
    for (char ch : s) o += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
    return o.substr(0, 24);
  };
  if (!c.score_mod.empty()) n += "_s_" + clean(c.score_mod);
  if (!c.mask_mod.empty()) n += "_m_" + clean(c.mask_mod);
  if (c.mask_block) n += "_mb" + std::to_string(c.mask_block);
  n += c.partition ? "_P" + std::to_string(c.partition) : "_Pcost";
  if (c.block_n) n += "_bn" + std::to_string(c.block_n);
  if (c.smem_optin) n += "_smem" + std::to_string(c.smem_optin / 1024) + "k";
  if (c.scale) n += "_scale";
  if (c.bad_page) n += "_badpage";
  if (c.corrupt_mask) n += "_corrupt";
  return n;
}
void PrintTo(const Case& c, std::ostream* os) { *os << name_of(c); }

emu::Range range_of(const OwnedTensor& t) { return {t.bytes->data(), t.bytes->size()}; }

void run_case(const Case& c) {
  SCOPED_TRACE(name_of(c));
  const bool paged = !c.seq_lens.empty();
  const int64_t max_len = paged ? *std::max_element(c.seq_lens.begin(), c.seq_lens.end()) : c.Lkv;
  OwnedTensor q = testing::make_tensor(c.dtype, c.B, c.Hq, c.Lq, c.D, false, 11);
  OwnedTensor k, v, block_table, seq_lens;
  if (paged) {
    // Pages in a shuffled order, plus spare pages nobody owns.
    int64_t pages_needed = 0, max_pages = 1;
    for (int64_t l : c.seq_lens) {
      pages_needed += (l + c.page_size - 1) / c.page_size;
      max_pages = std::max(max_pages, (l + c.page_size - 1) / c.page_size);
    }
    const int64_t num_pages = pages_needed + 3;
    k = testing::make_tensor(c.dtype, num_pages, c.page_size, c.Hkv, c.D, false, 22);
    v = testing::make_tensor(c.dtype, num_pages, c.page_size, c.Hkv, c.Dv, false, 33);
    std::vector<int> order(num_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(7));
    block_table = OwnedTensor::make("block_table", DType::I32, {c.B, max_pages + 1});
    seq_lens = OwnedTensor::make("seq_lens", DType::I32, {c.B});
    int next = 0;
    for (int b = 0; b < c.B; ++b) {
      seq_lens.data<int>()[b] = static_cast<int>(c.seq_lens[b]);
      for (int64_t j = 0; j <= max_pages; ++j)  // columns past a sequence's pages: garbage
        block_table.data<int>()[b * (max_pages + 1) + j] =
            j < (c.seq_lens[b] + c.page_size - 1) / c.page_size ? order[next++] : 1000000 + int(j);
    }
    if (c.bad_page) block_table.data<int>()[0] = static_cast<int>(num_pages) + 5;
  } else {
    k = testing::make_tensor(c.dtype, c.B, c.Hkv, c.Lkv, c.D, false, 22);
    v = testing::make_tensor(c.dtype, c.B, c.Hkv, c.Lkv, c.Dv, false, 33);
  }
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {c.B, c.Hq, c.Lq, c.Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {c.B, c.Hq, c.Lq});
  std::memset(out.bytes->data(), 0x7f, out.bytes->size());
  std::memset(lse.bytes->data(), 0x7f, lse.bytes->size());

  ShapeInfo shape{c.B, c.Hq, c.Hkv, paged ? max_len : c.Lq, max_len};
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  if (!c.score_mod.empty()) sm = testing::resolve_mod(c.score_mod, ModKind::Score, shape, &storage);
  if (!c.mask_mod.empty()) mm = testing::resolve_mod(c.mask_mod, ModKind::Mask, shape, &storage);
  auto [mods, bind] = combine(c.score_mod.empty() ? nullptr : &sm, c.mask_mod.empty() ? nullptr : &mm);

  runtime::BlockMask mask;
  FlexBlockMaskArgs mask_args{};
  const FlexBlockMaskArgs* mp = nullptr;
  if (c.mask_block && mods.has_mask_mod()) {
    mask = paged ? runtime::create_paged_block_mask(mods, bind, c.B, c.Hq, c.Lq, c.seq_lens, c.mask_block)
                 : runtime::create_block_mask(mods, bind, c.B, c.Hq, c.Lq, c.Lkv, 128, c.mask_block);
    mask_args = runtime::kernel_args(mask);
    mp = &mask_args;
  }
  std::vector<int> bad_num, bad_idx;
  if (c.corrupt_mask) {
    const size_t rows = size_t(mask_args.B * mask_args.H * mask_args.q_blocks);
    bad_num.assign(mask_args.kv_num_blocks, mask_args.kv_num_blocks + rows);
    bad_idx.assign(mask_args.kv_indices, mask_args.kv_indices + rows * size_t(mask_args.kv_indices_stride));
    bad_num[0] = int(mask_args.kv_indices_stride) + 7;
    bad_idx[0] = int(mask_args.kv_blocks) + 3;
    mask_args.kv_num_blocks = bad_num.data();
    mask_args.kv_indices = bad_idx.data();
  }
  AttentionOptions opt;
  opt.enable_gqa = c.Hq != c.Hkv;
  opt.partition_size = c.partition;
  opt.block_n = c.block_n;
  if (c.scale) opt.scale = c.scale;
  CudaDeviceInfo dev;
  if (c.smem_optin) dev.max_smem_optin = c.smem_optin;
  CudaDecodeKv kv;
  kv.k = &k.view;
  kv.v = &v.view;
  if (paged) {
    kv.block_table = &block_table.view;
    kv.seq_lens = &seq_lens.view;
    kv.max_seq_len = max_len;
  }
  int error_flag = 0;
  CudaDecodePlan plan = plan_cuda_decode(q.view, kv, out.view, &lse.view, mods, bind, mp, opt, dev, &error_flag);
  std::vector<float> workspace((plan.workspace_bytes + 3) / 4 + 4);
  set_cuda_decode_workspace(plan, plan.workspace_bytes ? workspace.data() : nullptr);

  const auto t0 = std::chrono::steady_clock::now();
  const auto partitions = reinterpret_cast<EntryFn>(testing::emulated_entry(plan.spec, mods));
  const auto merge = reinterpret_cast<EntryFn>(
      testing::emulated_entry(plan.spec, mods, jit::cuda_merge_symbol(jit::plan(plan.spec, mods).symbol)));
  const auto t1 = std::chrono::steady_clock::now();
  emu::Stats stats;
  std::string err = emu::run(testing::emulated_launch(plan.grid, plan.block_threads, plan.smem_bytes,
                                                      {range_of(q), range_of(k), range_of(v)}),
                             [&] { partitions(plan.args); }, &stats);
  ASSERT_EQ(err, "") << "the emulated partition kernel failed";
  // The padded / swizzled shared layouts exist so that ldmatrix never conflicts on banks.
  EXPECT_EQ(stats.ldmatrix_conflicted_phases, 0u) << "of " << stats.ldmatrix_phases << " ldmatrix phases, worst "
                                                  << stats.ldmatrix_worst_ways << "-way: " << plan.describe();
  if (plan.num_partitions > 1) {
    err = emu::run(testing::emulated_launch(plan.merge_grid, plan.merge_threads, 0), [&] { merge(plan.args); });
    ASSERT_EQ(err, "") << "the emulated merge failed";
  }
  const auto t2 = std::chrono::steady_clock::now();
  std::printf("  %s: compile %.0f ms, emulated %llu CTAs in %.0f ms\n", plan.describe().c_str(),
              std::chrono::duration<double, std::milli>(t1 - t0).count(), (unsigned long long)stats.ctas,
              std::chrono::duration<double, std::milli>(t2 - t1).count());
  if (c.bad_page || c.corrupt_mask) {
    EXPECT_EQ(error_flag, 2) << "a page index or block mask entry out of range raises bit 2";
    return;  // the output of the affected rows is undefined (zero-filled keys), nothing crashed
  }
  EXPECT_EQ(error_flag, 0);

  const double scale = c.scale ? c.scale : 1.0 / std::sqrt(double(c.D));
  RefResult gold, base;
  if (paged) {
    gold = reference_paged_attention(q.view, k.view, v.view, block_table.view, seq_lens.view, mods, bind, scale);
    base = reference_paged_attention(q.view, k.view, v.view, block_table.view, seq_lens.view, mods, bind, scale, true);
  } else {
    gold = reference_attention(q.view, k.view, v.view, mods, bind, scale);
    base = reference_attention(q.view, k.view, v.view, mods, bind, scale, true);
  }
  testing::expect_matches_reference(out.view, &lse.view, gold, base, c.dtype);
}

class CudaDecodeEmulated : public ::testing::TestWithParam<Case> {};
TEST_P(CudaDecodeEmulated, MatchesFloat64Reference) { run_case(GetParam()); }

// KV 1, P-1, P, P+1 and 4097 around P = 256; GQA groups 1, 3, 4, 8 (two KV heads).
std::vector<Case> length_cases() {
  std::vector<Case> out;
  for (int g : {1, 3, 4, 8})
    for (int64_t L : {1, 255, 256, 257, 4097}) {
      Case c;
      c.Hkv = 2;
      c.Hq = 2 * g;
      c.Lkv = L;
      out.push_back(c);
    }
  Case big;  // 65536 keys, the cost model's split (an H100's 132 SMs)
  big.Hq = 8;
  big.Hkv = 2;
  big.D = big.Dv = 64;
  big.Lkv = 65536;
  big.partition = 0;
  out.push_back(big);
  return out;
}
INSTANTIATE_TEST_SUITE_P(Lengths, CudaDecodeEmulated, ::testing::ValuesIn(length_cases()),
                         [](const auto& info) { return name_of(info.param); });

// Query rows: a GQA group's rows fill one tile partly, exactly, or spill into more tiles.
std::vector<Case> row_cases() {
  std::vector<Case> out;
  for (auto [g, lq] : {std::pair<int, int64_t>{3, 5}, {3, 7}, {8, 2}, {8, 16}, {1, 16}, {4, 9}}) {
    Case c;
    c.Hkv = 2;
    c.Hq = 2 * g;
    c.Lq = lq;
    c.Lkv = 700;
    c.score_mod = "alibi";
    out.push_back(c);
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Rows, CudaDecodeEmulated, ::testing::ValuesIn(row_cases()),
                         [](const auto& info) { return name_of(info.param); });

// Every registered built-in, alone, with GQA 3, batch 2 and three query rows; bf16 (tensor cores)
// and fp32 (the CUDA-core kernel).
std::vector<Case> builtin_cases() {
  std::vector<Case> out;
  for (const std::string& name : builtin_mod_names())
    for (DType dt : {DType::BF16, DType::F32}) {
    Case c;
    c.dtype = dt;
    c.D = c.Dv = 64;
    c.B = 2;
    c.Hq = 6;
    c.Hkv = 2;
    c.Lq = 3;
    c.Lkv = 700;
    (find_mod(name).kind == ModKind::Score ? c.score_mod : c.mask_mod) = name;
    out.push_back(c);
    }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Builtins, CudaDecodeEmulated, ::testing::ValuesIn(builtin_cases()),
                         [](const auto& info) { return name_of(info.param); });

std::vector<Case> special_cases() {
  std::vector<Case> out;
  Case c;
  c.Hq = 8;
  c.Hkv = 2;
  c.Lq = 2;
  c.Lkv = 1000;
  // Block masks: partial and full blocks, partitions with nothing to read (lse -inf partials).
  for (auto [s, m] : {std::pair<std::string, std::string>{"alibi", "sliding_window"}, {"softcap", "causal"},
                      {"", "document"}, {"rel_pos", "prefix_lm"}}) {
    Case x = c;
    x.score_mod = s;
    x.mask_mod = m;
    x.mask_block = 128;
    out.push_back(x);
    x.mask_block = 64;
    x.block_n = 64;
    out.push_back(x);
  }
  {
    Case x = c;
    x.mask_mod = "sliding_window";
    x.mask_block = 128;
    x.corrupt_mask = true;
    out.push_back(x);
  }
  // Fully masked rows: every row, and every other row.
  {
    Case x = c;
    x.mask_mod = "kv_idx > 100000";
    out.push_back(x);
    x.mask_mod = "q_idx % 2 == 0";
    out.push_back(x);
    x.partition = 0;
    out.push_back(x);
  }
  // One partition (written directly), fp16, Dv != D, a negative scale, other BLOCK_N, and a GPU
  // with 99 KiB of shared memory (one K/V stage, then fewer warps).
  {
    Case x = c;
    x.partition = 1024;
    out.push_back(x);
    x.partition = 256;
    x.dtype = DType::F16;
    x.score_mod = "softcap";
    out.push_back(x);
    x.dtype = DType::BF16;
    x.score_mod = "";
    x.D = 64;
    x.Dv = 128;
    out.push_back(x);
    x.D = 256;
    x.Dv = 256;
    x.scale = -0.2;
    out.push_back(x);
    x.scale = 0;
    x.smem_optin = 99 * 1024;
    out.push_back(x);
    x.D = x.Dv = 128;
    x.block_n = 16;
    out.push_back(x);
    x.block_n = 128;
    x.smem_optin = 0;
    out.push_back(x);
  }
  // fp32 K/V (one key per lane on CUDA cores): lengths around the partition, 16 rows over two
  // tiles, Dv != D, D 256, a block mask, a paged cache, shared memory for one stage.
  {
    Case f;
    f.dtype = DType::F32;
    f.Hq = 8;
    f.Hkv = 2;
    for (int64_t L : {1, 257, 4097}) {
      f.Lkv = L;
      out.push_back(f);
    }
    f.Lkv = 700;
    f.Hq = 6;
    f.Lq = 5;  // 15 rows of GQA 3
    f.score_mod = "alibi";
    out.push_back(f);
    f.Hq = 16;
    f.Lq = 2;  // 16 rows of GQA 8 ... and 32 with Lq 4: two row tiles
    f.Lq = 4;
    out.push_back(f);
    f.Lq = 1;
    f.Hq = 8;
    f.D = 64;
    f.Dv = 128;
    out.push_back(f);
    f.D = f.Dv = 256;
    f.score_mod = "softcap";
    out.push_back(f);
    f.smem_optin = 99 * 1024;
    out.push_back(f);
    f.smem_optin = 0;
    f.D = f.Dv = 128;
    f.score_mod = "";
    f.mask_mod = "sliding_window";
    f.mask_block = 128;
    out.push_back(f);
    f.mask_block = 0;
    f.mask_mod = "q_idx % 2 == 0";  // fully masked rows
    f.Lq = 2;
    out.push_back(f);
    Case pf = f;
    pf.mask_mod = "causal";
    pf.score_mod = "alibi";
    pf.B = 3;
    pf.seq_lens = {1000, 0, 37};
    out.push_back(pf);
  }
  // Paged caches: shuffled pages, an empty sequence, absolute positions (causal), GQA 4, pages of
  // 16 and 64, the user's partitions and the cost model's, a block mask over absolute positions.
  {
    Case p;
    p.B = 3;
    p.Hq = 8;
    p.Hkv = 2;
    p.Lq = 2;
    p.seq_lens = {1000, 0, 37};
    p.score_mod = "alibi";
    p.mask_mod = "causal";
    out.push_back(p);
    p.partition = 0;
    out.push_back(p);
    p.page_size = 64;
    p.seq_lens = {4097, 2, 300};
    out.push_back(p);
    p.mask_mod = "sliding_window";
    p.mask_block = 128;
    out.push_back(p);
    p.mask_block = 0;
    p.mask_mod = "";
    p.dtype = DType::F16;
    p.Lq = 16;
    p.Hq = 2;
    p.seq_lens = {16, 257, 256};
    p.partition = 256;
    out.push_back(p);
    Case bad = p;
    bad.bad_page = true;
    out.push_back(bad);
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Special, CudaDecodeEmulated, ::testing::ValuesIn(special_cases()),
                         [](const auto& info) { return name_of(info.param); });

}  // namespace
}  // namespace flexjit

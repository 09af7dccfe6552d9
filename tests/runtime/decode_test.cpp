// LABELS: numerics
// Flash decoding (templates/cpu/flash_decode.h) against the float64 reference: contiguous KV
// split into partitions around every partition edge (KV 1, P-1, P, P+1, 4097, 20000 for P in
// 64..512), GQA groups 1, 3, 4, 8, Lq 1 and 4, every dtype; paged caches with page sizes 16 and
// 64, shuffled block tables and NaN in every unused page (a stray read shows up as NaN), mixed
// sequence lengths with an empty slot, mods at absolute positions, fully masked rows; the merge
// of attention states; the knobs a call reports.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

#include "runtime/attention.h"
#include "runtime/merge.h"
#include "runtime/reference.h"
#include "runtime/tuning.h"
#include "score_mods/registry.h"
#include "tests/support/cpu_target.h"
#include "tests/support/numerics.h"

namespace flexjit {
namespace {

using testing::make_tensor;

struct DecodeCase {
  DType dtype = DType::F32;
  int D = 64, Dv = 64;
  int64_t Lq = 1, Lkv = 100;
  int B = 1, Hq = 4, Hkv = 1;
  int64_t partition = 0;  // PARTITION_SIZE (0: the planner's choice)
  int block_n = 0;        // BLOCK_N (0: the planner's)
  int page_size = 0;      // 0: contiguous KV; else paged
  std::string score_mod, mask_mod;
  int use_amx = -1;       // AttentionOptions::use_amx (1: the AMX engine, skipped visibly where unavailable)
};

// Skips (visibly) a case that forces the AMX engine on a host without it; else the engine the
// report must name for use_amx 0 / 1 ("" for -1: the runtime's choice).
std::string expected_engine(int use_amx) {
  std::string why;
  if (use_amx == 1 && !amx_available(&why)) return "skip: " + why;
  return use_amx == 1 ? "amx" : use_amx == 0 ? "dot" : "";
}

std::string clean(const std::string& s) {
  std::string o;
  for (char ch : s) o += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  return o.substr(0, 20);
}

std::string name_of(const DecodeCase& c) {
  std::string n = std::string(dtype_name(c.dtype)) + "_D" + std::to_string(c.D);
  if (c.Dv != c.D) n += "_Dv" + std::to_string(c.Dv);
  n += "_Lq" + std::to_string(c.Lq) + "_Lkv" + std::to_string(c.Lkv) + "_B" + std::to_string(c.B) + "_H" +
       std::to_string(c.Hq) + "x" + std::to_string(c.Hkv);
  if (c.partition) n += "_P" + std::to_string(c.partition);
  if (c.block_n) n += "_N" + std::to_string(c.block_n);
  if (c.page_size) n += "_page" + std::to_string(c.page_size);
  if (!c.score_mod.empty()) n += "_s_" + clean(c.score_mod);
  if (!c.mask_mod.empty()) n += "_m_" + clean(c.mask_mod);
  if (c.use_amx >= 0) n += "_amx" + std::to_string(c.use_amx);
  return n;
}

// ---- contiguous KV ----

void run_contiguous(const DecodeCase& c) {
  SCOPED_TRACE(name_of(c));
  const std::string engine = expected_engine(c.use_amx);
  if (engine.rfind("skip", 0) == 0) GTEST_SKIP() << "AMX decode engine not testable here: " << engine;
  OwnedTensor q = make_tensor(c.dtype, c.B, c.Hq, c.Lq, c.D, false, 11);
  OwnedTensor k = make_tensor(c.dtype, c.B, c.Hkv, c.Lkv, c.D, false, 22);
  OwnedTensor v = make_tensor(c.dtype, c.B, c.Hkv, c.Lkv, c.Dv, false, 33);
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {c.B, c.Hq, c.Lq, c.Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {c.B, c.Hq, c.Lq});
  std::memset(out.bytes->data(), 0x7f, out.bytes->size());  // every element must be written
  ShapeInfo shape{c.B, c.Hq, c.Hkv, c.Lq, c.Lkv};
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  if (!c.score_mod.empty()) sm = testing::resolve_mod(c.score_mod, ModKind::Score, shape, &storage);
  if (!c.mask_mod.empty()) mm = testing::resolve_mod(c.mask_mod, ModKind::Mask, shape, &storage);
  auto [mods, bind] = combine(c.score_mod.empty() ? nullptr : &sm, c.mask_mod.empty() ? nullptr : &mm);
  AttentionOptions opt;
  opt.enable_gqa = c.Hq != c.Hkv;
  opt.partition_size = c.partition;
  opt.block_n = c.block_n;
  opt.use_amx = c.use_amx;
  AttentionReport rep;
  flex_attention(q.view, k.view, v.view, out.view, &lse.view, mods, bind, nullptr, opt, &rep);
  EXPECT_EQ(rep.path, "decode");
  if (!engine.empty()) EXPECT_EQ(rep.engine, engine);
  if (c.partition) {
    EXPECT_EQ(rep.partition_size, c.Lkv > c.partition ? c.partition : (c.Lkv + rep.block_n - 1) / rep.block_n * rep.block_n);
    EXPECT_EQ(rep.num_partitions, (c.Lkv + rep.partition_size - 1) / rep.partition_size);
    EXPECT_EQ(rep.tuning, "user");
  }
  const double scale = 1.0 / std::sqrt(double(c.D));
  RefResult gold = reference_attention(q.view, k.view, v.view, mods, bind, scale);
  RefResult base = reference_attention(q.view, k.view, v.view, mods, bind, scale, /*fp32=*/true);
  testing::expect_matches_reference(out.view, &lse.view, gold, base, c.dtype);
}

class Contiguous : public ::testing::TestWithParam<DecodeCase> {};
TEST_P(Contiguous, MatchesFloat64Reference) { run_contiguous(GetParam()); }

// Every partition edge for every P, with the GQA group, Lq and dtype cycling so each group meets
// both Lq values and all three dtypes somewhere.
std::vector<DecodeCase> partition_cases() {
  std::vector<DecodeCase> out;
  const int groups[] = {1, 3, 4, 8};
  const DType dtypes[] = {DType::F32, DType::BF16, DType::F16};
  int i = 0;
  for (int64_t P : {64, 128, 256, 512})
    for (int64_t L : {int64_t(1), P - 1, P, P + 1, int64_t(4097), int64_t(20000)}) {
      DecodeCase c;
      c.partition = P;
      c.block_n = 64;
      c.Lkv = L;
      c.Hkv = 2;
      c.Hq = 2 * groups[i % 4];
      c.Lq = (i / 4) % 2 ? 4 : 1;
      c.dtype = dtypes[i % 3];
      c.D = c.Dv = i % 5 == 0 ? 80 : 64;  // D not a power of two too
      ++i;
      out.push_back(c);
    }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Partitions, Contiguous, ::testing::ValuesIn(partition_cases()),
                         [](const auto& info) { return name_of(info.param); });

// Mods across partitions: every built-in (score and mask), a buffer mod, fully masked rows,
// mask blocks that straddle partitions, Dv != D, D 256, and the planner's own knobs.
std::vector<DecodeCase> mod_cases() {
  std::vector<DecodeCase> out;
  DecodeCase c;
  c.B = 2;
  c.Hq = 6;
  c.Hkv = 2;
  c.Lkv = 1500;
  c.partition = 256;
  c.block_n = 64;
  for (const std::string& name : builtin_mod_names()) {
    for (int64_t lq : {1, 4}) {
      DecodeCase x = c;
      x.Lq = lq;
      (find_mod(name).kind == ModKind::Score ? x.score_mod : x.mask_mod) = name;
      out.push_back(x);
    }
  }
  DecodeCase x = c;
  x.Lq = 4;
  x.mask_mod = "q_idx % 2 == 1";  // rows 0 and 2 of every head are fully masked
  out.push_back(x);
  x.mask_mod = "kv_idx >= 300 && kv_idx < 700";  // partitions wholly masked next to kept ones
  x.score_mod = "alibi";
  out.push_back(x);
  x.mask_mod = "h % 3 == 0 || kv_idx < 200";  // differs by head: one head per item
  x.score_mod = "";
  out.push_back(x);
  x.mask_mod = "sliding_window";
  x.score_mod = "softcap";
  x.dtype = DType::BF16;
  out.push_back(x);
  x = c;
  x.Dv = 48;
  x.D = 256;
  out.push_back(x);
  x = c;
  x.partition = 0;
  x.block_n = 0;
  x.Lkv = 9000;
  x.B = 1;
  x.Hkv = 1;
  x.Hq = 8;  // MQA-like: the planner splits to use the threads
  out.push_back(x);
  x.Lq = 16;
  x.Hq = 8;  // 128 rows: two row blocks
  out.push_back(x);
  return out;
}
INSTANTIATE_TEST_SUITE_P(Mods, Contiguous, ::testing::ValuesIn(mod_cases()),
                         [](const auto& info) { return name_of(info.param); });

// The AMX engine (use_amx 1; skipped visibly on hosts without AMX) on the shapes that reach its
// fallbacks and padding: bf16 and fp16 (split into hi + lo halves); D a multiple of 32 (K read
// in place), D 80 / odd D 33 (K packed; odd Dv leaves half-empty V pairs), Dv != D, D 256; row
// counts 1 (one 16-row tile mostly padding), 3 x 5 = 15, 8, 4 x 16 = 64 (two query tile pairs)
// and 8 x 16 = 128 (two row blocks); KV 1, 17, 97, 129, 4097 and each side of a partition;
// BLOCK_N 32 and 256; every built-in mod with GQA; fully masked rows and wholly masked
// partitions. The same cases on the dot engine (use_amx 0) are the control.
std::vector<DecodeCase> amx_cases() {
  std::vector<DecodeCase> out;
  int i = 0;
  for (int amx : {1, 0})
    for (DType dt : {DType::BF16, DType::F16}) {
      struct Shape {
        int D, Dv, Hq, Hkv;
        int64_t Lq, Lkv, partition;
        int block_n;
      };
      for (Shape sh : {Shape{128, 128, 8, 1, 1, 4097, 0, 0}, Shape{64, 64, 6, 2, 5, 129, 64, 32},
                       Shape{80, 48, 8, 1, 1, 97, 0, 0}, Shape{33, 17, 3, 1, 5, 17, 0, 0},
                       Shape{256, 256, 4, 4, 1, 1, 0, 0}, Shape{64, 64, 4, 1, 16, 1000, 256, 256},
                       Shape{128, 128, 8, 1, 16, 300, 128, 64}, Shape{64, 64, 8, 1, 2, 127, 128, 0},
                       Shape{64, 64, 8, 1, 2, 128, 128, 0}, Shape{64, 64, 8, 1, 2, 129, 128, 0}}) {
        DecodeCase c;
        c.dtype = dt;
        c.use_amx = amx;
        c.D = sh.D;
        c.Dv = sh.Dv;
        c.Hq = sh.Hq;
        c.Hkv = sh.Hkv;
        c.Lq = sh.Lq;
        c.Lkv = sh.Lkv;
        c.partition = sh.partition;
        c.block_n = sh.block_n;
        c.B = i++ % 3 == 0 ? 2 : 1;
        out.push_back(c);
      }
      // Mods (every built-in, a buffer mod among them), fully masked rows, masked partitions.
      DecodeCase m;
      m.dtype = dt;
      m.use_amx = amx;
      m.B = 2;
      m.Hq = 8;
      m.Hkv = 2;
      m.Lq = 3;
      m.Lkv = 1500;
      m.partition = 256;
      for (const std::string& name : builtin_mod_names()) {
        DecodeCase x = m;
        (find_mod(name).kind == ModKind::Score ? x.score_mod : x.mask_mod) = name;
        out.push_back(x);
      }
      DecodeCase x = m;
      x.mask_mod = "q_idx % 2 == 1";  // rows 0 and 2 of every head fully masked
      out.push_back(x);
      x.mask_mod = "kv_idx >= 300 && kv_idx < 700";  // wholly masked partitions
      x.score_mod = "softcap";
      out.push_back(x);
    }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Amx, Contiguous, ::testing::ValuesIn(amx_cases()),
                         [](const auto& info) { return name_of(info.param); });

// ---- paged KV ----

// A paged cache holding B sequences of lengths `lens`: random keys in pages of a shuffled order;
// the pages no sequence uses, the slots past each sequence's end and the unused table entries
// hold NaN / -7, so a read of any of them shows up in the output.
struct PagedKv {
  OwnedTensor k_cache, v_cache, block_table, seq_lens;
  int64_t max_len = 1;
};
PagedKv make_paged(DType dt, const std::vector<int64_t>& lens, int64_t Hkv, int64_t D, int64_t Dv, int64_t ps,
                   uint64_t seed) {
  const int64_t B = int64_t(lens.size());
  PagedKv p;
  p.max_len = std::max<int64_t>(1, *std::max_element(lens.begin(), lens.end()));
  const int64_t max_pages = (p.max_len + ps - 1) / ps + 1;  // one spare column: never read
  int64_t used = 0;
  for (int64_t l : lens) used += (l + ps - 1) / ps;
  const int64_t pages = used + 5;  // unused pages
  p.k_cache = OwnedTensor::make("k_cache", dt, {pages, ps, Hkv, D});
  p.v_cache = OwnedTensor::make("v_cache", dt, {pages, ps, Hkv, Dv});
  OwnedTensor rk = make_tensor(dt, 1, 1, pages * ps * Hkv, D, false, seed);
  OwnedTensor rv = make_tensor(dt, 1, 1, pages * ps * Hkv, Dv, false, seed + 1);
  for (auto* t : {&p.k_cache, &p.v_cache})
    for (int64_t i = 0; i < t->view.numel(); ++i) write_element_f64(t->view, i, std::nan(""));
  p.block_table = OwnedTensor::make("block_table", DType::I32, {B, max_pages});
  p.seq_lens = OwnedTensor::make("seq_lens", DType::I32, {B});
  std::vector<int32_t> order(static_cast<size_t>(pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(unsigned(seed)));
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[size_t(b)];
    p.seq_lens.data<int32_t>()[b] = int32_t(len);
    for (int64_t j = 0; j < max_pages; ++j) p.block_table.data<int32_t>()[b * max_pages + j] = -7;  // unused
    for (int64_t j = 0; j < (len + ps - 1) / ps; ++j) p.block_table.data<int32_t>()[b * max_pages + j] = order[size_t(next++)];
    for (int64_t n = 0; n < len; ++n) {  // slots past the end stay NaN
      const int64_t page = p.block_table.data<int32_t>()[b * max_pages + n / ps], slot = n % ps;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t row = (page * ps + slot) * Hkv + h;
        for (int64_t d = 0; d < D; ++d) write_element_f64(p.k_cache.view, row * D + d, read_element_f64(rk.view, row * D + d));
        for (int64_t d = 0; d < Dv; ++d) write_element_f64(p.v_cache.view, row * Dv + d, read_element_f64(rv.view, row * Dv + d));
      }
    }
  }
  return p;
}

struct PagedCase {
  DType dtype = DType::F32;
  int D = 64, Dv = 64;
  int64_t Lq = 1;
  std::vector<int64_t> lens = {300, 77, 0};
  int Hq = 6, Hkv = 2;
  int page_size = 16;
  int64_t partition = 0;
  int block_n = 0;
  std::string score_mod, mask_mod;
  int use_amx = -1;
};

std::string paged_name(const PagedCase& c) {
  std::string n = std::string(dtype_name(c.dtype)) + "_D" + std::to_string(c.D) + "_Lq" + std::to_string(c.Lq) +
                  "_H" + std::to_string(c.Hq) + "x" + std::to_string(c.Hkv) + "_page" + std::to_string(c.page_size);
  for (int64_t l : c.lens) n += "_" + std::to_string(l);
  if (c.partition) n += "_P" + std::to_string(c.partition);
  if (c.block_n) n += "_N" + std::to_string(c.block_n);
  if (!c.score_mod.empty()) n += "_s_" + clean(c.score_mod);
  if (!c.mask_mod.empty()) n += "_m_" + clean(c.mask_mod);
  if (c.use_amx >= 0) n += "_amx" + std::to_string(c.use_amx);
  return n;
}

void run_paged(const PagedCase& c) {
  SCOPED_TRACE(paged_name(c));
  const std::string engine = expected_engine(c.use_amx);
  if (engine.rfind("skip", 0) == 0) GTEST_SKIP() << "AMX decode engine not testable here: " << engine;
  const int64_t B = int64_t(c.lens.size());
  PagedKv kv = make_paged(c.dtype, c.lens, c.Hkv, c.D, c.Dv, c.page_size, 5);
  OwnedTensor q = make_tensor(c.dtype, B, c.Hq, c.Lq, c.D, false, 7);
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {B, c.Hq, c.Lq, c.Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {B, c.Hq, c.Lq});
  std::memset(out.bytes->data(), 0x7f, out.bytes->size());
  ShapeInfo shape{B, c.Hq, c.Hkv, kv.max_len, kv.max_len};  // buffers indexed by absolute positions
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  if (!c.score_mod.empty()) sm = testing::resolve_mod(c.score_mod, ModKind::Score, shape, &storage);
  if (!c.mask_mod.empty()) mm = testing::resolve_mod(c.mask_mod, ModKind::Mask, shape, &storage);
  auto [mods, bind] = combine(c.score_mod.empty() ? nullptr : &sm, c.mask_mod.empty() ? nullptr : &mm);
  AttentionOptions opt;
  opt.enable_gqa = c.Hq != c.Hkv;
  opt.partition_size = c.partition;
  opt.block_n = c.block_n;
  opt.use_amx = c.use_amx;
  AttentionReport rep;
  paged_flex_attention(q.view, kv.k_cache.view, kv.v_cache.view, kv.block_table.view, kv.seq_lens.view, out.view,
                       &lse.view, mods, bind, opt, &rep);
  EXPECT_EQ(rep.path, "decode");
  if (!engine.empty()) EXPECT_EQ(rep.engine, engine);
  EXPECT_TRUE(rep.paged);
  EXPECT_EQ(rep.partition_size % c.page_size, 0);
  const double scale = 1.0 / std::sqrt(double(c.D));
  RefResult gold = reference_paged_attention(q.view, kv.k_cache.view, kv.v_cache.view, kv.block_table.view,
                                             kv.seq_lens.view, mods, bind, scale);
  RefResult base = reference_paged_attention(q.view, kv.k_cache.view, kv.v_cache.view, kv.block_table.view,
                                             kv.seq_lens.view, mods, bind, scale, /*fp32=*/true);
  testing::expect_matches_reference(out.view, &lse.view, gold, base, c.dtype);
}

class Paged : public ::testing::TestWithParam<PagedCase> {};
TEST_P(Paged, MatchesFloat64Reference) { run_paged(GetParam()); }

std::vector<PagedCase> paged_cases() {
  std::vector<PagedCase> out;
  int i = 0;
  for (int ps : {16, 64})
    for (int64_t lq : {1, 4})
      for (int group : {1, 3, 4, 8}) {
        PagedCase c;
        c.page_size = ps;
        c.Lq = lq;
        c.Hkv = 2;
        c.Hq = 2 * group;
        c.lens = {ps * 9 + 5, lq, 0, 2 * ps};  // a partial last page, a sequence of Lq keys, an empty slot
        c.partition = ps == 16 ? 64 : 128;
        c.block_n = i % 2 ? 32 : 0;
        c.dtype = i % 3 == 0 ? DType::BF16 : i % 3 == 1 ? DType::F32 : DType::F16;
        ++i;
        out.push_back(c);
      }
  // Mods at absolute positions: causal (a decode query sees every key), sliding window, ALiBi,
  // softcap, a buffer read by kv_idx and q_idx (document), fully masked rows, per-head masks.
  PagedCase m;
  m.Lq = 4;
  m.lens = {700, 350, 4};
  m.partition = 128;
  for (auto [s, k] : {std::pair<std::string, std::string>{"alibi", "causal"}, {"softcap", "sliding_window"},
                      {"rel_pos", "document"}, {"", "q_idx % 2 == 0 && kv_idx <= q_idx"},
                      {"alibi", "h == 1 || kv_idx < 100"}, {"", "key_padding"}}) {
    PagedCase x = m;
    x.score_mod = s;
    x.mask_mod = k;
    out.push_back(x);
  }
  // More heads than one item holds: 20 KV heads (MHA, one row each) in items of 16 and 4 units;
  // and 12 KV heads with 4-row groups (16 rows: items of 8 units), split into partitions.
  PagedCase u;
  u.Hq = u.Hkv = 20;
  u.lens = {300, 129};
  u.partition = 64;
  u.mask_mod = "sliding_window";
  out.push_back(u);
  u.Hq = 48;
  u.Hkv = 12;
  u.Lq = 4;
  u.mask_mod = "";
  u.score_mod = "alibi";
  u.dtype = DType::BF16;
  out.push_back(u);
  // Long sequences, the planner's own knobs, D 128.
  PagedCase l;
  l.D = l.Dv = 128;
  l.Hq = 8;
  l.Hkv = 2;
  l.lens = {4097, 2500};
  l.page_size = 64;
  l.dtype = DType::BF16;
  out.push_back(l);
  return out;
}
INSTANTIATE_TEST_SUITE_P(Pages, Paged, ::testing::ValuesIn(paged_cases()),
                         [](const auto& info) { return paged_name(info.param); });

// The AMX engine on paged caches: pages of 16 and 64 keys (K tiles read in place, 16 keys per
// tile), of 8 and 1 (K packed through the row pointers), shuffled; items of several head units
// (MHA: 16-row units of one row, 8 units per item); mods at absolute positions; bf16 and fp16.
std::vector<PagedCase> amx_paged_cases() {
  std::vector<PagedCase> out;
  int i = 0;
  for (int amx : {1, 0})
    for (int ps : {16, 64, 8, 1}) {
      PagedCase c;
      c.use_amx = amx;
      c.page_size = ps;
      c.Lq = i % 2 ? 4 : 1;
      c.Hkv = 2;
      c.Hq = 16;
      c.lens = {ps * 9 + 5, c.Lq, 0, 2 * ps + 40};
      c.partition = ps == 64 ? 128 : 64;
      c.dtype = i % 4 == 1 ? DType::F16 : DType::BF16;  // fp16 always packs K: bf16 reaches the in-place tiles
      c.D = c.Dv = i % 4 < 2 ? 128 : 64;
      ++i;
      out.push_back(c);
    }
  for (int amx : {1, 0}) {
    PagedCase m;
    m.use_amx = amx;
    m.dtype = DType::BF16;
    m.Lq = 4;
    m.Hq = 12;
    m.Hkv = 3;
    m.lens = {700, 350, 4};
    m.partition = 128;
    for (auto [sm, mm] : {std::pair<std::string, std::string>{"alibi", "causal"}, {"softcap", "sliding_window"},
                          {"rel_pos", "document"}, {"", "q_idx % 2 == 0 && kv_idx <= q_idx"}}) {
      PagedCase x = m;
      x.score_mod = sm;
      x.mask_mod = mm;
      out.push_back(x);
    }
    PagedCase u;  // MHA, 20 KV heads: items of 8 one-row units (AMX) or 16 (dot)
    u.use_amx = amx;
    u.dtype = DType::F16;
    u.Hq = u.Hkv = 20;
    u.lens = {300, 129};
    u.partition = 64;
    out.push_back(u);
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Amx, Paged, ::testing::ValuesIn(amx_paged_cases()),
                         [](const auto& info) { return paged_name(info.param); });

// Bad tables and knobs are clear errors, never reads out of bounds.
TEST(PagedErrors, SayWhatIsWrong) {
  PagedCase c;
  PagedKv kv = make_paged(DType::F32, {40, 20}, 2, 32, 32, 16, 3);
  OwnedTensor q = make_tensor(DType::F32, 2, 2, 1, 32, false, 1);
  OwnedTensor out = OwnedTensor::make("out", DType::F32, {2, 2, 1, 32});
  auto [mods, bind] = combine(nullptr, nullptr);
  auto error_of = [&](const AttentionOptions& opt, const TensorView& qv, const TensorView& o) {
    try {
      paged_flex_attention(qv, kv.k_cache.view, kv.v_cache.view, kv.block_table.view, kv.seq_lens.view, o, nullptr,
                           mods, bind, opt);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  AttentionOptions opt;
  EXPECT_EQ(error_of(opt, q.view, out.view), "no error");
  int32_t* table = kv.block_table.data<int32_t>();
  const int32_t saved = table[1];
  table[1] = 9999;
  EXPECT_NE(error_of(opt, q.view, out.view).find("block_table[0, 1] = 9999 is not a page"), std::string::npos);
  table[1] = -1;
  EXPECT_NE(error_of(opt, q.view, out.view).find("is not a page"), std::string::npos);
  table[1] = saved;
  kv.seq_lens.data<int32_t>()[1] = 1000;
  EXPECT_NE(error_of(opt, q.view, out.view).find("needs 63 pages but block_table has"), std::string::npos);
  kv.seq_lens.data<int32_t>()[1] = 20;
  opt.partition_size = 40;
  EXPECT_NE(error_of(opt, q.view, out.view).find("multiple of the page size 16"), std::string::npos);
  opt.partition_size = 0;
  opt.force_prefill = true;
  EXPECT_NE(error_of(opt, q.view, out.view).find("FORCE_USE_FLEX_ATTENTION"), std::string::npos);
  opt.force_prefill = false;
  OwnedTensor q17 = make_tensor(DType::F32, 2, 2, 17, 32, false, 1);
  OwnedTensor out17 = OwnedTensor::make("out", DType::F32, {2, 2, 17, 32});
  EXPECT_NE(error_of(opt, q17.view, out17.view).find("up to 16 query rows"), std::string::npos);
  OwnedTensor q4 = make_tensor(DType::F32, 2, 2, 4, 32, false, 1);
  OwnedTensor out4 = OwnedTensor::make("out", DType::F32, {2, 2, 4, 32});
  kv.seq_lens.data<int32_t>()[1] = 3;
  EXPECT_NE(error_of(opt, q4.view, out4.view).find("seq_lens[1] = 3 is less than the query length"),
            std::string::npos);
}

// ---- merging attention states ----

// Two halves of the keys, each with its LSE, merge into the whole; a half that kept nothing
// (lse -inf) contributes nothing even when its out holds NaN.
TEST(Merge, TwoHalvesMakeTheWhole) {
  const int64_t B = 2, H = 3, L = 5, D = 40, Lkv = 300;
  OwnedTensor q = make_tensor(DType::F32, B, H, L, D, false, 1);
  OwnedTensor k = make_tensor(DType::F32, B, H, Lkv, D, false, 2);
  OwnedTensor v = make_tensor(DType::F32, B, H, Lkv, D, false, 3);
  TracedMod mask = parse_mod("q_idx != 3 && (q_idx != 4 || kv_idx >= 200)", ModKind::Mask, {}, {});
  auto [mods, bind] = combine(nullptr, &mask);
  auto run = [&](const TensorView& kk, const TensorView& vv, OwnedTensor* out, OwnedTensor* lse) {
    *out = OwnedTensor::make("o", DType::F32, {B, H, L, D});
    *lse = OwnedTensor::make("l", DType::F32, {B, H, L});
    flex_attention(q.view, kk, vv, out->view, &lse->view, mods, bind, nullptr, {});
  };
  auto half = [](const TensorView& t, int64_t begin, int64_t end) {
    TensorView h = t;
    h.data = static_cast<float*>(t.data) + begin * t.strides[2];
    h.sizes[2] = end - begin;
    return h;
  };
  OwnedTensor oa, la, ob, lb, of, lf;
  run(half(k.view, 0, 200), half(v.view, 0, 200), &oa, &la);  // row 4 keeps nothing here
  run(k.view, v.view, &of, &lf);
  // The second half with absolute kv_idx: shift the mask by 200.
  TracedMod shifted = parse_mod("q_idx != 3 && (q_idx != 4 || kv_idx + 200 >= 200)", ModKind::Mask, {}, {});
  auto [mods2, bind2] = combine(nullptr, &shifted);
  ob = OwnedTensor::make("o", DType::F32, {B, H, L, D});
  lb = OwnedTensor::make("l", DType::F32, {B, H, L});
  flex_attention(q.view, half(k.view, 200, Lkv), half(v.view, 200, Lkv), ob.view, &lb.view, mods2, bind2, nullptr,
                 {});
  // Poison the out of states that kept nothing: the merge must not read them.
  for (int64_t r = 0; r < B * H * L; ++r)
    if (std::isinf(la.data<float>()[r]))
      for (int64_t d = 0; d < D; ++d) oa.data<float>()[r * D + d] = std::nanf("");
  OwnedTensor om = OwnedTensor::make("o", DType::F32, {B, H, L, D}), lm = OwnedTensor::make("l", DType::F32, {B, H, L});
  merge_attention_states(oa.view, la.view, ob.view, lb.view, om.view, lm.view);
  for (int64_t i = 0; i < B * H * L * D; ++i) ASSERT_NEAR(om.data<float>()[i], of.data<float>()[i], 2e-6) << i;
  for (int64_t r = 0; r < B * H * L; ++r) {
    const float want = lf.data<float>()[r], got = lm.data<float>()[r];
    if (std::isinf(want))
      EXPECT_TRUE(std::isinf(got) && got < 0) << r;
    else
      EXPECT_NEAR(got, want, 2e-5) << r;
  }
  // Merging in place into the first state gives the same.
  merge_attention_states(oa.view, la.view, ob.view, lb.view, oa.view, la.view);
  for (int64_t i = 0; i < B * H * L * D; ++i) ASSERT_EQ(oa.data<float>()[i], om.data<float>()[i]) << i;
  // Shape errors name the tensor.
  OwnedTensor bad = OwnedTensor::make("l", DType::F32, {B, H, L + 1});
  try {
    merge_attention_states(oa.view, bad.view, ob.view, lb.view, om.view, lm.view);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lse_a must be fp32 [2, 3, 5]"), std::string::npos) << e.what();
  }
}

// ---- knobs and dispatch ----

TEST(Dispatch, PathAndKnobSources) {
  OwnedTensor q = make_tensor(DType::F32, 1, 4, 1, 32, false, 1);
  OwnedTensor kv = make_tensor(DType::F32, 1, 1, 3000, 32, false, 2);
  OwnedTensor out = OwnedTensor::make("o", DType::F32, {1, 4, 1, 32});
  auto [mods, bind] = combine(nullptr, nullptr);
  auto call = [&](AttentionOptions opt) {
    opt.enable_gqa = true;
    AttentionReport rep;
    flex_attention(q.view, kv.view, kv.view, out.view, nullptr, mods, bind, nullptr, opt, &rep);
    return rep;
  };
  AttentionOptions opt;
  opt.num_threads = 4;  // one unit (B = 1, one KV head) on 4 threads: the cost model splits
  AttentionReport r = call(opt);
  EXPECT_EQ(r.path, "decode");
  EXPECT_TRUE(r.pack_gqa);
  EXPECT_EQ(r.block_m, 4);  // the group's 4 heads x 1 query
  EXPECT_EQ(r.tuning, "default");
  EXPECT_GE(r.num_partitions, 4);
  opt.partition_size = 1024;
  r = call(opt);
  EXPECT_EQ(r.tuning, "user");
  EXPECT_EQ(r.partition_size, 1024);
  EXPECT_EQ(r.num_partitions, 3);
  opt.partition_size = 0;
  opt.force_prefill = true;
  EXPECT_EQ(call(opt).path, "prefill");
  opt.force_prefill = false;
  opt.block_n = 40;
  try {
    call(opt);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("BLOCK_N a multiple of 16"), std::string::npos) << e.what();
  }
}

// The cost model: no split where units already fill the threads, a split into partitions of at
// least 256 keys where they do not (up to 4 items per thread while partitions keep 1024 keys),
// every partition a multiple of BLOCK_N and the page size.
// The decode engine: AMX tiles for bf16 from 8 query rows per KV head (4 on a paged cache), fp16
// from 16, where the host has AMX, else the dot engine; USE_AMX 0 / 1 refuses / requires it, with
// the reason when it cannot run (dtype, host, BLOCK_N, scratch); fp32 never uses it.
TEST(Dispatch, DecodeEngineChoice) {
  std::string no_amx;
  const bool amx = amx_available(&no_amx);
  auto engine = [](DType dt, int hq, int lq, bool paged, int use_amx, int block_n = 0, int D = 64,
                   int block_m = 0) -> std::string {
    const int hkv = 2;
    OwnedTensor q = make_tensor(dt, 1, hq, lq, D, false, 1);
    OwnedTensor out = OwnedTensor::make("o", dt, {1, hq, lq, D});
    auto [mods, bind] = combine(nullptr, nullptr);
    AttentionOptions opt;
    opt.enable_gqa = true;
    opt.use_amx = use_amx;
    opt.block_n = block_n;
    opt.block_m = block_m;
    AttentionReport rep;
    try {
      if (paged) {
        PagedKv kv = make_paged(dt, {600}, hkv, D, D, 16, 3);
        paged_flex_attention(q.view, kv.k_cache.view, kv.v_cache.view, kv.block_table.view, kv.seq_lens.view,
                             out.view, nullptr, mods, bind, opt, &rep);
      } else {
        OwnedTensor kv = make_tensor(dt, 1, hkv, 600, D, false, 2);
        flex_attention(q.view, kv.view, kv.view, out.view, nullptr, mods, bind, nullptr, opt, &rep);
      }
    } catch (const Error& e) {
      return std::string("error: ") + e.what();
    }
    EXPECT_EQ(rep.path, "decode");
    return rep.engine;
  };
  const std::string tiles = amx ? "amx" : "dot";
  EXPECT_EQ(engine(DType::BF16, 8, 1, false, -1), "dot");   // 4 rows per KV head, contiguous
  EXPECT_EQ(engine(DType::BF16, 16, 1, false, -1), tiles);  // 8 rows
  EXPECT_EQ(engine(DType::F16, 8, 4, false, -1), tiles);    // fp16: 4 x 4 rows
  EXPECT_EQ(engine(DType::F16, 8, 2, true, -1), "dot");     // fp16: 8 rows, paged
  EXPECT_EQ(engine(DType::BF16, 8, 1, true, -1), tiles);    // 4 rows, paged
  EXPECT_EQ(engine(DType::BF16, 4, 1, true, -1), "dot");    // 2 rows, paged
  EXPECT_EQ(engine(DType::F32, 16, 4, false, -1), "dot");
  EXPECT_EQ(engine(DType::BF16, 16, 1, false, 0), "dot");
  EXPECT_EQ(engine(DType::BF16, 16, 1, false, -1, 48), "dot");  // BLOCK_N 48: not for the tiles
  EXPECT_NE(engine(DType::F32, 2, 1, false, 1).find("USE_AMX=1 needs bf16 or fp16 inputs"), std::string::npos);
  if (!amx) {
    EXPECT_NE(engine(DType::BF16, 2, 1, true, 1).find("USE_AMX=1 but " + no_amx), std::string::npos);
    return;
  }
  EXPECT_EQ(engine(DType::BF16, 2, 1, false, 1), "amx");  // one row, forced
  EXPECT_EQ(engine(DType::F16, 2, 1, true, 1), "amx");
  EXPECT_NE(engine(DType::BF16, 16, 1, false, 1, 48).find("USE_AMX=1 but the AMX decode engine needs BLOCK_N a multiple "
                                                          "of 32, got 48"),
            std::string::npos);
  const std::string big = engine(DType::F16, 16, 16, false, 1, 512, 256, 128);  // 128 rows, D 256, BLOCK_N 512
  EXPECT_NE(big.find("exceeds 1 MiB"), std::string::npos) << big;
  EXPECT_EQ(engine(DType::F16, 16, 16, false, -1, 512, 256, 128), "dot");  // the same blocks, not forced
}

TEST(Dispatch, CostModelSplitsOnlyWhenThreadsWouldIdle) {
  runtime::DecodeShape s;
  s.lkv = 32768;
  s.rows = 4;
  s.units = 32;
  s.threads = 2;
  runtime::DecodeKnobs k = runtime::default_decode_knobs(s);
  EXPECT_EQ(k.num_partitions, 1);
  s.units = 1;  // MQA at B = 1: split for the 2 threads, then up to 4 items per thread
  k = runtime::default_decode_knobs(s);
  EXPECT_EQ(k.num_partitions, 8);
  s.threads = 64;
  k = runtime::default_decode_knobs(s);
  EXPECT_GE(k.num_partitions, 58);
  EXPECT_EQ(k.partition_size % k.block_n, 0);
  s.units = 3;
  s.threads = 2;
  k = runtime::default_decode_knobs(s);
  EXPECT_GE(double(3 * k.num_partitions) / (2 * ((3 * k.num_partitions + 1) / 2)), 0.9);
  s.lkv = 300;
  s.units = 1;
  s.threads = 64;
  k = runtime::default_decode_knobs(s);
  EXPECT_EQ(k.num_partitions, 1);  // 300 keys: no partition would reach 256
  s.paged = true;
  s.page_size = 48;
  s.lkv = 100000;
  k = runtime::default_decode_knobs(s);
  EXPECT_EQ(k.partition_size % 384, 0);  // lcm(128, 48)
}

}  // namespace
}  // namespace flexjit

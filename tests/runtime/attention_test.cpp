// LABELS: numerics
// flex_attention against the float64 reference: odd lengths, D not a power of two, GQA group 3,
// KV broadcast, strided inputs, Dv != D, fully masked rows, every built-in mod, fp32/bf16/fp16.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>

#include "jit/cache.h"
#include "jit/compile.h"
#include "runtime/attention.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/support/cpu_target.h"
#include "tests/support/numerics.h"

namespace flexjit {
namespace {

struct Case {
  DType dtype = DType::F32;
  int D = 64, Dv = 64;
  int64_t Lq = 17, Lkv = 17;
  int B = 1, Bkv = 1, Hq = 1, Hkv = 1;
  std::string score_mod, mask_mod;  // registered names or expression text
  bool strided = false;             // memory laid out [B, L, H, D], viewed as [B, H, L, D]
  int block_m = 0, block_n = 0;     // kernel options (0 = default)
  int64_t mask_block = 0;           // BlockMask block size (0 = default)
  int use_amx = -1;                 // AttentionOptions::use_amx (1: skipped where AMX is unavailable)
  int use_dpbf16 = -1;              // AttentionOptions::use_dpbf16 (1: skipped without AVX512-BF16)
  double scale = 0;                 // 0 = the default 1/sqrt(D)
  bool force_prefill = false;       // FORCE_USE_FLEX_ATTENTION: the prefill kernel even for decode shapes
};

std::string name_of(const Case& c) {
  std::string n = std::string(dtype_name(c.dtype)) + "_D" + std::to_string(c.D);
  if (c.Dv != c.D) n += "_Dv" + std::to_string(c.Dv);
  n += "_Lq" + std::to_string(c.Lq) + "_Lkv" + std::to_string(c.Lkv);
  n += "_B" + std::to_string(c.B) + (c.Bkv != c.B ? "x" + std::to_string(c.Bkv) : "");
  n += "_H" + std::to_string(c.Hq) + "x" + std::to_string(c.Hkv);
  auto clean = [](std::string s) {
    std::string o;
    for (char ch : s) o += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
    return o.substr(0, 24);
  };
  if (!c.score_mod.empty()) n += "_s_" + clean(c.score_mod);
  if (!c.mask_mod.empty()) n += "_m_" + clean(c.mask_mod);
  if (c.strided) n += "_strided";
  if (c.block_m) n += "_bm" + std::to_string(c.block_m) + "x" + std::to_string(c.block_n);
  if (c.mask_block) n += "_mb" + std::to_string(c.mask_block);
  if (c.use_amx >= 0) n += "_amx" + std::to_string(c.use_amx);
  if (c.use_dpbf16 >= 0) n += "_dpbf16" + std::to_string(c.use_dpbf16);
  if (c.scale != 0) n += c.scale < 0 ? "_negscale" : "_scale";
  if (c.force_prefill) n += "_prefill";
  return n;
}

using testing::make_tensor;
using testing::round_to;


void run_case(const Case& c) {
  SCOPED_TRACE(name_of(c));
  std::string no_amx;
  if (c.use_amx == 1 && !amx_available(&no_amx)) GTEST_SKIP() << "AMX engine not testable here: " << no_amx;
  if (c.use_dpbf16 == 1 && !dpbf16_available(&no_amx))
    GTEST_SKIP() << "vdpbf16ps engine not testable here: " << no_amx;
  OwnedTensor q = make_tensor(c.dtype, c.B, c.Hq, c.Lq, c.D, c.strided, 11);
  OwnedTensor k = make_tensor(c.dtype, c.Bkv, c.Hkv, c.Lkv, c.D, c.strided, 22);
  OwnedTensor v = make_tensor(c.dtype, c.Bkv, c.Hkv, c.Lkv, c.Dv, c.strided, 33);
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {c.B, c.Hq, c.Lq, c.Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {c.B, c.Hq, c.Lq});
  std::memset(out.bytes->data(), 0x7f, out.bytes->size());  // garbage: every element must be written
  ShapeInfo shape{c.B, c.Hq, c.Hkv, c.Lq, c.Lkv};
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  if (!c.score_mod.empty()) sm = testing::resolve_mod(c.score_mod, ModKind::Score, shape, &storage);
  if (!c.mask_mod.empty()) mm = testing::resolve_mod(c.mask_mod, ModKind::Mask, shape, &storage);
  auto [mods, bind] = combine(c.score_mod.empty() ? nullptr : &sm, c.mask_mod.empty() ? nullptr : &mm);

  AttentionOptions opt;
  opt.enable_gqa = c.Hq != c.Hkv;
  opt.block_m = c.block_m;
  opt.block_n = c.block_n;
  opt.use_amx = c.use_amx;
  opt.use_dpbf16 = c.use_dpbf16;
  if (c.scale != 0) opt.scale = c.scale;
  opt.force_prefill = c.force_prefill;
  runtime::BlockMask mask;
  const runtime::BlockMask* mp = nullptr;
  if (c.mask_block && mods.has_mask_mod()) {
    mask = runtime::create_block_mask(mods, bind, c.B, c.Hq, c.Lq, c.Lkv, c.mask_block, c.mask_block);
    mp = &mask;
  }
  AttentionReport rep;
  flex_attention(q.view, k.view, v.view, out.view, &lse.view, mods, bind, mp, opt, &rep);
  if (c.use_amx >= 0) EXPECT_EQ(rep.engine == "amx", c.use_amx == 1) << "engine";
  if (c.use_amx == 0 && c.use_dpbf16 >= 0 && rep.path == "prefill")
    EXPECT_EQ(rep.engine, c.use_dpbf16 == 1 ? "dpbf16" : "fma");
  const bool decode = c.Lq <= 16 && !c.force_prefill && c.use_dpbf16 != 1 &&
                      (!mp || (mp->q_block_size >= c.Lq && mp->kv_block_size % 16 == 0));
  EXPECT_EQ(rep.path, decode ? "decode" : "prefill") << "the dispatch rule";

  double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(c.D));
  RefResult gold = reference_attention(q.view, k.view, v.view, mods, bind, scale);
  RefResult base = reference_attention(q.view, k.view, v.view, mods, bind, scale, /*fp32=*/true);
  testing::expect_matches_reference(out.view, &lse.view, gold, base, c.dtype);
}

class Numerics : public ::testing::TestWithParam<Case> {};
TEST_P(Numerics, MatchesFloat64Reference) { run_case(GetParam()); }

std::vector<Case> shape_cases() {
  std::vector<Case> out;
  for (DType dt : {DType::F32, DType::BF16})
    for (int D : {48, 64, 80, 128})
      for (int64_t L : {1, 17, 97, 129, 1000}) {
        if (dt == DType::BF16 && L == 1000 && D != 128) continue;  // keep the suite quick
        Case c;
        c.dtype = dt;
        c.D = c.Dv = D;
        c.Lq = c.Lkv = L;
        c.Hq = 3;
        c.Hkv = 1;  // GQA group 3
        out.push_back(c);
      }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Shapes, Numerics, ::testing::ValuesIn(shape_cases()),
                         [](const auto& info) { return name_of(info.param); });

// Every registered built-in, alone, in fp32 and bf16, with GQA and batch 2.
std::vector<Case> builtin_cases() {
  std::vector<Case> out;
  for (const std::string& name : builtin_mod_names()) {
    for (DType dt : {DType::F32, DType::BF16}) {
      Case c;
      c.dtype = dt;
      c.D = c.Dv = 80;
      c.Lq = 129;
      c.Lkv = 300;
      c.B = c.Bkv = 2;
      c.Hq = 6;
      c.Hkv = 2;
      (find_mod(name).kind == ModKind::Score ? c.score_mod : c.mask_mod) = name;
      out.push_back(c);
    }
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Builtins, Numerics, ::testing::ValuesIn(builtin_cases()),
                         [](const auto& info) { return name_of(info.param); });

std::vector<Case> special_cases() {
  std::vector<Case> out;
  Case c;
  c.Hq = 3;
  c.Hkv = 3;
  // Lq != Lkv, both directions, and a single query (decode-like).
  for (auto [lq, lkv] : {std::pair<int64_t, int64_t>{17, 97}, {97, 1}, {1, 1000}, {129, 4097}}) {
    Case x = c;
    x.Lq = lq;
    x.Lkv = lkv;
    out.push_back(x);
  }
  // Combinations of score and mask mods, with a block mask of 64 and kernel blocks that divide it.
  for (auto [s, m] : {std::pair<std::string, std::string>{"alibi", "causal"}, {"softcap", "sliding_window"},
                      {"rel_pos", "document"}, {"alibi", "prefix_lm"}}) {
    Case x = c;
    x.Lq = x.Lkv = 333;
    x.score_mod = s;
    x.mask_mod = m;
    x.mask_block = 64;
    out.push_back(x);
  }
  // Fully masked rows: every third query row, and a whole leading q-block.
  {
    Case x = c;
    x.Lq = x.Lkv = 97;
    x.mask_mod = "q_idx % 3 != 1";
    out.push_back(x);
    x.mask_mod = "q_idx >= 70 && kv_idx <= q_idx";
    x.mask_block = 32;
    out.push_back(x);
    x.dtype = DType::BF16;
    out.push_back(x);
  }
  // Strided inputs, KV batch broadcast, Dv != D, fp16, other kernel blocks.
  {
    Case x = c;
    x.Lq = 65;
    x.Lkv = 130;
    x.strided = true;
    x.score_mod = "alibi";
    out.push_back(x);
    x.strided = false;
    x.B = 3;
    x.Bkv = 1;
    out.push_back(x);
    Case y = c;
    y.D = 64;
    y.Dv = 80;
    y.Lq = y.Lkv = 97;
    out.push_back(y);
    y.D = 256;
    y.Dv = 24;
    out.push_back(y);
    Case z = c;
    z.dtype = DType::F16;
    z.Lq = z.Lkv = 129;
    z.score_mod = "softcap";
    out.push_back(z);
    Case w = c;
    w.Lq = w.Lkv = 200;
    w.mask_mod = "causal";
    w.block_m = 16;
    w.block_n = 32;
    w.mask_block = 64;
    out.push_back(w);
    w.block_m = 64;
    w.block_n = 128;
    w.mask_block = 128;
    out.push_back(w);
  }
  // Decode-like GQA calls (Lq <= 16, group 3): the group's query heads share one tile (pack_gqa).
  // Row counts that fill a tile partly (1 x 3), cross tiles mid-head (7 x 3 rows in 16-row
  // tiles), mods that read h and q_idx, masks (built per call, broadcast over heads), a mask
  // that reads h (no packing), and a per-head BlockMask passed in (no packing).
  {
    const size_t first_decode = out.size();
    Case d = c;
    d.B = d.Bkv = 2;
    d.Hq = 6;
    d.Hkv = 2;
    d.Lkv = 300;
    for (int64_t lq : {1, 5, 7, 16}) {
      d.Lq = lq;
      d.score_mod = "alibi";
      d.mask_mod = "kv_idx <= q_idx + 290";
      out.push_back(d);
      d.score_mod = "rel_pos";
      d.mask_mod = "document";
      out.push_back(d);
    }
    d.Lq = 7;
    d.block_m = 16;
    d.score_mod = "softcap";
    d.mask_mod = "";
    out.push_back(d);
    d.dtype = DType::BF16;
    d.score_mod = "alibi";
    out.push_back(d);
    d.dtype = DType::F32;
    d.block_m = 0;
    d.score_mod = "";
    d.mask_mod = "h % 2 == 0 || kv_idx < 100";
    out.push_back(d);
    d.mask_mod = "sliding_window";
    d.mask_block = 64;
    out.push_back(d);
    // The same decode shapes on the prefill kernel (FORCE_USE_FLEX_ATTENTION), GQA packed there.
    const size_t end = out.size();
    for (size_t i = first_decode; i < end; ++i) {
      Case p = out[i];
      p.force_prefill = true;
      out.push_back(p);
    }
  }
  // Score terms of kv_idx - q_idx alone, tabulated per diagonal of each tile (jit/codegen.cpp
  // DiagPlanner): a buffer read (rel_pos), a log, an int division, an exp under a where() branch;
  // tiles larger than a table chunk (256) along the keys (BLOCK_N 512: two chunks along the prefill
  // layout's outer dim, along the decode layout's inner one), GQA 3.
  {
    Case r = c;
    r.Hq = 3;
    r.Hkv = 1;
    r.Lq = 300;
    r.Lkv = 1100;
    r.block_m = 64;
    r.block_n = 512;
    for (const char* mod : {"rel_pos", "score - log(1.0 + float(abs(kv_idx - q_idx)))",
                            "score + float((kv_idx - q_idx) / 7) * 0.01",
                            "where(score > 0.0, score * exp(-float(abs(q_idx - kv_idx)) / 64.0), score)"}) {
      r.score_mod = mod;
      r.mask_mod = "";
      out.push_back(r);
      r.mask_mod = "causal";
      out.push_back(r);
    }
    Case d = r;
    d.Lq = 5;
    d.Lkv = 1300;
    d.block_m = 0;
    d.score_mod = "score - log(1.0 + float(abs(kv_idx - q_idx)))";
    out.push_back(d);
    d.score_mod = "rel_pos";
    d.force_prefill = true;
    out.push_back(d);
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Special, Numerics, ::testing::ValuesIn(special_cases()),
                         [](const auto& info) { return name_of(info.param); });

// The bf16 engines side by side: AMX tiles (use_amx 1, skipped visibly on hosts without AMX),
// vdpbf16ps (use_dpbf16 1, skipped visibly without AVX512-BF16) and the FMA engine (both 0); and
// the fp16 ones: AMX tiles on bf16 hi + lo halves (use_amx 1; its fp32 LSE, held to 2e-5, shows
// the three products keep fp32-grade scores) and the FMA engine (use_amx 0).
// Shapes that hit the engines' padding and fallbacks: D and Dv not multiples of 32 (K packed,
// not read in place), odd D and Dv (half-empty bf16 pairs), strided K/V (scalar packing), an odd
// number of 16-row query tiles (BLOCK_M 48), BLOCK_N 32 and odd BLOCK_N, KV tails of odd
// length, long decode with GQA packing, fully masked rows, D 256, a negative scale (scores
// scaled before the softmax) and buffer-reading mods.
std::vector<Case> amx_cases() {
  std::vector<Case> out;
  struct Engine {
    DType dtype;
    int amx, dp;
  };
  for (auto [dtype, amx, dp] : {Engine{DType::BF16, 1, -1}, Engine{DType::BF16, 0, 1}, Engine{DType::BF16, 0, 0},
                                Engine{DType::F16, 1, -1}, Engine{DType::F16, 0, -1}}) {
    Case c;
    c.dtype = dtype;
    c.use_amx = amx;
    c.use_dpbf16 = dp;
    c.Hq = c.Hkv = 2;
    Case x = c;
    x.D = x.Dv = 128;
    x.Lq = x.Lkv = 300;
    x.score_mod = "alibi";
    x.mask_mod = "causal";
    out.push_back(x);
    x = c;
    x.D = 80;
    x.Dv = 48;
    x.Lq = 97;
    x.Lkv = 129;
    x.strided = true;
    x.score_mod = "softcap";
    out.push_back(x);
    x = c;
    x.D = x.Dv = 64;
    x.Hq = 6;
    x.Lq = 1;
    x.Lkv = 4097;
    out.push_back(x);
    x.Lq = 5;
    x.mask_mod = "sliding_window";
    out.push_back(x);
    x.Lq = 3;  // decode with a given BlockMask of 64-key blocks (the kernel's BLOCK_N follows them)
    x.Lkv = 1000;
    x.mask_mod = "document";
    x.mask_block = 64;
    out.push_back(x);
    x = c;
    x.D = x.Dv = 64;
    x.Lq = x.Lkv = 200;
    x.block_m = 48;
    x.block_n = 32;
    x.mask_mod = "q_idx % 3 != 1";
    out.push_back(x);
    x = c;
    x.D = x.Dv = 256;
    x.Lq = 129;
    x.Lkv = 17;
    out.push_back(x);
    x = c;
    x.D = x.Dv = 32;
    x.Lq = 129;
    x.Lkv = 1000;
    x.scale = -0.2;
    out.push_back(x);
    x.scale = 0.3;
    x.mask_mod = "document";
    out.push_back(x);
    if (amx == 0) {  // odd head dims and blocks (the AMX engine needs BLOCK_N % 32 == 0)
      x = c;
      x.D = 33;
      x.Dv = 17;
      x.Lq = 97;
      x.Lkv = 131;
      x.block_m = 32;
      x.block_n = 17;
      x.score_mod = "rel_pos";
      out.push_back(x);
      x = c;
      x.D = x.Dv = 80;
      x.Hq = 6;
      x.Lq = 129;
      x.Lkv = 4097;
      x.mask_mod = "causal";
      out.push_back(x);
    }
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Amx, Numerics, ::testing::ValuesIn(amx_cases()),
                         [](const auto& info) { return name_of(info.param); });

// The engine a small prefill call ran on (rep.engine) for the given options, or the message
// of the error it raised: what the engine-choice tests below compare.
std::string engine_of(DType dt, int use_amx, int use_dpbf16, int block_n) {
  OwnedTensor q = make_tensor(dt, 1, 2, 40, 32, false, 1);
  OwnedTensor out = OwnedTensor::make("o", dt, {1, 2, 40, 32});
  auto [mods, bind] = combine(nullptr, nullptr);
  AttentionOptions opt;
  opt.use_amx = use_amx;
  opt.use_dpbf16 = use_dpbf16;
  opt.block_n = block_n;
  AttentionReport rep;
  flex_attention(q.view, q.view, q.view, out.view, nullptr, mods, bind, nullptr, opt, &rep);
  return rep.engine;
}
std::string engine_error(DType dt, int use_amx, int use_dpbf16, int block_n = 0) {
  try {
    engine_of(dt, use_amx, use_dpbf16, block_n);
  } catch (const Error& e) {
    return std::string(e.what());
  }
  return std::string("no error");
}

// bf16 and fp16 take the AMX engine wherever the host allows it, fp32 never; USE_AMX=1 says
// plainly why it cannot be honoured.
TEST(Amx, EngineChoiceAndErrors) {
  auto call = [](DType dt, int use_amx, int block_n) { return engine_of(dt, use_amx, -1, block_n) == "amx"; };
  std::string why;
  const bool avail = amx_available(&why);
  EXPECT_EQ(avail, why.empty());
  EXPECT_EQ(call(DType::BF16, -1, 0), avail);
  EXPECT_FALSE(call(DType::BF16, 0, 0));
  EXPECT_FALSE(call(DType::F32, -1, 0));
  EXPECT_FALSE(call(DType::BF16, -1, 48));  // BLOCK_N not a multiple of 32: not the AMX engine
  EXPECT_EQ(call(DType::F16, -1, 0), avail);
  EXPECT_FALSE(call(DType::F16, 0, 0));
  EXPECT_EQ(engine_of(DType::F16, -1, -1, 48), "fma");  // never vdpbf16ps: that engine is bf16 only
  EXPECT_NE(engine_error(DType::F32, 1, -1).find("USE_AMX=1 needs bf16 or fp16 inputs"), std::string::npos);
  if (avail) {
    EXPECT_TRUE(call(DType::BF16, 1, 0));
    EXPECT_TRUE(call(DType::F16, 1, 0));
    EXPECT_NE(engine_error(DType::BF16, 1, -1, 48).find("multiple of 32"), std::string::npos);
    EXPECT_NE(engine_error(DType::F16, 1, -1, 48).find("multiple of 32"), std::string::npos);
  } else {
    EXPECT_NE(engine_error(DType::BF16, 1, -1).find(why), std::string::npos);
    EXPECT_NE(engine_error(DType::F16, 1, -1).find(why), std::string::npos);
  }
}

// bf16 takes vdpbf16ps where AMX is not used and the host has AVX512-BF16; USE_DPBF16 forces or
// refuses it (over AMX too), and a request that cannot be honoured says why.
TEST(Dpbf16, EngineChoiceAndErrors) {
  std::string why;
  const bool avail = dpbf16_available(&why);
  EXPECT_EQ(avail, why.empty());
  const bool amx = amx_available();
  EXPECT_EQ(engine_of(DType::BF16, -1, -1, 0), amx ? "amx" : avail ? "dpbf16" : "fma");
  EXPECT_EQ(engine_of(DType::BF16, 0, 0, 0), "fma");
  EXPECT_EQ(engine_of(DType::F32, -1, -1, 0), "fma");
  EXPECT_EQ(engine_of(DType::F16, -1, -1, 0), amx ? "amx" : "fma");
  EXPECT_NE(engine_error(DType::F16, -1, 1).find("USE_DPBF16=1 needs bf16 inputs"), std::string::npos);
  EXPECT_EQ(engine_of(DType::BF16, -1, -1, 48), avail ? "dpbf16" : "fma");  // no AMX at BLOCK_N 48
  EXPECT_NE(engine_error(DType::F32, -1, 1).find("USE_DPBF16=1 needs bf16 inputs"), std::string::npos);
  EXPECT_NE(engine_error(DType::BF16, 1, 1).find("set one of them"), std::string::npos);
  if (avail) {
    EXPECT_EQ(engine_of(DType::BF16, -1, 1, 0), "dpbf16");  // over AMX too
    EXPECT_EQ(engine_of(DType::BF16, -1, 1, 48), "dpbf16");
  } else {
    EXPECT_NE(engine_error(DType::BF16, -1, 1).find(why), std::string::npos);
  }
}

// A caller's thread pool (the torch layer passes at::parallel_for) gets the whole item range;
// however it chunks it, every item runs exactly once and the result is bitwise the TBB one.
TEST(ParallelFor, CallerPoolRunsEveryItemOnce) {
  OwnedTensor q = make_tensor(DType::F32, 2, 3, 97, 32, false, 1);
  OwnedTensor kv = make_tensor(DType::F32, 2, 3, 130, 32, false, 2);
  TracedMod m = parse_mod("kv_idx <= q_idx + 30", ModKind::Mask, {}, {});
  auto [mods, bind] = combine(nullptr, &m);
  auto run = [&](AttentionOptions opt) {
    OwnedTensor out = OwnedTensor::make("o", DType::F32, {2, 3, 97, 32});
    OwnedTensor lse = OwnedTensor::make("l", DType::F32, {2, 3, 97});
    flex_attention(q.view, kv.view, kv.view, out.view, &lse.view, mods, bind, nullptr, opt);
    std::vector<double> r = to_doubles(out.view), l = to_doubles(lse.view);
    r.insert(r.end(), l.begin(), l.end());
    return r;
  };
  const std::vector<double> tbb_result = run({});
  int64_t seen_n = -1, chunks = 0;
  AttentionOptions opt;
  opt.block_m = 32;
  opt.parallel_for = [&](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    seen_n = n;
    for (int64_t end = n; end > 0; end -= 3, ++chunks) body(std::max<int64_t>(0, end - 3), end);  // odd chunks, backwards
  };
  const std::vector<double> pool_result = run(opt);
  EXPECT_EQ(seen_n, 2 * 3 * 4);  // B * H * ceil(97 / 32)
  EXPECT_EQ(chunks, 8);
  ASSERT_EQ(pool_result.size(), tbb_result.size());
  for (size_t i = 0; i < tbb_result.size(); ++i)
    if (!(pool_result[i] == tbb_result[i] || (std::isinf(pool_result[i]) && std::isinf(tbb_result[i]))))
      FAIL() << "element " << i << ": " << pool_result[i] << " vs " << tbb_result[i];
}

// Changing a param value or the sequence length reuses the compiled kernel.
TEST(Recompile, ParamValuesAndLengthsNeverRecompile) {
  std::vector<OwnedTensor> storage;
  const RegisteredMod& m = find_mod("softcap");
  auto first = [&](int64_t L, double cap) {
    OwnedTensor q = make_tensor(DType::F32, 1, 2, L, 32, false, 1);
    OwnedTensor out = OwnedTensor::make("o", DType::F32, {1, 2, L, 32});
    TracedMod t = m.mod;
    t.bindings.params = {{"cap", cap}};
    auto [mods, bind] = combine(&t, nullptr);
    AttentionReport rep;
    flex_attention(q.view, q.view, q.view, out.view, nullptr, mods, bind, nullptr, {}, &rep);
    return rep.cache;
  };
  first(40, 20.0);  // may compile (or hit the disk cache)
  EXPECT_EQ(first(41, 20.0), "memory");
  EXPECT_EQ(first(40, 5.0), "memory");
  EXPECT_EQ(first(1000, 1.5), "memory");
}

// Decode-like GQA calls pack each KV head's query heads into one tile; a mask that differs by
// head, or a longer query, keeps one head per tile. (Numerics of both: Special/Numerics.)
TEST(Decode, PacksGqaGroupsOnlyWhereRowsMayShareATile) {
  auto packed = [](int64_t Lq, const std::string& mask) {
    OwnedTensor q = make_tensor(DType::F32, 1, 6, Lq, 32, false, 1);
    OwnedTensor kv = make_tensor(DType::F32, 1, 2, 70, 32, false, 2);
    OwnedTensor out = OwnedTensor::make("o", DType::F32, {1, 6, Lq, 32});
    TracedMod m = parse_mod(mask.empty() ? "true" : mask, ModKind::Mask, {}, {});
    auto [mods, bind] = combine(nullptr, mask.empty() ? nullptr : &m);
    AttentionOptions opt;
    opt.enable_gqa = true;
    AttentionReport rep;
    flex_attention(q.view, kv.view, kv.view, out.view, nullptr, mods, bind, nullptr, opt, &rep);
    return rep.pack_gqa;
  };
  EXPECT_TRUE(packed(1, ""));
  EXPECT_TRUE(packed(16, "kv_idx <= q_idx + 50"));
  EXPECT_FALSE(packed(17, ""));
  EXPECT_FALSE(packed(1, "h != 2"));
}

// The attention kernel is compiled per shape and the mods per mod set: a new mod on a shape
// already run compiles only the mods kernel, and one mod set serves every shape.
TEST(Recompile, AttentionKernelIsSharedAcrossModsAndModsAcrossShapes) {
  auto call = [&](const std::string& score, int64_t D) {
    OwnedTensor q = make_tensor(DType::F32, 1, 2, 33, D, false, 7);
    OwnedTensor out = OwnedTensor::make("o", DType::F32, {1, 2, 33, D});
    TracedMod t = parse_mod(score, ModKind::Score, {}, {});
    TracedMod c = find_mod("causal").mod;
    auto [mods, bind] = combine(&t, &c);
    AttentionReport rep;
    flex_attention(q.view, q.view, q.view, out.view, nullptr, mods, bind, nullptr, {}, &rep);
    EXPECT_EQ(rep.kernels.size(), 2u);
    return rep;
  };
  // Mods unique to this process run, so the mods kernels are never on disk yet.
  const std::string salt =
      "0.000001 * " + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count() % 1000000007);
  AttentionReport a = call("score * 0.5 + " + salt, 40);
  AttentionReport b = call("score * 0.25 + " + salt, 40);
  ASSERT_EQ(b.kernels.size(), 2u);
  EXPECT_EQ(b.kernels[0].role, "attention");
  EXPECT_EQ(b.kernels[0].cache, "memory");
  EXPECT_EQ(b.kernels[0].key, a.kernels[0].key);
  EXPECT_EQ(b.kernels[1].role, "mods");
  EXPECT_EQ(b.kernels[1].cache, "miss");
  EXPECT_NE(b.kernels[1].key, a.kernels[1].key);
  EXPECT_EQ(b.cache, "miss");
  AttentionReport c = call("score * 0.25 + " + salt, 24);  // same mods, another head dim
  EXPECT_EQ(c.kernels[1].cache, "memory");
  EXPECT_NE(c.kernels[0].key, b.kernels[0].key);
  // No mods at all: only the attention kernel.
  OwnedTensor q = make_tensor(DType::F32, 1, 2, 33, 40, false, 7);
  OwnedTensor out = OwnedTensor::make("o", DType::F32, {1, 2, 33, 40});
  AttentionReport none;
  flex_attention(q.view, q.view, q.view, out.view, nullptr, ModSet{}, ModBindings{}, nullptr, {}, &none);
  ASSERT_EQ(none.kernels.size(), 1u);
  EXPECT_EQ(none.kernels[0].key, a.kernels[0].key);
  EXPECT_EQ(none.cache, "memory");
}

}  // namespace
}  // namespace flexjit

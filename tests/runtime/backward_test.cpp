// LABELS: numerics
// flex_attention_backward against the float64 reference (runtime/reference.h, whose mod
// derivatives are finite differences of ir::eval, independent of jit/grad): odd lengths, D not a
// power of two, Dv != D, GQA group 3, MQA, KV broadcast, strided inputs, fully masked rows, every
// built-in mod, learnable buffers read once, twice and through rank-2 indices, fp32/bf16/fp16;
// bitwise determinism across runs and thread counts; errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "jit/compile.h"
#include "runtime/attention.h"
#include "runtime/backward.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/support/cpu_target.h"
#include "tests/support/numerics.h"

namespace flexjit {
namespace {

using testing::make_tensor;


struct Case {
  DType dtype = DType::F32;
  int D = 80, Dv = 80;
  int64_t Lq = 17, Lkv = 17;
  int B = 1, Bkv = 1, Hq = 2, Hkv = 2;
  std::string score_mod, mask_mod;
  std::vector<std::string> grad_buffers;  // buffers whose gradients are checked
  // Extra float buffers for text mods: name, sizes (filled with random values).
  std::vector<std::pair<std::string, std::vector<int64_t>>> buffers;
  bool strided = false;
  int64_t mask_block = 0;  // BlockMask built explicitly with these blocks (0: by the call)
  int block = 0;           // backward tiles BLOCK_M = BLOCK_N (0: default)
};

std::string name_of(const Case& c) {
  std::string n = std::string(dtype_name(c.dtype)) + "_D" + std::to_string(c.D) + "_Dv" + std::to_string(c.Dv) +
                  "_L" + std::to_string(c.Lq) + "x" + std::to_string(c.Lkv) + "_B" + std::to_string(c.B) + "x" +
                  std::to_string(c.Bkv) + "_H" + std::to_string(c.Hq) + "x" + std::to_string(c.Hkv);
  auto clean = [](const std::string& s) {
    std::string o;
    for (char ch : s) o += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
    return o.substr(0, 24);
  };
  if (!c.score_mod.empty()) n += "_s_" + clean(c.score_mod);
  if (!c.mask_mod.empty()) n += "_m_" + clean(c.mask_mod);
  if (c.strided) n += "_strided";
  if (c.mask_block) n += "_mb" + std::to_string(c.mask_block);
  if (c.block) n += "_t" + std::to_string(c.block);
  return n;
}

void PrintTo(const Case& c, std::ostream* os) { *os << name_of(c); }

struct BwdRun {
  OwnedTensor q, k, v, out, lse, dout, dq, dk, dv;
  std::vector<OwnedTensor> storage, grads;
  ModSet mods;
  ModBindings bind;
  runtime::BlockMask mask;
  bool has_mask = false;
};

void setup(const Case& c, BwdRun& r) {
  r.q = make_tensor(c.dtype, c.B, c.Hq, c.Lq, c.D, c.strided, 11);
  r.k = make_tensor(c.dtype, c.Bkv, c.Hkv, c.Lkv, c.D, c.strided, 22);
  r.v = make_tensor(c.dtype, c.Bkv, c.Hkv, c.Lkv, c.Dv, c.strided, 33);
  r.dout = make_tensor(c.dtype, c.B, c.Hq, c.Lq, c.Dv, false, 44);
  r.out = OwnedTensor::make("out", c.dtype, {c.B, c.Hq, c.Lq, c.Dv});
  r.lse = OwnedTensor::make("lse", DType::F32, {c.B, c.Hq, c.Lq});
  r.dq = OwnedTensor::make("dq", DType::F32, {c.B, c.Hq, c.Lq, c.D});
  r.dk = OwnedTensor::make("dk", DType::F32, {c.Bkv, c.Hkv, c.Lkv, c.D});
  r.dv = OwnedTensor::make("dv", DType::F32, {c.Bkv, c.Hkv, c.Lkv, c.Dv});
  for (OwnedTensor* t : {&r.dq, &r.dk, &r.dv}) std::memset(t->bytes->data(), 0x7f, t->bytes->size());
  ShapeInfo shape{c.B, c.Hq, c.Hkv, c.Lq, c.Lkv};
  std::vector<OwnedTensor> extra;
  uint64_t seed = 55;
  for (const auto& [n, sizes] : c.buffers) {
    extra.push_back(OwnedTensor::make(n, DType::F32, sizes));
    fill_random(extra.back().view, seed++);
  }
  TracedMod sm, mm;
  auto resolve = [&](const std::string& s, ModKind kind) {
    if (has_mod(s)) return instantiate_example(find_mod(s), shape, &r.storage);
    return parse_mod(s, kind, extra, {});
  };
  if (!c.score_mod.empty()) sm = resolve(c.score_mod, ModKind::Score);
  if (!c.mask_mod.empty()) mm = resolve(c.mask_mod, ModKind::Mask);
  for (auto& t : extra) r.storage.push_back(t);
  std::tie(r.mods, r.bind) = combine(c.score_mod.empty() ? nullptr : &sm, c.mask_mod.empty() ? nullptr : &mm);
  if (c.mask_block && r.mods.has_mask_mod()) {
    r.mask = runtime::create_block_mask(r.mods, r.bind, c.B, c.Hq, c.Lq, c.Lkv, c.mask_block, c.mask_block);
    r.has_mask = true;
  }
}

AttentionOptions options(const Case& c) {
  AttentionOptions opt;
  opt.enable_gqa = c.Hq != c.Hkv;
  opt.force_prefill = true;
  return opt;
}

void run_backward(const Case& c, BwdRun& r, int threads) {
  AttentionOptions opt = options(c);
  opt.num_threads = threads;
  opt.block_m = opt.block_n = c.block;
  std::vector<BufferGrad> bg;
  r.grads.clear();
  for (const std::string& n : c.grad_buffers) {
    const TensorView* bound = r.bind.find_buffer(n);
    ASSERT_NE(bound, nullptr) << n;
    r.grads.push_back(
        OwnedTensor::make("g_" + n, DType::F32, std::vector<int64_t>(bound->sizes, bound->sizes + bound->rank)));
  }
  for (size_t i = 0; i < c.grad_buffers.size(); ++i) bg.push_back({c.grad_buffers[i], r.grads[i].view});
  flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, r.dq.view, r.dk.view,
                          r.dv.view, r.mods, r.bind, bg, r.has_mask ? &r.mask : nullptr, opt);
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, DType dtype, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const testing::Tolerance tol = testing::gradient_tolerance(dtype);
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] = " << got[i];
    // Relative to the element and to the tensor's largest gradient (sums of many terms).
    if (std::fabs(got[i] - want[i]) > tol.atol * std::max(1.0, scale) + tol.rtol * std::fabs(want[i]) && ++bad <= 5)
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", reference " << want[i];
  }
  EXPECT_EQ(bad, 0) << what << ": elements out of tolerance";
}

void run_case(const Case& c) {
  SCOPED_TRACE(name_of(c));
  BwdRun r;
  setup(c, r);
  flex_attention(r.q.view, r.k.view, r.v.view, r.out.view, &r.lse.view, r.mods, r.bind, r.has_mask ? &r.mask : nullptr,
                 options(c));
  run_backward(c, r, 0);
  const double scale = 1.0 / std::sqrt(double(c.D));
  RefGrads g = reference_attention_backward(r.q.view, r.k.view, r.v.view, r.dout.view, r.mods, r.bind, scale,
                                            c.grad_buffers);
  expect_close(to_doubles(r.dq.view), g.dq, c.dtype, "dq");
  expect_close(to_doubles(r.dk.view), g.dk, c.dtype, "dk");
  expect_close(to_doubles(r.dv.view), g.dv, c.dtype, "dv");
  for (size_t i = 0; i < c.grad_buffers.size(); ++i)
    expect_close(to_doubles(r.grads[i].view), g.dbuf[i], c.dtype, ("d" + c.grad_buffers[i]).c_str());
}

class Backward : public ::testing::TestWithParam<Case> {};
TEST_P(Backward, MatchesFloat64Reference) { run_case(GetParam()); }

std::vector<Case> cases() {
  std::vector<Case> out;
  auto add = [&](Case c) { out.push_back(c); };
  for (int64_t L : {1, 17, 97, 129}) {
    Case c;
    c.Lq = c.Lkv = L;
    add(c);
    c.mask_mod = "causal";
    add(c);
  }
  {  // Lq != Lkv both ways, D != Dv, D 64
    Case c;
    c.Lq = 17;
    c.Lkv = 97;
    c.D = 48;
    c.Dv = 80;
    add(c);
    c.Lq = 97;
    c.Lkv = 17;
    c.D = c.Dv = 64;
    c.mask_mod = "causal";
    add(c);
  }
  {  // head dims that are not multiples of 16 (padded rows in every packed tile)
    Case c;
    c.D = 8;
    c.Dv = 8;
    c.Lq = c.Lkv = 9;
    c.mask_mod = "causal";
    c.score_mod = "softcap";
    add(c);
    c.D = 20;
    c.Dv = 24;
    c.Lq = 40;
    c.Lkv = 70;
    add(c);
  }
  {  // GQA group 3, MQA, KV broadcast over the batch, strided inputs
    Case c;
    c.Hq = 6;
    c.Hkv = 2;
    c.Lq = c.Lkv = 97;
    c.mask_mod = "causal";
    c.score_mod = "alibi";
    c.grad_buffers = {"slopes"};
    add(c);
    c.Hq = 3;
    c.Hkv = 1;
    c.Lq = c.Lkv = 33;
    add(c);
    Case b;
    b.B = 2;
    b.Bkv = 1;
    b.Lq = b.Lkv = 40;
    b.strided = true;
    b.score_mod = "softcap";
    add(b);
  }
  // Every built-in mod.
  for (const char* m : {"causal", "sliding_window", "prefix_lm", "document", "key_padding"}) {
    Case c;
    c.B = 2;
    c.Bkv = 2;
    c.Lq = c.Lkv = 129;
    c.mask_mod = m;
    add(c);
  }
  for (const char* s : {"alibi", "softcap", "rel_pos"}) {
    Case c;
    c.Lq = c.Lkv = 97;
    c.score_mod = s;
    if (std::string(s) == "alibi") c.grad_buffers = {"slopes"};
    if (std::string(s) == "rel_pos") c.grad_buffers = {"rel_bias"};
    add(c);
  }
  {  // Learnable biases: a relative-position table, a bias read twice, a rank-2 bias, a nonlinear mod
    Case c;
    c.Lq = c.Lkv = 33;
    c.score_mod = "score + rel(h, q_idx - kv_idx + 33)";
    c.buffers = {{"rel", {2, 66}}};
    c.grad_buffers = {"rel"};
    c.mask_mod = "causal";
    add(c);
    c.score_mod = "score * w[h] + w[h]";
    c.buffers = {{"w", {2}}};
    c.grad_buffers = {"w"};
    c.mask_mod.clear();
    add(c);
    c.score_mod = "score + bias2(q_idx, kv_idx)";
    c.buffers = {{"bias2", {33, 33}}};
    c.grad_buffers = {"bias2"};
    add(c);
    c.score_mod = "score * score / 4 + sigmoid(score) + slope[h] * exp(-abs(q_idx - kv_idx) / 8.0)";
    c.buffers = {{"slope", {2}}};
    c.grad_buffers = {"slope"};
    add(c);
  }
  {  // Fully masked rows (0..4 see nothing), with and without a score_mod; explicit mask blocks
    Case c;
    c.Lq = c.Lkv = 70;
    c.mask_mod = "q_idx >= 5 && kv_idx <= q_idx";
    add(c);
    c.score_mod = "softcap";
    c.mask_block = 32;
    add(c);
    c.block = 16;
    add(c);
  }
  for (DType dt : {DType::BF16, DType::F16}) {
    Case c;
    c.dtype = dt;
    c.Lq = c.Lkv = 97;
    c.mask_mod = "causal";
    c.score_mod = "alibi";
    c.grad_buffers = {"slopes"};
    add(c);
    c.Hq = 6;
    c.Hkv = 2;
    c.score_mod.clear();
    c.grad_buffers.clear();
    add(c);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, Backward, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return name_of(i.param); });

// bf16 on both engines (vdpbf16ps products where the host has AVX512-BF16, fp32 FMAs on the
// widened values), at odd D, Dv, lengths and GQA so every pair packing has a lone partner.
TEST(BackwardEngines, Bf16OnFmaAndVdpbf16ps) {
  Case c;
  c.dtype = DType::BF16;
  c.D = 45;
  c.Dv = 23;
  c.Lq = 97;
  c.Lkv = 77;
  c.Hq = 3;
  c.Hkv = 1;
  c.score_mod = "score + rel(h, q_idx - kv_idx + 77)";
  c.buffers = {{"rel", {3, 174}}};
  c.grad_buffers = {"rel"};
  c.mask_mod = "kv_idx <= q_idx + 3";
  BwdRun r;
  setup(c, r);
  flex_attention(r.q.view, r.k.view, r.v.view, r.out.view, &r.lse.view, r.mods, r.bind, nullptr, options(c));
  RefGrads g = reference_attention_backward(r.q.view, r.k.view, r.v.view, r.dout.view, r.mods, r.bind,
                                            1.0 / std::sqrt(double(c.D)), c.grad_buffers);
  for (int dp : {0, 1}) {
    SCOPED_TRACE(dp ? "vdpbf16ps" : "fma");
    std::string why;
    if (dp && !dpbf16_available(&why)) {
      std::printf("vdpbf16ps backward not testable here: %s\n", why.c_str());
      continue;
    }
    AttentionOptions opt = options(c);
    opt.use_dpbf16 = dp;
    OwnedTensor grel = OwnedTensor::make("g", DType::F32, {3, 174});
    AttentionReport rep;
    flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, r.dq.view,
                            r.dk.view, r.dv.view, r.mods, r.bind, {{"rel", grel.view}}, nullptr, opt, &rep);
    EXPECT_EQ(rep.engine, dp ? "dpbf16" : "fma");
    EXPECT_EQ(rep.path, "backward");
    expect_close(to_doubles(r.dq.view), g.dq, c.dtype, "dq");
    expect_close(to_doubles(r.dk.view), g.dk, c.dtype, "dk");
    expect_close(to_doubles(r.dv.view), g.dv, c.dtype, "dv");
    expect_close(to_doubles(grel.view), g.dbuf[0], c.dtype, "drel");
  }
}

// A gradient through the lse output too (d lse / d score = P), with fully masked rows.
TEST(BackwardLse, GradientOfTheLseOutput) {
  Case c;
  c.Hq = 6;
  c.Hkv = 2;
  c.Lq = 70;
  c.Lkv = 97;
  c.score_mod = "softcap";
  c.mask_mod = "q_idx >= 5 && kv_idx <= q_idx + 20";
  BwdRun r;
  setup(c, r);
  flex_attention(r.q.view, r.k.view, r.v.view, r.out.view, &r.lse.view, r.mods, r.bind, nullptr, options(c));
  OwnedTensor dlse = testing::make_tensor(DType::F32, 1, c.B, c.Hq, c.Lq, false, 66);
  TensorView dl = dlse.view;  // [B, Hq, Lq]
  dl.rank = 3;
  for (int i = 0; i < 3; ++i) {
    dl.sizes[i] = dlse.view.sizes[i + 1];
    dl.strides[i] = dlse.view.strides[i + 1];
  }
  flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, r.dq.view, r.dk.view,
                          r.dv.view, r.mods, r.bind, {}, nullptr, options(c), nullptr, &dl);
  RefGrads g = reference_attention_backward(r.q.view, r.k.view, r.v.view, r.dout.view, r.mods, r.bind,
                                            1.0 / std::sqrt(double(c.D)), {}, &dl);
  expect_close(to_doubles(r.dq.view), g.dq, c.dtype, "dq");
  expect_close(to_doubles(r.dk.view), g.dk, c.dtype, "dk");
  expect_close(to_doubles(r.dv.view), g.dv, c.dtype, "dv");
  // Without dlse the gradients differ (the test is not vacuous).
  RefGrads g0 = reference_attention_backward(r.q.view, r.k.view, r.v.view, r.dout.view, r.mods, r.bind,
                                             1.0 / std::sqrt(double(c.D)));
  double diff = 0;
  for (size_t i = 0; i < g.dq.size(); ++i) diff = std::max(diff, std::fabs(g.dq[i] - g0.dq[i]));
  EXPECT_GT(diff, 1e-2);
}

TEST(BackwardDeterminism, BitwiseAcrossRunsAndThreadCounts) {
  Case c;
  c.B = 2;
  c.Bkv = 2;
  c.Hq = 6;
  c.Hkv = 2;
  c.Lq = c.Lkv = 300;
  c.mask_mod = "causal";
  c.score_mod = "score + rel(h, q_idx - kv_idx + 300)";
  c.buffers = {{"rel", {6, 600}}};
  c.grad_buffers = {"rel"};
  BwdRun r;
  setup(c, r);
  flex_attention(r.q.view, r.k.view, r.v.view, r.out.view, &r.lse.view, r.mods, r.bind, nullptr, options(c));
  std::vector<std::vector<unsigned char>> first;
  for (int threads : {1, 2, 1, 2, 3}) {
    run_backward(c, r, threads);
    std::vector<std::vector<unsigned char>> now;
    for (OwnedTensor* t : {&r.dq, &r.dk, &r.dv, &r.grads[0]}) now.push_back(*t->bytes);
    if (first.empty()) first = now;
    else
      for (size_t i = 0; i < now.size(); ++i) EXPECT_TRUE(now[i] == first[i]) << "tensor " << i << ", threads " << threads;
  }
}

TEST(BackwardErrors, SayWhatIsWrong) {
  Case c;
  c.score_mod = "score + rel(h, q_idx - kv_idx + 17)";
  c.buffers = {{"rel", {2, 34}}};
  c.mask_mod = "document";
  BwdRun r;
  setup(c, r);
  flex_attention(r.q.view, r.k.view, r.v.view, r.out.view, &r.lse.view, r.mods, r.bind, nullptr, options(c));
  auto expect_error = [&](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const AttentionOptions opt = options(c);
  OwnedTensor g = OwnedTensor::make("g", DType::F32, {2, 34});
  OwnedTensor short_rows = OwnedTensor::make("bad", DType::F32, {1, 2, 16, 80});
  expect_error([&] {
    flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, short_rows.view, r.lse.view, r.dq.view, r.dk.view,
                            r.dv.view, r.mods, r.bind, {}, nullptr, opt);
  }, "dout must have out's shape");
  expect_error([&] {
    flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, short_rows.view, r.dk.view,
                            r.dv.view, r.mods, r.bind, {}, nullptr, opt);
  }, "dq must be an fp32 contiguous [1, 2, 17, 80]");
  expect_error([&] {
    flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, r.dq.view, r.dk.view,
                            r.dv.view, r.mods, r.bind, {{"nope", g.view}}, nullptr, opt);
  }, "buffer 'nope', which no mod reads");
  expect_error([&] {
    flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, r.dq.view, r.dk.view,
                            r.dv.view, r.mods, r.bind, {{"doc", g.view}}, nullptr, opt);
  }, "it has no gradient");
  AttentionOptions big = opt;
  big.block_m = big.block_n = 128;
  BwdRun wide;
  Case cw;
  cw.D = cw.Dv = 256;
  setup(cw, wide);
  expect_error([&] {
    flex_attention_backward(wide.q.view, wide.k.view, wide.v.view, wide.out.view, wide.dout.view, wide.lse.view,
                            wide.dq.view, wide.dk.view, wide.dv.view, wide.mods, wide.bind, {}, nullptr, big);
  }, "KiB of per-thread scratch");
  OwnedTensor g2 = OwnedTensor::make("g", DType::F32, {2, 33});
  expect_error([&] {
    flex_attention_backward(r.q.view, r.k.view, r.v.view, r.out.view, r.dout.view, r.lse.view, r.dq.view, r.dk.view,
                            r.dv.view, r.mods, r.bind, {{"rel", g2.view}}, nullptr, opt);
  }, "must be an fp32 contiguous [2, 34]");
}

}  // namespace
}  // namespace flexjit

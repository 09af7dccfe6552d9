// LABELS: numerics errors
// flexjit::flex_attention on at::Tensor against libtorch: at::scaled_dot_product_attention for
// what SDPA can express (no mod, causal, an additive bias such as ALiBi, a boolean mask), and
// plain torch ops in float64 for the log-sum-exp. fp32 and bf16, odd lengths, D = 80, GQA,
// non-contiguous inputs; and the errors of the torch entry point. Then the decode entries:
// paged_flex_attention against the contiguous flex_attention on the same keys gathered back,
// the decode kernel options, and merge_attention_states.
#include "runtime/torch/flex_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "tests/tolerances.h"

namespace flexjit {
namespace {

// Max elementwise violation of atol + rtol * |want| (<= 0 means within tolerance), plus a
// readable report of the worst element.
::testing::AssertionResult close(const at::Tensor& got, const at::Tensor& want,
                                 testing::Tolerance tol) {
  if (got.sizes() != want.sizes())
    return ::testing::AssertionFailure() << "shape " << got.sizes() << " vs " << want.sizes();
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  if (g.isnan().any().item<bool>()) return ::testing::AssertionFailure() << "NaN in output";
  at::Tensor excess = (g - w).abs() - (tol.atol + tol.rtol * w.abs());
  double worst = excess.max().item<double>();
  if (worst <= 0) return ::testing::AssertionSuccess();
  int64_t at_i = excess.flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << "element " << at_i << ": got " << g.flatten()[at_i].item<double>() << ", want "
         << w.flatten()[at_i].item<double>() << " (max abs error "
         << (g - w).abs().max().item<double>() << ")";
}

// SDPA in float32 on the inputs as the kernel sees them (already rounded to its dtype).
at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                std::optional<at::Tensor> mask = {}, bool causal = false) {
  int64_t group = q.size(1) / k.size(1);
  at::Tensor kk = k.to(at::kFloat), vv = v.to(at::kFloat);
  if (group > 1) {
    kk = kk.repeat_interleave(group, 1);
    vv = vv.repeat_interleave(group, 1);
  }
  return at::scaled_dot_product_attention(q.to(at::kFloat), kk, vv, mask, 0.0, causal);
}

// ALiBi slopes 2^(-8 (h + 1) / H), as a tensor, and the bias SDPA adds for them.
at::Tensor alibi_slopes(int64_t H) {
  return at::exp2(-8.0 * (at::arange(H, at::kDouble) + 1) / double(H)).to(at::kFloat);
}
at::Tensor alibi_bias(const at::Tensor& slopes, int64_t Lq, int64_t Lkv) {
  at::Tensor dist =
      at::arange(Lkv, at::kFloat).view({1, Lkv}) - at::arange(Lq, at::kFloat).view({Lq, 1});
  return (slopes.view({-1, 1, 1}) * dist).unsqueeze(0);  // [1, H, Lq, Lkv]
}

at::Tensor causal_mask(int64_t Lq, int64_t Lkv) {
  return at::arange(Lq).view({Lq, 1}) >= at::arange(Lkv).view({1, Lkv});
}

struct Shape {
  at::ScalarType dtype;
  int64_t B, Hq, Hkv, Lq, Lkv, D;
};

std::string name_of(const Shape& s);
void PrintTo(const Shape& s, std::ostream* os) { *os << name_of(s); }

std::string name_of(const Shape& s) {
  return std::string(s.dtype == at::kFloat ? "fp32" : "bf16") + "_B" + std::to_string(s.B) + "_H" +
         std::to_string(s.Hq) + "x" + std::to_string(s.Hkv) + "_Lq" + std::to_string(s.Lq) +
         "_Lkv" + std::to_string(s.Lkv) + "_D" + std::to_string(s.D);
}

struct Inputs {
  at::Tensor q, k, v;
};

Inputs make_inputs(const Shape& s, uint64_t seed, bool blhd = false) {
  at::manual_seed(seed);
  auto make = [&](int64_t H, int64_t L) {
    if (!blhd) return at::randn({s.B, H, L, s.D}).to(s.dtype);
    return at::randn({s.B, L, H, s.D})
        .to(s.dtype)
        .transpose(1, 2);  // non-contiguous [B, H, L, D] view
  };
  Inputs in{make(s.Hq, s.Lq), make(s.Hkv, s.Lkv), make(s.Hkv, s.Lkv)};
  return in;
}

DType flex_dtype(at::ScalarType t) { return t == at::kFloat ? DType::F32 : DType::BF16; }

class TorchVsSdpa : public ::testing::TestWithParam<Shape> {
 protected:
  FlexOptions opt() const {
    FlexOptions o;
    o.enable_gqa = GetParam().Hq != GetParam().Hkv;
    return o;
  }
  testing::Tolerance tol() const { return testing::output_tolerance(flex_dtype(GetParam().dtype)); }
};

TEST_P(TorchVsSdpa, NoMod) {
  const Shape& s = GetParam();
  Inputs in = make_inputs(s, 1);
  FlexResult r = flex_attention(in.q, in.k, in.v, {}, nullptr, opt());
  EXPECT_EQ(r.out.scalar_type(), s.dtype);
  EXPECT_EQ(r.out.sizes(), in.q.sizes());
  EXPECT_FALSE(r.lse.defined());
  EXPECT_TRUE(close(r.out, sdpa(in.q, in.k, in.v), tol()));
}

TEST_P(TorchVsSdpa, CausalBlockMask) {
  const Shape& s = GetParam();
  Inputs in = make_inputs(s, 2);
  TorchBlockMask causal = create_block_mask(mask_mod("causal"), s.B, s.Hq, s.Lq, s.Lkv);
  FlexResult r = flex_attention(in.q, in.k, in.v, {}, &causal, opt());
  if (s.Lq == s.Lkv) EXPECT_TRUE(close(r.out, sdpa(in.q, in.k, in.v, {}, /*causal=*/true), tol()));
  EXPECT_TRUE(close(r.out, sdpa(in.q, in.k, in.v, causal_mask(s.Lq, s.Lkv)), tol()));
  // A smaller mask block size gives the same result (up to the output rounding: other kernel
  // blocks sum in another order).
  TorchBlockMask small = create_block_mask(mask_mod("causal"), s.B, s.Hq, s.Lq, s.Lkv, 16, 32);
  EXPECT_TRUE(close(flex_attention(in.q, in.k, in.v, {}, &small, opt()).out, r.out, tol()));
}

TEST_P(TorchVsSdpa, AlibiAsAdditiveBias) {
  const Shape& s = GetParam();
  Inputs in = make_inputs(s, 3);
  at::Tensor slopes = alibi_slopes(s.Hq);
  FlexResult r =
      flex_attention(in.q, in.k, in.v, score_mod("alibi", {{"slopes", slopes}}), nullptr, opt());
  EXPECT_TRUE(close(r.out, sdpa(in.q, in.k, in.v, alibi_bias(slopes, s.Lq, s.Lkv)), tol()));
  // Without the slopes given, the registered mod makes the same geometric slopes itself.
  FlexResult d = flex_attention(in.q, in.k, in.v, score_mod("alibi"), nullptr, opt());
  EXPECT_TRUE(close(d.out, r.out, {1e-6, 1e-6}));
  // As expression text, with ALiBi and causal together.
  TorchBlockMask causal = create_block_mask(mask_mod("q_idx >= kv_idx"), s.B, s.Hq, s.Lq, s.Lkv);
  FlexResult t = flex_attention(
      in.q, in.k, in.v, score_mod("score + slopes[h] * (kv_idx - q_idx)", {{"slopes", slopes}}),
      &causal, opt());
  at::Tensor bias = alibi_bias(slopes, s.Lq, s.Lkv)
                        .masked_fill(causal_mask(s.Lq, s.Lkv).logical_not(), -INFINITY);
  EXPECT_TRUE(close(t.out, sdpa(in.q, in.k, in.v, bias), tol()));
}

std::vector<Shape> shapes() {
  std::vector<Shape> out;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    out.push_back({dt, 2, 3, 3, 17, 17, 64});
    out.push_back({dt, 1, 2, 2, 129, 129, 80});
    out.push_back({dt, 2, 6, 2, 129, 17, 80});  // GQA group 3, Lq != Lkv
    out.push_back({dt, 1, 3, 1, 17, 129, 32});  // MQA
  }
  return out;
}
INSTANTIATE_TEST_SUITE_P(Torch, TorchVsSdpa, ::testing::ValuesIn(shapes()),
                         [](const auto& info) { return name_of(info.param); });

TEST(Torch, NonContiguousInputs) {
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    Shape s{dt, 2, 4, 2, 97, 129, 80};
    Inputs in = make_inputs(s, 4, /*blhd=*/true);
    ASSERT_FALSE(in.q.is_contiguous());
    FlexOptions o;
    o.enable_gqa = true;
    TorchBlockMask causal = create_block_mask(mask_mod("causal"), s.B, s.Hq, s.Lq, s.Lkv);
    FlexResult r = flex_attention(in.q, in.k, in.v, {}, &causal, o);
    EXPECT_TRUE(r.out.is_contiguous());
    EXPECT_TRUE(close(r.out, sdpa(in.q, in.k, in.v, causal_mask(s.Lq, s.Lkv)),
                      testing::output_tolerance(flex_dtype(dt))));
    // Same as the contiguous copies.
    FlexResult c =
        flex_attention(in.q.contiguous(), in.k.contiguous(), in.v.contiguous(), {}, &causal, o);
    EXPECT_TRUE(close(r.out, c.out, {1e-6, 1e-6}));
  }
}

// log-sum-exp of the scaled, modded, masked scores, in float64 with torch ops.
at::Tensor torch_lse(const at::Tensor& q, const at::Tensor& k, std::optional<at::Tensor> bias,
                     double scale) {
  at::Tensor kk = k.to(at::kDouble).repeat_interleave(q.size(1) / k.size(1), 1);
  at::Tensor scores = at::matmul(q.to(at::kDouble), kk.transpose(-2, -1)) * scale;
  if (bias) scores = scores + bias->to(at::kDouble);
  return at::logsumexp(scores, -1);
}

TEST(Torch, ReturnLse) {
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    Shape s{dt, 2, 6, 2, 129, 97, 80};
    Inputs in = make_inputs(s, 5);
    FlexOptions o;
    o.enable_gqa = true;
    o.return_lse = true;
    FlexResult r = flex_attention(in.q, in.k, in.v, {}, nullptr, o);
    ASSERT_TRUE(r.lse.defined());
    EXPECT_EQ(r.lse.scalar_type(), at::kFloat);
    EXPECT_EQ(r.lse.sizes(), (std::vector<int64_t>{2, 6, 129}));
    testing::Tolerance lt = testing::kLseTolerance;
    if (dt != at::kFloat) lt.atol += 1e-4;
    EXPECT_TRUE(close(r.lse, torch_lse(in.q, in.k, {}, 1.0 / std::sqrt(80.0)), lt));
    // With a scale, ALiBi and a causal mask: masked scores are -inf in the logsumexp.
    o.scale = 0.05;
    at::Tensor slopes = alibi_slopes(6);
    TorchBlockMask causal = create_block_mask(mask_mod("causal"), 2, 6, 129, 97);
    FlexResult m =
        flex_attention(in.q, in.k, in.v, score_mod("alibi", {{"slopes", slopes}}), &causal, o);
    at::Tensor bias =
        alibi_bias(slopes, 129, 97).masked_fill(causal_mask(129, 97).logical_not(), -INFINITY);
    EXPECT_TRUE(close(m.lse, torch_lse(in.q, in.k, bias, 0.05), lt));
    EXPECT_TRUE(close(
        m.out,
        [&] {
          at::Tensor kk = in.k.to(at::kFloat).repeat_interleave(3, 1),
                     vv = in.v.to(at::kFloat).repeat_interleave(3, 1);
          return at::scaled_dot_product_attention(in.q.to(at::kFloat), kk, vv, bias, 0.0, false,
                                                  0.05);
        }(),
        testing::output_tolerance(flex_dtype(dt))));
  }
}

TEST(Torch, BufferMasks) {
  // A document mask from an int tensor, and a key-keep mask from a bool tensor.
  const int64_t L = 97;
  Shape s{at::kFloat, 2, 2, 2, L, L, 32};
  Inputs in = make_inputs(s, 6);
  at::Tensor doc = at::div(at::arange(L, at::kInt), 20, "floor").to(at::kInt);
  TorchBlockMask dm = create_block_mask(mask_mod("document", {{"doc", doc}}), 2, 2, L, L, 32, 32);
  at::Tensor same_doc = doc.view({L, 1}) == doc.view({1, L});
  EXPECT_TRUE(close(flex_attention(in.q, in.k, in.v, {}, &dm).out, sdpa(in.q, in.k, in.v, same_doc),
                    testing::output_tolerance(DType::F32)));
  at::Tensor keep = at::arange(L) % 3 != 1;
  TorchBlockMask km = create_block_mask(mask_mod("keep[kv_idx]", {{"keep", keep}}), 2, 2, L, L);
  EXPECT_TRUE(close(flex_attention(in.q, in.k, in.v, {}, &km).out,
                    sdpa(in.q, in.k, in.v, keep.view({1, L})),
                    testing::output_tolerance(DType::F32)));
}

TEST(Torch, RegisteredMaskWithExampleBuffersOutlivesItsBuilder) {
  // key_padding without a kv_len tensor: the example lengths max(1, Lkv - 13 b - (b odd ? Lkv / 3 :
  // 0)) are made for the shape and kept alive by the TorchBlockMask.
  const int64_t B = 2, L = 60;
  Shape s{at::kFloat, B, 2, 2, L, L, 32};
  Inputs in = make_inputs(s, 7);
  TorchBlockMask km = [&] {
    return create_block_mask(mask_mod("key_padding"), B, 2, L, L, 16, 16);
  }();
  EXPECT_EQ(km.mask.B, B);
  at::Tensor mask = at::zeros({B, 1, L, L}, at::kBool);
  for (int64_t b = 0; b < B; ++b) {
    int64_t len = std::max<int64_t>(1, L - 13 * b - (b % 2 ? L / 3 : 0));
    mask.index_put_({b, 0, at::indexing::Slice(), at::indexing::Slice(0, len)}, true);
  }
  EXPECT_TRUE(close(flex_attention(in.q, in.k, in.v, {}, &km).out, sdpa(in.q, in.k, in.v, mask),
                    testing::output_tolerance(DType::F32)));
}

// Passing more tensors than a mod reads must not shift which tensor each name is bound to.
TEST(Torch, ExtraBuffersDoNotShiftBindings) {
  Shape s{at::kFloat, 1, 2, 2, 17, 17, 32};
  Inputs in = make_inputs(s, 8);
  at::Tensor slopes = alibi_slopes(2);
  at::Tensor unrelated = at::full({2}, 100.0f);
  FlexResult r = flex_attention(in.q, in.k, in.v,
                                score_mod("alibi", {{"aaa", unrelated}, {"slopes", slopes}}));
  EXPECT_TRUE(close(r.out, sdpa(in.q, in.k, in.v, alibi_bias(slopes, 17, 17)),
                    testing::output_tolerance(DType::F32)))
      << "'slopes' read the tensor passed as 'aaa'";
}

// ---- errors ----

template <typename F>
void expect_error(F&& f, const std::string& substring) {
  try {
    f();
    ADD_FAILURE() << "no error; wanted '" << substring << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a flexjit::Error: " << e.what();
  }
}

TEST(Torch, Errors) {
  at::manual_seed(9);
  at::Tensor q = at::randn({1, 2, 16, 32}), k = at::randn({1, 2, 16, 32}),
             v = at::randn({1, 2, 16, 32});
  expect_error([&] { flex_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble)); },
               "q has dtype fp64");
  expect_error([&] { flex_attention(q[0], k, v); }, "must be 4-D");
  expect_error([&] { flex_attention(q, k.to(at::kBFloat16), v); }, "q, k, v must share a dtype");
  expect_error([&] { flex_attention(q, k, v.to(at::kHalf)); }, "must share a dtype");
  expect_error([&] { flex_attention(q.to(at::kInt), k, v); }, "int32");
  expect_error([&] { flex_attention(q.to(at::kComplexFloat), k, v); }, "has dtype");
  expect_error([&] { flex_attention(at::randn({1, 4, 16, 32}), k, v); }, "enable_gqa=true");
  FlexOptions o;
  o.kernel_options = {{"BLOCK_Q", 16}};
  expect_error([&] { flex_attention(q, k, v, {}, nullptr, o); }, "unknown kernel option 'BLOCK_Q'");
  expect_error([&] { create_block_mask(score_mod("alibi"), 1, 2, 16, 16); }, "needs a mask_mod");
  expect_error([&] { mask_mod("alibi"); }, "'alibi' is a score_mod, not a mask_mod");
  expect_error([&] { score_mod("score +"); }, "at column 8");
  TorchBlockMask other = create_block_mask(mask_mod("causal"), 1, 2, 8, 8, 4, 4);
  expect_error([&] { flex_attention(q, k, v, {}, &other); }, "rebuild it for these lengths");
  // After the errors, a valid call works.
  EXPECT_TRUE(
      close(flex_attention(q, k, v).out, sdpa(q, k, v), testing::output_tolerance(DType::F32)));
}

// A mod registered from a traced lambda keeps its captured tensor when looked up by name
// (score_mod("name") once dropped the traced bindings and failed with "no tensor is bound").
TEST(Torch, RegisteredTracedModKeepsItsCapturedTensor) {
  at::Tensor q = at::randn({1, 2, 33, 32}), k = at::randn({1, 2, 33, 32}), v = at::randn({1, 2, 33, 32});
  at::Tensor slopes = at::tensor({0.5f, 0.25f});
  auto bias = capture_tensor("slopes", slopes);
  register_score_mod("test_traced_alibi", [&](auto score, auto b, auto h, auto q_idx, auto kv_idx) {
    return score + bias[h] * (kv_idx - q_idx);
  });
  at::Tensor out = flex_attention(q, k, v, score_mod("test_traced_alibi")).out;
  at::Tensor pos = at::arange(33, at::kFloat);
  at::Tensor mask = slopes.view({2, 1, 1}) * (pos.view({1, 33}) - pos.view({33, 1}));
  EXPECT_TRUE(close(out, at::scaled_dot_product_attention(q, k, v, mask), testing::output_tolerance(DType::F32)));
}

// ---- paged KV ----

// A paged cache holding sequences of `lens` keys: pages in shuffled order, NaN in every page and
// slot no sequence owns, -1 in the table past each sequence. k_full / v_full [B, Hkv, max_len, D]
// hold the same keys contiguously (the slots past each end are random: the callers slice them off).
struct PagedCache {
  at::Tensor k_cache, v_cache, block_table, seq_lens, k_full, v_full;
};
PagedCache make_paged_cache(at::ScalarType dt, const std::vector<int64_t>& lens, int64_t Hkv, int64_t D,
                            int64_t page_size, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t B = int64_t(lens.size()), max_len = *std::max_element(lens.begin(), lens.end());
  const int64_t max_pages = (max_len + page_size - 1) / page_size + 1;
  int64_t used = 0;
  for (int64_t n : lens) used += (n + page_size - 1) / page_size;
  const int64_t pages = used + 3;
  PagedCache c;
  c.k_full = at::randn({B, Hkv, max_len, D}).to(dt);
  c.v_full = at::randn({B, Hkv, max_len, D}).to(dt);
  c.k_cache = at::full({pages, page_size, Hkv, D}, NAN, at::TensorOptions().dtype(dt));
  c.v_cache = at::full({pages, page_size, Hkv, D}, NAN, at::TensorOptions().dtype(dt));
  c.block_table = at::full({B, max_pages}, -1, at::kInt);
  c.seq_lens = at::tensor(std::vector<int32_t>(lens.begin(), lens.end()), at::kInt);
  at::Tensor order = at::randperm(pages, at::kLong);
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p * page_size < lens[size_t(b)]; ++p) {
      const int64_t page = order[next++].item<int64_t>(), n = std::min(page_size, lens[size_t(b)] - p * page_size);
      c.block_table.index_put_({b, p}, int32_t(page));
      c.k_cache[page].narrow(0, 0, n).copy_(c.k_full[b].narrow(1, p * page_size, n).transpose(0, 1));
      c.v_cache[page].narrow(0, 0, n).copy_(c.v_full[b].narrow(1, p * page_size, n).transpose(0, 1));
    }
  return c;
}

// Sequence b of a paged call as a contiguous call of its own, on the prefill kernel (a different
// kernel from the paged one): queries at rows 0..Lq-1, so the mods add off = len - Lq to q_idx
// to see the absolute positions the paged call's mods see.
FlexResult contiguous_alibi_causal(const at::Tensor& q, const PagedCache& c, const at::Tensor& slopes, int64_t b,
                                   int64_t len) {
  const int64_t Hq = q.size(1), Lq = q.size(2);
  const double off = double(len - Lq);
  ModRef alibi = score_mod("score + slopes[h] * (kv_idx - (q_idx + off))", {{"slopes", slopes}}, {{"off", off}});
  TorchBlockMask causal = create_block_mask(mask_mod("q_idx + off >= kv_idx", {}, {{"off", off}}), 1, Hq, Lq, len);
  FlexOptions o;
  o.enable_gqa = true;
  o.return_lse = true;
  o.kernel_options["FORCE_USE_FLEX_ATTENTION"] = 1;
  AttentionReport rep;
  o.report = &rep;
  FlexResult r = flex_attention(q.narrow(0, b, 1), c.k_full.narrow(0, b, 1).narrow(2, 0, len),
                                c.v_full.narrow(0, b, 1).narrow(2, 0, len), alibi, &causal, o);
  EXPECT_EQ(rep.path, "prefill");
  return r;
}

// flexjit::flex_attention_backward against libtorch autograd through plain ops (float64): a
// learnable per-head bias and a causal BlockMask, GQA group 3, D 80, odd length, fp32 and bf16.
TEST(TorchBackward, MatchesAutogradOfPlainOps) {
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(std::string(c10::toString(dt)));
    const int64_t B = 2, Hq = 6, Hkv = 2, L = 97, D = 80;
    at::manual_seed(7);
    at::Tensor q = at::randn({B, Hq, L, D}).to(dt), k = at::randn({B, Hkv, L, D}).to(dt),
               v = at::randn({B, Hkv, L, D}).to(dt), g = at::randn({B, Hq, L, D}).to(dt);
    at::Tensor bias = at::randn({Hq});
    ModRef sm = score_mod("score + bias[h] * (kv_idx - q_idx) / 16", {{"bias", bias}});
    TorchBlockMask mask = create_block_mask(mask_mod("causal"), 1, 1, L, L);
    FlexOptions o;
    o.enable_gqa = true;
    o.return_lse = true;
    FlexResult fwd = flex_attention(q, k, v, sm, &mask, o);
    FlexGrads gr = flex_attention_backward(g, q, k, v, fwd.out, fwd.lse, sm, &mask, o, {"bias"});
    EXPECT_EQ(gr.dq.scalar_type(), dt);
    EXPECT_EQ(gr.buffers.at("bias").scalar_type(), at::kFloat);

    // The same in float64 plain ops, differentiated by autograd.
    at::Tensor q64 = q.to(at::kDouble).requires_grad_(), k64 = k.to(at::kDouble).requires_grad_(),
               v64 = v.to(at::kDouble).requires_grad_(), b64 = bias.to(at::kDouble).requires_grad_();
    at::Tensor ke = k64.repeat_interleave(Hq / Hkv, 1), ve = v64.repeat_interleave(Hq / Hkv, 1);
    at::Tensor pos = at::arange(L, at::kDouble);
    at::Tensor rel = (pos.view({1, L}) - pos.view({L, 1})) / 16;  // kv_idx - q_idx
    at::Tensor s = at::matmul(q64, ke.transpose(-2, -1)) / std::sqrt(double(D)) + b64.view({1, Hq, 1, 1}) * rel;
    s = s.masked_fill(at::ones({L, L}, at::kBool).triu(1), -INFINITY);
    at::Tensor out = at::matmul(at::softmax(s, -1), ve);
    out.backward(g.to(at::kDouble));
    const testing::Tolerance tol = testing::gradient_tolerance(dt == at::kFloat ? DType::F32 : DType::BF16);
    auto scaled = [&](const at::Tensor& want) {
      return testing::Tolerance{tol.atol * std::max(1.0, want.abs().max().item<double>()), tol.rtol};
    };
    // bf16 gradients are rounded to bf16 on return: allow that rounding on top.
    const double round = dt == at::kFloat ? 0 : 8e-3;
    for (auto [got, want] : {std::pair{gr.dq, q64.grad()}, {gr.dk, k64.grad()}, {gr.dv, v64.grad()},
                             {gr.buffers.at("bias"), b64.grad()}}) {
      testing::Tolerance t = scaled(want);
      t.rtol += round;
      EXPECT_TRUE(close(got, want, t));
    }
  }
}

TEST(TorchBackward, Errors) {
  at::Tensor q = at::randn({1, 2, 17, 16}), k = at::randn({1, 2, 17, 16}), v = at::randn({1, 2, 17, 16});
  FlexOptions o;
  o.return_lse = true;
  FlexResult f = flex_attention(q, k, v, {}, nullptr, o);
  EXPECT_THROW(
      {
        try {
          flex_attention_backward(f.out, q, k, v, f.out, f.lse, score_mod("score * 2"), nullptr, o, {"nope"});
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("buffer 'nope', which no mod reads"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
  EXPECT_THROW(flex_attention_backward(f.out, q, k, v, f.out, f.lse.unsqueeze(0), {}, nullptr, o), Error);
}

TEST(TorchPaged, MatchesContiguousFlexAttentionOnGatheredKeys) {
  const std::vector<int64_t> lens = {300, 77, 0, 129};
  const int64_t B = int64_t(lens.size()), Hq = 8, Hkv = 2, D = 64;
  const at::Tensor slopes = alibi_slopes(Hq);
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16})
    for (int64_t page_size : {16, 64})
      for (int64_t Lq : {1, 4}) {
        SCOPED_TRACE(std::string(dt == at::kFloat ? "fp32" : "bf16") + " page " + std::to_string(page_size) +
                     " Lq " + std::to_string(Lq));
        PagedCache c = make_paged_cache(dt, lens, Hkv, D, page_size, 11);
        at::Tensor q = at::randn({B, Hq, Lq, D}).to(dt);
        FlexOptions o;
        o.enable_gqa = true;
        o.return_lse = true;
        AttentionReport rep;
        o.report = &rep;
        FlexResult r = paged_flex_attention(q, c.k_cache, c.v_cache, c.block_table, c.seq_lens,
                                            score_mod("alibi", {{"slopes", slopes}}), mask_mod("causal"), o);
        EXPECT_EQ(rep.path, "decode");
        EXPECT_TRUE(rep.paged);
        EXPECT_EQ(rep.partition_size % page_size, 0);
        ASSERT_EQ(r.out.sizes(), q.sizes());
        EXPECT_EQ(r.out.scalar_type(), dt);
        ASSERT_EQ(r.lse.sizes(), (std::vector<int64_t>{B, Hq, Lq}));
        testing::Tolerance lt = testing::kLseTolerance;
        if (dt != at::kFloat) lt.atol += 1e-4;
        for (int64_t b = 0; b < B; ++b) {
          SCOPED_TRACE("sequence " + std::to_string(b));
          if (lens[size_t(b)] == 0) {  // an unused slot
            EXPECT_TRUE(r.out[b].eq(0).all().item<bool>());
            EXPECT_TRUE(r.lse[b].eq(-INFINITY).all().item<bool>());
            continue;
          }
          FlexResult want = contiguous_alibi_causal(q, c, slopes, b, lens[size_t(b)]);
          EXPECT_TRUE(close(r.out[b], want.out[0], testing::output_tolerance(flex_dtype(dt))));
          EXPECT_TRUE(close(r.lse[b], want.lse[0], lt));
        }
        // PARTITION_SIZE as a kernel option: the longest sequence splits into 5 partitions, merged
        // after; the numbers stay the same up to the summation order.
        o.kernel_options["PARTITION_SIZE"] = 64;
        FlexResult split = paged_flex_attention(q, c.k_cache, c.v_cache, c.block_table, c.seq_lens,
                                                score_mod("alibi", {{"slopes", slopes}}), mask_mod("causal"), o);
        EXPECT_EQ(rep.partition_size, 64);
        EXPECT_EQ(rep.num_partitions, 5);
        EXPECT_EQ(rep.tuning, "user");
        EXPECT_TRUE(close(split.out, r.out, dt == at::kFloat ? testing::Tolerance{1e-5, 1e-5}
                                                              : testing::output_tolerance(DType::BF16)));
        EXPECT_TRUE(close(split.lse.masked_fill(split.lse.isinf(), 0), r.lse.masked_fill(r.lse.isinf(), 0),
                          {1e-5, 1e-5}));
      }
}

TEST(TorchPaged, RegisteredModMakesBuffersForAbsolutePositions) {
  // alibi without slopes: the registered mod makes them for Hq (not Hkv) heads, as given here.
  PagedCache c = make_paged_cache(at::kFloat, {200, 33}, 2, 32, 16, 12);
  at::Tensor q = at::randn({2, 6, 4, 32});
  FlexOptions o;
  o.enable_gqa = true;
  at::Tensor made = paged_flex_attention(q, c.k_cache, c.v_cache, c.block_table, c.seq_lens, score_mod("alibi"),
                                         mask_mod("causal"), o).out;
  at::Tensor given = paged_flex_attention(q, c.k_cache, c.v_cache, c.block_table, c.seq_lens,
                                          score_mod("alibi", {{"slopes", alibi_slopes(6)}}), mask_mod("causal"), o)
                         .out;
  EXPECT_TRUE(close(made, given, {1e-6, 1e-6}));
}

TEST(TorchPaged, Errors) {
  PagedCache c = make_paged_cache(at::kFloat, {40, 20}, 2, 32, 16, 13);
  at::Tensor q = at::randn({2, 2, 4, 32});
  auto call = [&](const at::Tensor& qq, const at::Tensor& table, const at::Tensor& lens, FlexOptions o = {},
                  const ModRef& sm = {}, const ModRef& mm = {}) {
    return paged_flex_attention(qq, c.k_cache, c.v_cache, table, lens, sm, mm, o);
  };
  at::Tensor bad = c.block_table.clone();
  bad.index_put_({0, 1}, 9999);
  expect_error([&] { call(q, bad, c.seq_lens); }, "block_table[0, 1] = 9999 is not a page of the cache");
  expect_error([&] { call(q, c.block_table, at::tensor({40, 3}, at::kInt)); },
               "seq_lens[1] = 3 is less than the query length Lq=4");
  expect_error([&] { call(q, c.block_table.to(at::kLong), c.seq_lens); },
               "block_table has dtype int64; it must be int32");
  expect_error([&] { call(q, c.block_table, c.seq_lens.to(at::kLong)); }, "seq_lens has dtype int64");
  expect_error([&] { call(at::randn({2, 2, 17, 32}), c.block_table, c.seq_lens); }, "up to 16 query rows");
  expect_error([&] { call(q[0], c.block_table, c.seq_lens); }, "q must be 4-D [B, Hq, Lq, D]");
  expect_error([&] { call(q, c.block_table, c.seq_lens, {}, mask_mod("causal")); },
               "score_mod is a mask_mod; pass it as mask_mod");
  FlexOptions o;
  o.kernel_options["FORCE_USE_FLEX_ATTENTION"] = 1;
  expect_error([&] { call(q, c.block_table, c.seq_lens, o); }, "FORCE_USE_FLEX_ATTENTION has no paged form");
  o.kernel_options = {{"PARTITION_SIZE", -16}};
  expect_error([&] { call(q, c.block_table, c.seq_lens, o); }, "PARTITION_SIZE must be >= 0");
  o.kernel_options = {{"PARTITION_SIZE", 24}};
  expect_error([&] { call(q, c.block_table, c.seq_lens, o); }, "must be a multiple of the page size 16");
  o.kernel_options = {{"PARTITION", 64}};
  expect_error([&] { call(q, c.block_table, c.seq_lens, o); },
               "known: BLOCK_M, BLOCK_N, USE_AMX, USE_DPBF16, PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION");
  // After the errors, a valid call works.
  EXPECT_EQ(call(q, c.block_table, c.seq_lens).out.sizes(), q.sizes());
}

TEST(Torch, ForceUseFlexAttentionRunsThePrefillKernel) {
  // A decode shape on contiguous K/V: the decode kernel by default, the prefill kernel with the
  // option; the same result either way.
  at::manual_seed(14);
  at::Tensor q = at::randn({2, 8, 1, 64}), k = at::randn({2, 2, 700, 64}), v = at::randn({2, 2, 700, 64});
  FlexOptions o;
  o.enable_gqa = true;
  o.return_lse = true;
  AttentionReport rep;
  o.report = &rep;
  FlexResult decode = flex_attention(q, k, v, score_mod("alibi"), nullptr, o);
  EXPECT_EQ(rep.path, "decode");
  o.kernel_options["FORCE_USE_FLEX_ATTENTION"] = 1;
  FlexResult prefill = flex_attention(q, k, v, score_mod("alibi"), nullptr, o);
  EXPECT_EQ(rep.path, "prefill");
  EXPECT_TRUE(close(prefill.out, decode.out, {1e-5, 1e-5}));
  EXPECT_TRUE(close(prefill.lse, decode.lse, {1e-5, 1e-5}));
  o.kernel_options = {{"FORCE_USE_FLEX_ATTENTION", 2}};
  expect_error([&] { flex_attention(q, k, v, {}, nullptr, o); }, "FORCE_USE_FLEX_ATTENTION must be 0 or 1");
}

// ---- merging attention states ----

TEST(TorchMerge, TwoKvHalvesMakeTheWhole) {
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(dt == at::kFloat ? "fp32" : "bf16");
    at::manual_seed(15);
    const int64_t split = 200;
    at::Tensor q = at::randn({2, 3, 5, 40}).to(dt), k = at::randn({2, 3, 300, 40}).to(dt),
               v = at::randn({2, 3, 300, 40}).to(dt);
    // Row 3 keeps no key at all; row 4 only keys >= split, so the first half keeps none of its.
    auto run = [&](int64_t begin, int64_t end) {
      const double off = double(begin);
      TorchBlockMask m = create_block_mask(
          mask_mod("q_idx != 3 && (q_idx != 4 || kv_idx + off >= 200)", {}, {{"off", off}}), 2, 3, 5, end - begin);
      FlexOptions o;
      o.return_lse = true;
      return flex_attention(q, k.narrow(2, begin, end - begin), v.narrow(2, begin, end - begin), {}, &m, o);
    };
    FlexResult whole = run(0, 300), a = run(0, split), b = run(split, 300);
    ASSERT_TRUE(a.lse.select(2, 4).eq(-INFINITY).all().item<bool>());
    a.out.select(2, 4).fill_(NAN);  // a state that kept nothing must not be read
    auto [out, lse] = merge_attention_states(a.out, a.lse, b.out, b.lse);
    EXPECT_EQ(out.scalar_type(), dt);
    EXPECT_EQ(lse.scalar_type(), at::kFloat);
    // bf16: the merged out is rounded once more than the whole's.
    EXPECT_TRUE(close(out, whole.out, dt == at::kFloat ? testing::output_tolerance(DType::F32)
                                                        : testing::Tolerance{1.6e-2, 1.6e-2}));
    EXPECT_TRUE(out.select(2, 3).eq(0).all().item<bool>());
    EXPECT_TRUE(lse.select(2, 3).eq(-INFINITY).all().item<bool>());
    EXPECT_TRUE(close(lse.masked_fill(lse.isinf(), 0), whole.lse.masked_fill(whole.lse.isinf(), 0),
                      testing::kLseTolerance));
    // The inputs are untouched, and strided views merge the same.
    EXPECT_TRUE(a.out.select(2, 4).isnan().all().item<bool>());
    at::Tensor strided = a.out.transpose(1, 2).contiguous().transpose(1, 2);
    ASSERT_FALSE(strided.is_contiguous());
    auto [out_s, lse_s] = merge_attention_states(strided, a.lse, b.out, b.lse);
    EXPECT_TRUE(at::equal(out_s, out));
    EXPECT_TRUE(at::equal(lse_s, lse));
  }
}

TEST(TorchMerge, Errors) {
  at::Tensor o = at::randn({2, 3, 5, 8}), l = at::randn({2, 3, 5});
  expect_error([&] { merge_attention_states(o, l, o, l.narrow(2, 0, 4)); }, "lse_b must be fp32 [2, 3, 5]");
  expect_error([&] { merge_attention_states(o, l, o.narrow(1, 0, 2), l); }, "out_b must have out_a's shape");
  expect_error([&] { merge_attention_states(o, l, o.to(at::kBFloat16), l); }, "must share a dtype");
  expect_error([&] { merge_attention_states(o, l.to(at::kDouble), o, l); }, "lse_a must be fp32");
  expect_error([&] { merge_attention_states(o.unsqueeze(0).unsqueeze(0), l, o, l); }, "at most 4 are supported");
}

}  // namespace
}  // namespace flexjit

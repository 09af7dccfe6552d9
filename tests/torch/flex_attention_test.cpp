// LABELS: numerics errors
// flexjit::flex_attention on at::Tensor against libtorch: at::scaled_dot_product_attention for
// what SDPA can express (no mod, causal, an additive bias such as ALiBi, a boolean mask), and
// plain torch ops in float64 for the log-sum-exp. fp32 and bf16, odd lengths, D = 80, GQA,
// non-contiguous inputs; and the errors of the torch entry point.
#include "runtime/torch/flex_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

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

}  // namespace
}  // namespace flexjit

// LABELS: unit
// Tracing C++ generic lambdas into the mod IR: the traced tree is the parsed tree of the same
// expression, captured buffers and params are recorded with their bindings, combine() merges a
// score_mod and a mask_mod, and validate() rejects ill-formed mod sets.
#include "jit/trace.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "jit/parser.h"

namespace flexjit {
namespace {

using ir::Type;

// Small buffers the lambdas capture. Views point into the fixture's vectors.
struct Buffers {
  std::vector<float> slopes = {0.5f, 0.25f, 0.125f, 0.0625f};
  std::vector<int32_t> doc = {0, 0, 1, 1, 1, 2};
  std::vector<float> bias2 = {0, 1, 2, 10, 11, 12};
  std::vector<float> rel_bias = std::vector<float>(257, 0.5f);
  TensorView slopes_v = contiguous_view(slopes.data(), DType::F32, {4});
  TensorView doc_v = contiguous_view(doc.data(), DType::I32, {6});
  TensorView bias2_v = contiguous_view(bias2.data(), DType::F32, {2, 3});
  TensorView rel_bias_v = contiguous_view(rel_bias.data(), DType::F32, {257});
};

ParseScope scope_for(bool mask) {
  ParseScope s;
  s.allow_score = !mask;
  s.buffers = {{"slopes", DType::F32, 1},
               {"doc", DType::I32, 1},
               {"bias2", DType::F32, 2},
               {"rel_bias", DType::F32, 1}};
  s.params = {{"cap"}, {"window"}, {"prefix"}};
  return s;
}

// The text a mod kind's parse gives, with the same final cast the tracer applies.
std::string parsed(const std::string& text, bool mask) {
  ir::Expr e = parse_expr(text, scope_for(mask), mask ? "mask_mod" : "score_mod");
  return ir::to_string(ir::cast(e, mask ? Type::Bool : Type::Float));
}

TEST(Trace, ScoreModsMatchTheParser) {
  Buffers bufs;
  auto slopes = capture("slopes", bufs.slopes_v);
  auto bias2 = capture("bias2", bufs.bias2_v);
  auto rel_bias = capture("rel_bias", bufs.rel_bias_v);
  auto cap = scalar_param("cap", 20.0);
  auto same = [](const TracedMod& t, const std::string& text) {
    ASSERT_TRUE(t.expr);
    EXPECT_EQ(t.expr->type, Type::Float) << text;
    EXPECT_EQ(ir::to_string(t.expr), parsed(text, false)) << text;
  };
  same(trace_score_mod([](auto s, auto, auto, auto, auto) { return s; }), "score");
  same(trace_score_mod([](auto s, auto, auto, auto, auto) { return s * 2; }), "score * 2");
  same(trace_score_mod([](auto s, auto, auto, auto, auto) { return 2 * s + 1; }), "2 * score + 1");
  same(trace_score_mod([](auto s, auto, auto, auto, auto) { return s * 0.5; }), "score * 0.5");
  same(trace_score_mod(
           [&](auto s, auto, auto h, auto q, auto kv) { return s + slopes[h] * (kv - q); }),
       "score + slopes[h] * (kv_idx - q_idx)");
  same(trace_score_mod([&](auto s, auto, auto, auto, auto) { return cap * tanh(s / cap); }),
       "cap * tanh(score / cap)");
  same(trace_score_mod([&](auto s, auto, auto, auto q, auto kv) {
         return s + rel_bias[min(max(kv - q, -128), 128) + 128];
       }),
       "score + rel_bias[min(max(kv_idx - q_idx, -128), 128) + 128]");
  same(trace_score_mod([&](auto s, auto b, auto h, auto, auto) { return s + bias2(b, h); }),
       "score + bias2(b, h)");
  same(trace_score_mod(
           [](auto s, auto, auto, auto q, auto kv) { return where(q >= kv, s, -s * 0.5); }),
       "where(q_idx >= kv_idx, score, -score * 0.5)");
  same(trace_score_mod(
           [](auto s, auto, auto, auto q, auto kv) { return s + to_float((q - kv) / 3); }),
       "score + float((q_idx - kv_idx) / 3)");
  same(trace_score_mod([](auto s, auto, auto, auto q, auto kv) { return s - abs(q - kv) % 7; }),
       "score - abs(q_idx - kv_idx) % 7");
  same(trace_score_mod([](auto s, auto, auto, auto, auto) {
         return s * sigmoid(s) + exp(s) - log2(abs(s) + 1) + sqrt(exp2(s)) * rsqrt(s * s + 1);
       }),
       "score * sigmoid(score) + exp(score) - log2(abs(score) + 1) + sqrt(exp2(score)) * "
       "rsqrt(score * score + 1)");
  same(trace_score_mod([](auto s, auto, auto, auto, auto) {
         return floor(s) + ceil(s) + sin(s) * cos(s) + tan(s);
       }),
       "floor(score) + ceil(score) + sin(score) * cos(score) + tan(score)");
  same(trace_score_mod([](auto s, auto, auto, auto q, auto) { return s + to_int(s) * q; }),
       "score + int(score) * q_idx");
  // An int result is converted to the float a score_mod returns.
  same(trace_score_mod([](auto, auto, auto, auto q, auto kv) { return q - kv; }), "q_idx - kv_idx");
  same(trace_score_mod([](auto, auto, auto, auto, auto) { return 3; }), "3");
}

TEST(Trace, MaskModsMatchTheParser) {
  Buffers bufs;
  auto doc = capture("doc", bufs.doc_v);
  auto window = scalar_param("window", 256);
  auto prefix = scalar_param("prefix", 64);
  auto same = [](const TracedMod& t, const std::string& text) {
    ASSERT_TRUE(t.expr);
    EXPECT_EQ(t.expr->type, Type::Bool) << text;
    EXPECT_EQ(ir::to_string(t.expr), parsed(text, true)) << text;
  };
  same(trace_mask_mod([](auto, auto, auto q, auto kv) { return q >= kv; }), "q_idx >= kv_idx");
  same(trace_mask_mod([&](auto, auto, auto q, auto kv) { return q >= kv && q - kv < window; }),
       "q_idx >= kv_idx && q_idx - kv_idx < window");
  same(trace_mask_mod([&](auto, auto, auto q, auto kv) { return kv < prefix || q >= kv; }),
       "kv_idx < prefix || q_idx >= kv_idx");
  same(trace_mask_mod([&](auto, auto, auto q, auto kv) { return doc[q] == doc[kv]; }),
       "doc[q_idx] == doc[kv_idx]");
  same(trace_mask_mod([](auto, auto, auto q, auto) { return q % 3 != 1; }), "q_idx % 3 != 1");
  same(trace_mask_mod([](auto b, auto h, auto q, auto kv) { return !(q < kv) || b == h; }),
       "!(q_idx < kv_idx) || b == h");
  // An int result is converted to bool.
  same(trace_mask_mod([](auto, auto, auto q, auto) { return q % 2; }), "q_idx % 2");
  same(trace_mask_mod([](auto, auto, auto, auto) { return true; }), "true");
}

TEST(Trace, RecordsBuffersAndParamsWithBindings) {
  Buffers bufs;
  auto slopes = capture("slopes", bufs.slopes_v);
  auto doc = capture("doc", bufs.doc_v);
  auto unused = capture("bias2", bufs.bias2_v);
  auto cap = scalar_param("cap", 20.0);
  auto other = scalar_param("other", 1.0);
  TracedMod t = trace_score_mod([&](auto s, auto, auto h, auto q, auto kv) {
    // slopes read twice; doc read once; `unused` and `other` never read.
    return cap * tanh(s / cap) + slopes[h] * slopes[doc[q]] * (kv - q);
  });
  ASSERT_EQ(t.buffers.size(), 2u);  // sorted by name, each once
  EXPECT_EQ(t.buffers[0].name, "doc");
  EXPECT_EQ(t.buffers[0].dtype, DType::I32);
  EXPECT_EQ(t.buffers[0].rank, 1);
  EXPECT_EQ(t.buffers[1].name, "slopes");
  EXPECT_EQ(t.buffers[1].dtype, DType::F32);
  ASSERT_EQ(t.bindings.buffers.size(), 2u);
  EXPECT_EQ(t.bindings.buffers[0].first, "doc");
  EXPECT_EQ(t.bindings.buffers[0].second.data, bufs.doc.data());
  EXPECT_EQ(t.bindings.buffers[1].first, "slopes");
  EXPECT_EQ(t.bindings.buffers[1].second.data, bufs.slopes.data());
  EXPECT_EQ(t.bindings.buffers[1].second.sizes[0], 4);
  ASSERT_EQ(t.params.size(), 1u);
  EXPECT_EQ(t.params[0].name, "cap");
  ASSERT_EQ(t.bindings.params.size(), 1u);
  EXPECT_EQ(t.bindings.params[0], (std::pair<std::string, double>{"cap", 20.0}));
  EXPECT_EQ(ir::buffers_used(t.expr), (std::vector<std::string>{"doc", "slopes"}));
  (void)unused;
  (void)other;

  // A fresh trace starts empty.
  TracedMod plain = trace_score_mod([](auto s, auto, auto, auto, auto) { return s; });
  EXPECT_TRUE(plain.buffers.empty());
  EXPECT_TRUE(plain.params.empty());
  EXPECT_TRUE(plain.bindings.buffers.empty());
}

TEST(Trace, TwoTensorsUnderOneNameAreRejected) {
  Buffers a, b;
  auto s1 = capture("slopes", a.slopes_v);
  auto s2 = capture("slopes", b.slopes_v);
  try {
    trace_score_mod([&](auto s, auto, auto h, auto, auto) { return s + s1[h] + s2[h]; });
    FAIL() << "accepted two tensors named slopes";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("two different tensors were captured under the name 'slopes'"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("unique name"), std::string::npos) << msg;
  }
  // The failed trace left nothing behind: the next one records only its own reads.
  TracedMod t = trace_score_mod([&](auto s, auto, auto, auto, auto) { return s; });
  EXPECT_TRUE(t.buffers.empty());
  TracedMod u = trace_score_mod([&](auto s, auto, auto h, auto, auto) { return s + s2[h]; });
  ASSERT_EQ(u.bindings.buffers.size(), 1u);
  EXPECT_EQ(u.bindings.buffers[0].second.data, b.slopes.data());
}

TEST(Trace, ErrorsInsideALambdaPropagateAndLeaveTracingUsable) {
  Buffers bufs;
  auto slopes = capture("slopes", bufs.slopes_v);
  auto cap = scalar_param("cap", 5);
  EXPECT_THROW(
      trace_score_mod([&](auto s, auto, auto h, auto, auto) { return slopes[h] + cap + s % 2; }),
      Error);
  EXPECT_THROW(trace_score_mod([&](auto s, auto, auto, auto, auto) { return slopes[s]; }), Error);
  TracedMod t = trace_score_mod([](auto s, auto, auto, auto, auto) { return s; });
  EXPECT_TRUE(t.buffers.empty());
  EXPECT_TRUE(t.params.empty());
}

TEST(Trace, BoolBuffersAreRejectedAtCapture) {
  bool m[3] = {true, false, true};
  try {
    capture("m", contiguous_view(m, DType::Bool, {3}));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'m' is bool; pass it as int32"), std::string::npos)
        << e.what();
  }
}

TEST(Trace, BuildingIrOutsideATraceRecordsNothing) {
  Buffers bufs;
  auto slopes = capture("slopes", bufs.slopes_v);
  Sym e = slopes[Sym(ir::variable(ir::Var::H))] + scalar_param("cap");
  EXPECT_EQ(ir::to_string(e.expr()), "(slopes[h] + cap)");
  TracedMod t = trace_score_mod([](auto s, auto, auto, auto, auto) { return s; });
  EXPECT_TRUE(t.buffers.empty());
  EXPECT_TRUE(t.params.empty());
}

// ---------------------------------------------------------------- combine

TEST(Combine, MergesScoreAndMaskMods) {
  Buffers bufs;
  auto slopes = capture("slopes", bufs.slopes_v);
  auto doc = capture("doc", bufs.doc_v);
  auto cap = scalar_param("cap", 20.0);
  auto window = scalar_param("window", 8.0);
  TracedMod sm = trace_score_mod([&](auto s, auto, auto h, auto q, auto kv) {
    return cap * tanh(s / cap) + slopes[h] * (kv - q);
  });
  TracedMod mm = trace_mask_mod([&](auto, auto h, auto q, auto kv) {
    return doc[q] == doc[kv] && q - kv < window && slopes[h] > 0;  // slopes shared with score_mod
  });
  auto [set, bind] = combine(&sm, &mm);
  EXPECT_EQ(set.score_mod, sm.expr);
  EXPECT_EQ(set.mask_mod, mm.expr);
  ASSERT_EQ(set.buffers.size(), 2u);
  EXPECT_EQ(set.buffers[0].name, "doc");
  EXPECT_EQ(set.buffers[1].name, "slopes");
  EXPECT_EQ(set.buffer_slot("doc"), 0);
  EXPECT_EQ(set.buffer_slot("slopes"), 1);
  EXPECT_EQ(set.buffer_slot("nope"), -1);
  ASSERT_EQ(set.params.size(), 2u);
  EXPECT_EQ(set.params[0].name, "cap");
  EXPECT_EQ(set.params[1].name, "window");
  EXPECT_EQ(set.param_slot("window"), 1);
  ASSERT_EQ(bind.buffers.size(), 2u);
  EXPECT_EQ(bind.buffers[0].first, "doc");
  EXPECT_EQ(bind.buffers[0].second.data, bufs.doc.data());
  EXPECT_EQ(bind.buffers[1].second.data, bufs.slopes.data());
  EXPECT_EQ(bind.params,
            (std::vector<std::pair<std::string, double>>{{"cap", 20.0}, {"window", 8.0}}));
  EXPECT_EQ(set.signature(),
            "score_mod=" + ir::to_string(sm.expr) + "\nmask_mod=" + ir::to_string(mm.expr) +
                "\nbuffer doc int32 rank 1\nbuffer slopes fp32 rank 1\nparam cap\nparam window\n");

  auto [only_score, b1] = combine(&sm, nullptr);
  EXPECT_TRUE(only_score.has_score_mod());
  EXPECT_FALSE(only_score.has_mask_mod());
  EXPECT_EQ(only_score.buffers.size(), 1u);
  auto [nothing, b2] = combine(nullptr, nullptr);
  EXPECT_FALSE(nothing.has_score_mod());
  EXPECT_FALSE(nothing.has_mask_mod());
  EXPECT_TRUE(nothing.buffers.empty());
  EXPECT_TRUE(b2.buffers.empty());
}

TEST(Combine, RejectsConflictingBufferDecls) {
  std::vector<float> f(4, 1.0f);
  std::vector<int32_t> n(4, 1);
  std::vector<float> f2(16, 1.0f);
  auto as_float = capture("t", contiguous_view(f.data(), DType::F32, {4}));
  auto as_int = capture("t", contiguous_view(n.data(), DType::I32, {4}));
  auto as_rank2 = capture("t", contiguous_view(f2.data(), DType::F32, {4, 4}));
  TracedMod sm = trace_score_mod([&](auto s, auto, auto h, auto, auto) { return s + as_float[h]; });
  TracedMod mm = trace_mask_mod([&](auto, auto h, auto, auto) { return as_int[h] > 0; });
  TracedMod mm2 = trace_mask_mod([&](auto, auto h, auto q, auto) { return as_rank2(h, q) > 0; });
  for (const TracedMod* m : {&mm, &mm2}) {
    try {
      combine(&sm, m);
      ADD_FAILURE() << "accepted conflicting decls of 't'";
    } catch (const Error& e) {
      EXPECT_NE(
          std::string(e.what()).find(
              "buffer 't' is captured by score_mod and mask_mod with different dtype or rank"),
          std::string::npos)
          << e.what();
    }
  }
}

// The score_mod and mask_mod share one slot per name, so two different tensors under one name
// would make one mod silently read the other's tensor. The tracer rejects this within one
// trace; combine() must reject it across the two mods too.
TEST(Combine, RejectsTwoTensorsUnderOneName) {
  Buffers a, b;
  auto sa = capture("slopes", a.slopes_v);
  auto sb = capture("slopes", b.slopes_v);
  TracedMod sm = trace_score_mod([&](auto s, auto, auto h, auto, auto) { return s + sa[h]; });
  TracedMod mm = trace_mask_mod([&](auto, auto h, auto, auto) { return sb[h] > 0; });
  EXPECT_THROW(combine(&sm, &mm), Error) << "score_mod would read the mask_mod's 'slopes' tensor";
}

// Bindings are looked up by name, not by position: a TracedMod may carry bindings for more
// tensors than its expression reads (the torch API binds every tensor the user passed).
TEST(Combine, BindsBuffersByName) {
  Buffers bufs;
  std::vector<float> other(8, 7.0f);
  TracedMod t;
  ir::BufferDecl slopes{"slopes", DType::F32, 1};
  t.expr = ir::binary(ir::Op::Add, ir::variable(ir::Var::Score),
                      ir::load(slopes, {ir::variable(ir::Var::H)}));
  t.buffers = {slopes};
  t.bindings.buffers = {{"aaa", contiguous_view(other.data(), DType::F32, {8})},
                        {"slopes", bufs.slopes_v}};
  auto [set, bind] = combine(&t, nullptr);
  ASSERT_EQ(bind.buffers.size(), 1u);
  EXPECT_EQ(bind.buffers[0].first, "slopes");
  EXPECT_EQ(bind.buffers[0].second.data, bufs.slopes.data())
      << "'slopes' was bound to the tensor named 'aaa'";
}

// ---------------------------------------------------------------- validate

TEST(Validate, MaskModReadingScoreIsRejected) {
  ModSet s;
  s.mask_mod = ir::binary(ir::Op::Gt, ir::variable(ir::Var::Score), ir::constant(0));
  try {
    validate(s);
    FAIL();
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("mask_mod cannot read `score`"), std::string::npos) << msg;
    EXPECT_NE(msg.find("move that logic to score_mod"), std::string::npos) << msg;
  }
  // The same through combine(), with a hand-made TracedMod (trace_mask_mod has no score).
  TracedMod t;
  t.expr = s.mask_mod;
  EXPECT_THROW(combine(nullptr, &t), Error);
}

TEST(Validate, TypesAndDeclarations) {
  auto message = [](const ModSet& s) -> std::string {
    try {
      validate(s);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  ModSet s;
  s.score_mod = ir::variable(ir::Var::QIdx);
  EXPECT_NE(message(s).find("score_mod must produce a float score"), std::string::npos)
      << message(s);
  EXPECT_NE(message(s).find("float(...)"), std::string::npos);
  s = {};
  s.mask_mod = ir::variable(ir::Var::QIdx);
  EXPECT_NE(message(s).find("mask_mod must produce a bool"), std::string::npos) << message(s);
  s = {};
  s.score_mod = ir::load({"slopes", DType::F32, 1}, {ir::variable(ir::Var::H)});
  EXPECT_NE(message(s).find("mod reads buffer 'slopes' but no tensor was captured"),
            std::string::npos)
      << message(s);
  s.buffers = {{"slopes", DType::F32, 1}};
  EXPECT_EQ(message(s), "");
  s = {};
  s.score_mod = ir::param("cap");
  EXPECT_NE(message(s).find("mod reads param 'cap' but no such param was declared"),
            std::string::npos)
      << message(s);
  s.params = {{"cap"}};
  EXPECT_EQ(message(s), "");
  EXPECT_EQ(message(ModSet{}), "");
}

}  // namespace
}  // namespace flexjit

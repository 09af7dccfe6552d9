// LABELS: unit
// Interval analysis of mask IR (what classifies BlockMask blocks without touching elements).
// Soundness: whenever IntervalEvaluator::decide says a bool expression is true (or false) on a
// box of (q_idx, kv_idx), the exact evaluator agrees at every point of the box. Precision: the
// blocks a causal mask makes full or empty are decided without falling back to evaluation.
#include "jit/interval.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "jit/parser.h"
#include "score_mods/registry.h"

namespace flexjit {
namespace {

constexpr int64_t kN = 100;  // q_idx and kv_idx range over [0, kN)

// Documents of lengths 7, 50, 13, ... cycling (int32 ids), and their sizes for readable boxes.
std::vector<int32_t> document_ids(int64_t n) {
  const int64_t lens[] = {7, 50, 13, 9, 1, 20};
  std::vector<int32_t> out;
  for (int32_t d = 0; int64_t(out.size()) < n; ++d)
    for (int64_t i = 0; i < lens[d % 6] && int64_t(out.size()) < n; ++i) out.push_back(d);
  return out;
}

struct Box {
  int64_t b, h, q_lo, q_hi, kv_lo, kv_hi;
};

std::string describe(const Box& x) {
  return "b=" + std::to_string(x.b) + " h=" + std::to_string(x.h) + " q=[" +
         std::to_string(x.q_lo) + ", " + std::to_string(x.q_hi) + "] kv=[" +
         std::to_string(x.kv_lo) + ", " + std::to_string(x.kv_hi) + "]";
}

struct Counts {
  int decided_true = 0, decided_false = 0, undecided = 0;
};

// Checks `decide` against ir::eval on every point of `box`; returns the decision. Sets *failed
// when a decided box has a point that disagrees.
int check_box(const ir::Expr& e, const std::vector<std::pair<std::string, double>>& params,
              const std::vector<ir::BoundBuffer>& buffers, const Box& box, const std::string& what,
              bool* failed = nullptr, bool refine = false) {
  ir::IntervalEvaluator iv(params, buffers);
  iv.set_refine_selects(refine);
  iv.set_point(ir::Var::B, box.b);
  iv.set_point(ir::Var::H, box.h);
  iv.set_range(ir::Var::QIdx, box.q_lo, box.q_hi);
  iv.set_range(ir::Var::KvIdx, box.kv_lo, box.kv_hi);
  int d = iv.decide(e);
  if (d == -1) return d;
  ir::EvalEnv env;
  env.params = params;
  env.buffers = buffers;
  env.b = box.b;
  env.h = box.h;
  for (int64_t q = box.q_lo; q <= box.q_hi; ++q)
    for (int64_t kv = box.kv_lo; kv <= box.kv_hi; ++kv) {
      env.q_idx = q;
      env.kv_idx = kv;
      bool v = ir::eval(e, env).as_bool();
      if (v != (d == 1)) {
        ADD_FAILURE() << what << ": decided " << d << " on " << describe(box) << " but q_idx=" << q
                      << " kv_idx=" << kv << " gives " << v << "\n  " << ir::to_string(e);
        if (failed) *failed = true;
        return d;
      }
    }
  return d;
}

// Random boxes, narrow and wide, including single points and boxes at the edges.
std::vector<Box> random_boxes(uint32_t seed, int n, int64_t B = 2, int64_t H = 3) {
  std::mt19937 rng(seed);
  auto uni = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  std::vector<Box> out;
  for (int k = 0; k < n; ++k) {
    int64_t wq = uni(0, 1) ? uni(0, 3) : uni(0, 40), wk = uni(0, 1) ? uni(0, 3) : uni(0, 40);
    int64_t q = uni(0, kN - 1 - wq), kv = uni(0, kN - 1 - wk);
    out.push_back({uni(0, B - 1), uni(0, H - 1), q, q + wq, kv, kv + wk});
  }
  out.push_back({0, 0, 0, kN - 1, 0, kN - 1});
  out.push_back({1, 2, kN - 1, kN - 1, 0, 0});
  out.push_back({0, 1, 0, 0, kN - 1, kN - 1});
  return out;
}

Counts check_expr(const ir::Expr& e, const std::vector<std::pair<std::string, double>>& params,
                  const std::vector<ir::BoundBuffer>& buffers, const std::string& what,
                  uint32_t seed, bool refine = false) {
  Counts c;
  bool failed = false;
  for (const Box& box : random_boxes(seed, 400)) {
    int d = check_box(e, params, buffers, box, what, &failed, refine);
    (d == 1 ? c.decided_true : d == 0 ? c.decided_false : c.undecided)++;
    if (failed) break;  // one counterexample per expression is enough
  }
  return c;
}

// ---------------------------------------------------------------- soundness: built-in masks

TEST(IntervalSoundness, EveryBuiltinMaskMod) {
  ShapeInfo shape{2, 3, 3, kN, kN};
  int mods_checked = 0;
  for (const std::string& name : builtin_mod_names()) {
    const RegisteredMod& m = find_mod(name);
    if (m.kind != ModKind::Mask) continue;
    std::vector<OwnedTensor> storage;
    TracedMod t = instantiate_example(m, shape, &storage);
    std::vector<ir::BoundBuffer> buffers;
    for (const auto& [n, v] : t.bindings.buffers) buffers.push_back({n, v});
    // Default params, then small ones so the boundaries fall inside the index range.
    std::vector<std::vector<std::pair<std::string, double>>> param_sets = {t.bindings.params};
    std::vector<std::pair<std::string, double>> small = t.bindings.params;
    for (auto& [n, v] : small) v = 9.5;
    param_sets.push_back(small);
    for (auto& [n, v] : small) v = 30;
    param_sets.push_back(small);
    Counts total;
    uint32_t seed = 1;
    for (const auto& params : param_sets) {
      Counts c = check_expr(t.expr, params, buffers, name, seed++);
      total.decided_true += c.decided_true;
      total.decided_false += c.decided_false;
    }
    // Not vacuous: every built-in mask has boxes decided both ways on this range.
    EXPECT_GT(total.decided_true, 0) << name;
    EXPECT_GT(total.decided_false, 0) << name;
    ++mods_checked;
  }
  EXPECT_GE(mods_checked, 5);
}

// ---------------------------------------------------------------- soundness: tricky expressions

struct Fixture {
  std::vector<int32_t> doc = document_ids(kN);
  std::vector<float> ramp;
  std::vector<std::pair<std::string, double>> params = {{"w", 7.5}, {"neg", -3.0}};
  std::vector<ir::BoundBuffer> buffers;
  ParseScope scope;
  Fixture() {
    for (int64_t i = 0; i < kN; ++i) ramp.push_back(float((i * 37) % 23) - 11.5f);  // not monotone
    buffers = {{"doc", contiguous_view(doc.data(), DType::I32, {kN})},
               {"ramp", contiguous_view(ramp.data(), DType::F32, {kN})}};
    scope.allow_score = false;
    scope.buffers = {{"doc", DType::I32, 1}, {"ramp", DType::F32, 1}};
    scope.params = {{"w"}, {"neg"}};
  }
};

const std::vector<std::string>& tricky_expressions() {
  static const std::vector<std::string> v = {
      // % and / on negative values, both signs of divisor
      "(q_idx - kv_idx) % 5 == 0",
      "q_idx % 7 < 3",
      "(q_idx + 100) % 16 >= kv_idx % 16",
      "(kv_idx - q_idx) % 4 > -2",
      "q_idx % (kv_idx + 1) == 0",
      "q_idx % -6 > 2",
      "q_idx / 3 == kv_idx / 3",
      "(q_idx - kv_idx) / 4 > -2",
      "(kv_idx - 50) / -7 >= q_idx / 9 - 5",
      "where(q_idx == 60, 0, (kv_idx - 50) / (q_idx - 60)) > 0",
      "(q_idx * kv_idx) % 11 != 3",
      // min / max / abs / negation
      "min(q_idx, kv_idx) * 2 > max(q_idx, kv_idx) - 10",
      "abs(q_idx - kv_idx) <= 8",
      "abs(kv_idx - 2 * q_idx) > 30",
      "-q_idx + 40 > -kv_idx",
      "-(q_idx - kv_idx) >= neg",
      "max(q_idx - kv_idx, -20) < min(kv_idx, 15) - 3",
      "(q_idx - 64) * (kv_idx - 64) >= 0",
      "(q_idx - 50) * (50 - kv_idx) * (q_idx - kv_idx) < 100",
      // select and logic
      "where(q_idx > 50, kv_idx < 20, kv_idx >= 30)",
      "where(kv_idx % 2 == 0, q_idx, -q_idx) >= kv_idx - 40",
      "!(q_idx < kv_idx) || h == 1",
      "(q_idx >= kv_idx) == (b == 0)",
      "(q_idx > kv_idx) != (kv_idx > 40)",
      "bool(q_idx % 2) && kv_idx % 2 == 0",
      "bool(q_idx - kv_idx) || h + b == 3",
      "(q_idx < 30) + (kv_idx < 30) + b == 1",
      "-(q_idx > kv_idx) * 5 + kv_idx > 2",
      // the document buffer and a non-monotone float buffer
      "doc[q_idx] == doc[kv_idx] && q_idx >= kv_idx",
      "doc[q_idx] != doc[kv_idx] || b == 0",
      "doc[min(q_idx + 5, 99)] <= doc[kv_idx]",
      "doc[kv_idx] - doc[q_idx] > -1",
      "doc[abs(q_idx - kv_idx)] == 1",
      "where(doc[q_idx] == 1, 100, q_idx) > kv_idx",
      "doc[q_idx / 2] * 3 < kv_idx % 10",
      "ramp[kv_idx] < ramp[q_idx]",
      "ramp[q_idx] * ramp[kv_idx] > 4",
      "ramp[max(q_idx - kv_idx, 0)] >= neg",
      // floats, params, math functions, casts
      "float(q_idx) * 0.5 >= float(kv_idx) - 3.5",
      "q_idx - kv_idx < w",
      "float(q_idx - kv_idx) * neg > w",
      "exp(float(kv_idx - q_idx) / 10.0) < 2",
      "exp2(float(q_idx) - 60) > 1",
      "sqrt(float(q_idx)) > float(kv_idx) / 10",
      "log(float(q_idx + 1)) + log2(float(kv_idx + 1)) > 8",
      "rsqrt(float(q_idx + 1)) < 0.2",
      "int(float(q_idx) / 2.5) == kv_idx / 2",
      "int(-float(q_idx) / 3.5) >= -kv_idx",
      "floor(float(q_idx) / 3) == ceil(float(kv_idx) / 3)",
      "tanh(float(q_idx - kv_idx)) > 0.5",
      "sigmoid(float(kv_idx - q_idx)) < 0.25",
      "sin(float(q_idx)) > 0 && kv_idx < 50",
      "float(q_idx) / float(kv_idx - 40) > 1",
      "1.0 / float(q_idx) > 0.05",
      "q_idx - kv_idx > -inf",
      "float(q_idx) < inf * float(kv_idx)",
  };
  return v;
}

// Every text as a mask over the fixture's random boxes; the decisions must be sound, and the
// expressions as a whole must decide plenty of boxes both ways (else the check proves little).
void check_texts(const std::vector<std::string>& texts, uint32_t seed, bool refine) {
  Fixture f;
  Counts total;
  for (const std::string& text : texts) {
    SCOPED_TRACE(text);
    ir::Expr e = ir::cast(parse_expr(text, f.scope, "mask_mod"), ir::Type::Bool);
    Counts c = check_expr(e, f.params, f.buffers, text, seed++, refine);
    total.decided_true += c.decided_true;
    total.decided_false += c.decided_false;
  }
  EXPECT_GT(total.decided_true, 1000);
  EXPECT_GT(total.decided_false, 1000);
}

TEST(IntervalSoundness, TrickyExpressions) { check_texts(tricky_expressions(), 100, /*refine=*/false); }

// where()'s branches evaluated under their condition (what codegen's int32 narrowing uses):
// every tricky expression and some built on where() stay sound with the refinement on.
TEST(IntervalSoundness, WhereBranchesUnderTheirCondition) {
  std::vector<std::string> texts = tricky_expressions();
  for (const char* t : {
           // T5's bucket: the log's argument is >= 1 in the branch where the distance is >= 8
           "where(abs(kv_idx - q_idx) < 8, abs(kv_idx - q_idx), "
           "min(8 + int(log(float(abs(kv_idx - q_idx)) / 8.0) / 2.7725887 * 8.0), 15)) < 12",
           "where(q_idx > kv_idx, q_idx - kv_idx, kv_idx - q_idx) <= 5",
           "where(!(q_idx <= 50), q_idx / (q_idx - 40), 0) > 2",
           "where(q_idx >= 10 && kv_idx < 90, q_idx * kv_idx, -1) > 800",
           "where(q_idx < 10 || kv_idx >= 90, 0.0, log(float(q_idx - 9)) * float(90 - kv_idx)) > 20",
           "where(float(q_idx) * 0.5 < 20.0, 1, int(float(q_idx) * 0.5)) > 30",
           "where(float(q_idx) * 0.5 < float(kv_idx), kv_idx, q_idx) > 50",
           "where(ramp[kv_idx] < 0.0, kv_idx, 200) > 60",
           "where(q_idx - kv_idx >= w, q_idx, kv_idx) < 30",
           "where(doc[q_idx] < doc[kv_idx], doc[kv_idx] - doc[q_idx], 0) > 2",
       })
    texts.push_back(t);
  check_texts(texts, 500, /*refine=*/true);
}

// What the refinement buys: T5's bucket over the whole index contract is [0, 31] with it, and
// unbounded below without (log(0) = -inf, whose int() is INT64_MIN).
TEST(IntervalPrecision, WhereRefinementBoundsT5Buckets) {
  ParseScope s;
  s.allow_score = false;
  ir::Expr bucket = parse_expr(
      "int(kv_idx - q_idx > 0) * 16 + where(abs(kv_idx - q_idx) < 8, abs(kv_idx - q_idx), "
      "min(8 + int(log(float(abs(kv_idx - q_idx)) / 8.0) / 2.7725887 * 8.0), 15))",
      s, "mask_mod");
  for (bool refine : {false, true}) {
    ir::IntervalEvaluator iv({}, {});
    iv.set_refine_selects(refine);
    for (ir::Var v : {ir::Var::B, ir::Var::H, ir::Var::QIdx, ir::Var::KvIdx}) iv.set_range(v, 0, (int64_t(1) << 31) - 1);
    const ir::Interval r = iv.eval(bucket);
    if (refine) {
      EXPECT_EQ(r.lo, 0);
      EXPECT_EQ(r.hi, 31);
    } else {
      EXPECT_LT(r.lo, -1e9);
    }
    EXPECT_EQ(iv.refinement_mark(), 0u);  // nothing left pushed
  }
}

// int(x) of a float computed in fp32 (approximate math) may truncate one integer beyond the
// real-number range: the interval allows for it, so int32 narrowing never relies on an exact edge.
TEST(IntervalSoundness, FloatToIntAllowsForFp32Rounding) {
  ParseScope s;
  s.allow_score = false;
  ir::IntervalEvaluator iv({}, {});
  iv.set_range(ir::Var::QIdx, 0, 100);
  const ir::Interval r = iv.eval(parse_expr("int(float(q_idx) * 0.5)", s, "mask_mod"));
  EXPECT_LE(r.lo, -1);
  EXPECT_GE(r.hi, 51);
  const ir::Interval c = iv.eval(parse_expr("int(2.5)", s, "mask_mod"));  // a literal is exact
  EXPECT_EQ(c.lo, 2);
  EXPECT_EQ(c.hi, 2);
}

// Document ids are often 64-bit hashes. Two ids that differ only below the 53rd bit are the
// same double, but different int64 values: a box spanning two such documents must not be
// decided true (that would mark the block full and skip the mask, attending across documents).
TEST(IntervalSoundness, Int64IdsBeyondDoublePrecision) {
  std::vector<int32_t> small = document_ids(kN);
  std::vector<int64_t> hashed;
  for (int32_t d : small)
    hashed.push_back((int64_t(1) << 60) + d);  // consecutive ids, 2^60 apart from 0
  std::vector<ir::BoundBuffer> buffers = {
      {"hdoc", contiguous_view(hashed.data(), DType::I64, {kN})}};
  ParseScope s;
  s.allow_score = false;
  s.buffers = {{"hdoc", DType::I64, 1}};
  ir::Expr e = parse_expr("hdoc[q_idx] == hdoc[kv_idx]", s, "mask_mod");
  // Documents 0 (rows 0..6) and 1 (rows 7..56): a box across the boundary is mixed.
  Box mixed{0, 0, 0, 10, 0, 10};
  check_box(e, {}, buffers, mixed, "hashed document ids");
  check_expr(e, {}, buffers, "hashed document ids", 7);
}

// A NaN in a float buffer compares false with everything; a range scan that skips it would
// decide `ramp[kv_idx] < 100` true on a box whose exact value is false at the NaN.
TEST(IntervalSoundness, NaNInAFloatBuffer) {
  std::vector<float> ramp(kN, 1.0f);
  ramp[42] = std::numeric_limits<float>::quiet_NaN();
  std::vector<ir::BoundBuffer> buffers = {{"ramp", contiguous_view(ramp.data(), DType::F32, {kN})}};
  ParseScope s;
  s.allow_score = false;
  s.buffers = {{"ramp", DType::F32, 1}};
  for (const char* text :
       {"ramp[kv_idx] < 100", "ramp[kv_idx] >= -100", "!(ramp[kv_idx] != ramp[kv_idx])"}) {
    ir::Expr e = ir::cast(parse_expr(text, s, "mask_mod"), ir::Type::Bool);
    check_box(e, {}, buffers, Box{0, 0, 0, 0, 40, 50}, text);
    check_box(e, {}, buffers, Box{0, 0, 0, 0, 42, 42}, text);
  }
}

// Converting an out-of-range float to int gives INT64_MIN (as on x86, and as generated code
// does); the interval of int(x) must include that value.
TEST(IntervalSoundness, FloatToIntOutOfRange) {
  ParseScope s;
  s.allow_score = false;
  ir::Expr e = parse_expr("int(float(q_idx) * 1e30) > 0", s, "mask_mod");
  check_box(e, {}, {}, Box{0, 0, 1, 20, 0, 0}, "int() of 1e30");
}

// ---------------------------------------------------------------- precision

TEST(IntervalPrecision, CausalBlocksOffTheDiagonalAreDecided) {
  ir::Expr causal = find_mod("causal").mod.expr;
  for (int64_t bs : {16, 64, 128}) {
    const int64_t L = 1000, nb = (L + bs - 1) / bs;
    for (int64_t qb = 0; qb < nb; ++qb)
      for (int64_t kb = 0; kb < nb; ++kb) {
        ir::IntervalEvaluator iv({}, {});
        iv.set_point(ir::Var::B, 0);
        iv.set_point(ir::Var::H, 0);
        iv.set_range(ir::Var::QIdx, qb * bs, std::min(L, (qb + 1) * bs) - 1);
        iv.set_range(ir::Var::KvIdx, kb * bs, std::min(L, (kb + 1) * bs) - 1);
        int want = qb > kb ? 1 : qb < kb ? 0 : -1;  // diagonal blocks are partial
        ASSERT_EQ(iv.decide(causal), want)
            << "block size " << bs << " q-block " << qb << " kv-block " << kb;
      }
  }
  // A diagonal block of size 1 is a single point: decided.
  ir::IntervalEvaluator iv({}, {});
  iv.set_range(ir::Var::QIdx, 5, 5);
  iv.set_range(ir::Var::KvIdx, 5, 5);
  EXPECT_EQ(iv.decide(causal), 1);
}

TEST(IntervalPrecision, WindowsDocumentsAndPadding) {
  // Sliding window of 64 with 16-blocks: blocks fully inside the band are full, beyond it empty.
  ir::Expr sw = find_mod("sliding_window").mod.expr;
  std::vector<std::pair<std::string, double>> params = {{"window", 64}};
  auto decide = [&](const ir::Expr& e, const std::vector<std::pair<std::string, double>>& p,
                    const std::vector<ir::BoundBuffer>& bufs, int64_t b, int64_t q0, int64_t q1,
                    int64_t k0, int64_t k1) {
    ir::IntervalEvaluator iv(p, bufs);
    iv.set_point(ir::Var::B, b);
    iv.set_point(ir::Var::H, 0);
    iv.set_range(ir::Var::QIdx, q0, q1);
    iv.set_range(ir::Var::KvIdx, k0, k1);
    return iv.decide(e);
  };
  EXPECT_EQ(decide(sw, params, {}, 0, 64, 79, 16, 31), 1);   // distances 33..63
  EXPECT_EQ(decide(sw, params, {}, 0, 64, 79, 0, 15), -1);   // distances 49..79: straddles 64
  EXPECT_EQ(decide(sw, params, {}, 0, 160, 175, 0, 15), 0);  // too far back
  EXPECT_EQ(decide(sw, params, {}, 0, 0, 15, 16, 31), 0);    // the future

  std::vector<int32_t> doc = document_ids(kN);  // doc 1 covers rows 7..56, doc 2 rows 57..69
  std::vector<ir::BoundBuffer> bufs = {{"doc", contiguous_view(doc.data(), DType::I32, {kN})}};
  ir::Expr dm = find_mod("document").mod.expr;
  EXPECT_EQ(decide(dm, {}, bufs, 0, 10, 30, 40, 56), 1);
  EXPECT_EQ(decide(dm, {}, bufs, 0, 10, 30, 57, 69), 0);
  EXPECT_EQ(decide(dm, {}, bufs, 0, 10, 30, 50, 60), -1);

  std::vector<int32_t> kv_len = {40, 90};
  std::vector<ir::BoundBuffer> lens = {{"kv_len", contiguous_view(kv_len.data(), DType::I32, {2})}};
  ir::Expr kp = find_mod("key_padding").mod.expr;
  EXPECT_EQ(decide(kp, {}, lens, 0, 0, 99, 0, 39), 1);
  EXPECT_EQ(decide(kp, {}, lens, 0, 0, 99, 40, 99), 0);
  EXPECT_EQ(decide(kp, {}, lens, 1, 0, 99, 40, 89), 1);
  EXPECT_EQ(decide(kp, {}, lens, 1, 0, 99, 80, 99), -1);
}

TEST(IntervalPrecision, OutOfRangeLoadsStayUndecided) {
  // The exact evaluator flags out-of-range reads; the interval analysis must not decide them.
  std::vector<int32_t> doc = document_ids(10);
  std::vector<ir::BoundBuffer> bufs = {{"doc", contiguous_view(doc.data(), DType::I32, {10})}};
  ParseScope s;
  s.allow_score = false;
  s.buffers = {{"doc", DType::I32, 1}};
  ir::Expr e = parse_expr("doc[q_idx] >= 0", s, "mask_mod");
  ir::IntervalEvaluator iv({}, bufs);
  iv.set_range(ir::Var::QIdx, 5, 20);
  iv.set_range(ir::Var::KvIdx, 0, 0);
  EXPECT_EQ(iv.decide(e), -1);
  iv.set_range(ir::Var::QIdx, 0, 9);
  EXPECT_EQ(iv.decide(e), 1);
}

}  // namespace
}  // namespace flexjit

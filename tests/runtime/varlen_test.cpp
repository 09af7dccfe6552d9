// LABELS: numerics
// Varlen attention (runtime/varlen.h) against the float64 reference of FlashAttention-2's
// semantics (reference_varlen_attention, written out apart from the mods the runtime composes):
// packed sequences of odd lengths with empty ones, seqlen_q > seqlen_k and < seqlen_k with causal
// (bottom-right, leading rows fully masked), windows on one and both sides, batch 1 and 64
// sequences of length 1, GQA group 3, ALiBi [Hq] and [batch, Hq], softcap, user mods at
// in-sequence positions, rows past the last sequence, strided q, every engine; that no block
// outside the band is visited; and the errors bad cu_seqlens get.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "runtime/reference.h"
#include "runtime/varlen.h"
#include "score_mods/registry.h"
#include "tests/support/numerics.h"

namespace flexjit {
namespace {

struct VarlenCase {
  std::string name;
  std::vector<int> lq, lk;  // per sequence
  DType dtype = DType::F32;
  int Hq = 2, Hkv = 2, D = 24, Dv = 24;
  bool causal = false;
  int64_t wl = -1, wr = -1;
  double softcap = 0;
  int alibi = 0;            // 0: none, 1: [Hq], 2: [batch, Hq]
  std::string score_mod, mask_mod;  // text; may read `bias` fp32 [batch, Hq]
  int extra_rows = 0;       // q rows past the last sequence
  bool strided_q = false;   // q a slice of a packed [total, 3, Hq, D] qkv
  int block_m = 0, block_n = 0;
  int use_dpbf16 = -1;
};

std::vector<int32_t> cumsum(const std::vector<int>& lens) {
  std::vector<int32_t> cu{0};
  for (int l : lens) cu.push_back(cu.back() + l);
  return cu;
}

OwnedTensor packed(DType dt, int64_t total, int64_t h, int64_t d, uint64_t seed) {
  OwnedTensor t = OwnedTensor::make("t", dt, {total, h, d});
  fill_random(t.view, seed);
  return t;
}

void run_case(const VarlenCase& c) {
  SCOPED_TRACE(c.name);
  const std::vector<int32_t> cu_q = cumsum(c.lq), cu_k = cumsum(c.lk);
  const int64_t batch = int64_t(c.lq.size()), total_q = cu_q.back() + c.extra_rows, total_k = cu_k.back();
  OwnedTensor qkv;  // backs a strided q
  OwnedTensor q_own;
  TensorView q;
  if (c.strided_q) {
    qkv = OwnedTensor::make("qkv", c.dtype, {total_q, 3, c.Hq, c.D});
    fill_random(qkv.view, 11);
    q = qkv.view;
    q.rank = 3;
    q.sizes[0] = total_q, q.sizes[1] = c.Hq, q.sizes[2] = c.D;
    q.strides[0] = qkv.view.strides[0], q.strides[1] = qkv.view.strides[2], q.strides[2] = 1;
  } else {
    q_own = packed(c.dtype, total_q, c.Hq, c.D, 11);
    q = q_own.view;
  }
  OwnedTensor k = packed(c.dtype, total_k, c.Hkv, c.D, 22), v = packed(c.dtype, total_k, c.Hkv, c.Dv, 33);
  OwnedTensor out = OwnedTensor::make("out", c.dtype, {total_q, c.Hq, c.Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {c.Hq, total_q});
  std::memset(out.bytes->data(), 0x7f, out.bytes->size());  // every element must be written
  std::memset(lse.bytes->data(), 0x7f, lse.bytes->size());
  OwnedTensor cuq = OwnedTensor::make("cu_q", DType::I32, {batch + 1}), cuk = OwnedTensor::make("cu_k", DType::I32, {batch + 1});
  std::memcpy(cuq.bytes->data(), cu_q.data(), cu_q.size() * 4);
  std::memcpy(cuk.bytes->data(), cu_k.data(), cu_k.size() * 4);

  OwnedTensor bias = OwnedTensor::make("bias", DType::F32, {batch, c.Hq});
  fill_random(bias.view, 44);
  TracedMod sm, mm;
  const TracedMod* smp = nullptr;
  const TracedMod* mmp = nullptr;
  if (!c.score_mod.empty()) smp = &(sm = parse_mod(c.score_mod, ModKind::Score, {bias}, {}));
  if (!c.mask_mod.empty()) mmp = &(mm = parse_mod(c.mask_mod, ModKind::Mask, {bias}, {}));
  auto [mods, bind] = combine(smp, mmp);

  OwnedTensor slopes;
  VarlenOptions vo;
  vo.causal = c.causal;
  vo.window_left = c.wl;
  vo.window_right = c.wr;
  vo.softcap = c.softcap;
  if (c.alibi) {
    slopes = c.alibi == 1 ? OwnedTensor::make("s", DType::F32, {c.Hq}) : OwnedTensor::make("s", DType::F32, {batch, c.Hq});
    fill_random(slopes.view, 55);
    auto* p = static_cast<float*>(slopes.view.data);
    for (int64_t i = 0; i < slopes.view.numel(); ++i) p[i] = 0.05f + 0.25f * std::fabs(p[i]);
    vo.alibi_slopes = &slopes.view;
  }
  AttentionOptions opt;
  opt.block_m = c.block_m;
  opt.block_n = c.block_n;
  opt.use_dpbf16 = c.use_dpbf16;
  opt.use_tuning = false;
  int64_t max_q = 0, max_k = 0;
  for (size_t i = 0; i < c.lq.size(); ++i) max_q = std::max<int64_t>(max_q, c.lq[i]), max_k = std::max<int64_t>(max_k, c.lk[i]);
  AttentionReport rep;
  varlen_attention(q, k.view, v.view, cuq.view, cuk.view, max_q, max_k, out.view, &lse.view, mods, bind, vo, opt,
                   &rep);
  EXPECT_EQ(rep.path, "varlen");
  RefResult gold = reference_varlen_attention(q, k.view, v.view, cu_q, cu_k, mods, bind, vo);
  RefResult base = reference_varlen_attention(q, k.view, v.view, cu_q, cu_k, mods, bind, vo, /*fp32=*/true);
  testing::expect_matches_reference(out.view, &lse.view, gold, base, c.dtype);
}

class Varlen : public ::testing::TestWithParam<VarlenCase> {};
TEST_P(Varlen, MatchesFloat64Reference) { run_case(GetParam()); }

std::vector<VarlenCase> cases() {
  std::vector<VarlenCase> v;
  auto add = [&](VarlenCase c) { v.push_back(std::move(c)); };
  const std::vector<int> odd = {17, 1, 97, 0, 33, 129};
  add({.name = "dense_fp32", .lq = odd, .lk = odd});
  add({.name = "causal_fp32", .lq = odd, .lk = odd, .causal = true});
  add({.name = "causal_q_longer_than_k", .lq = {40, 5, 23}, .lk = {17, 9, 23}, .causal = true});
  add({.name = "causal_q_shorter_than_k", .lq = {7, 1, 30}, .lk = {100, 64, 31}, .causal = true, .block_m = 16, .block_n = 16});
  add({.name = "window_both_sides", .lq = {97, 20, 1}, .lk = {97, 45, 9}, .wl = 7, .wr = 3, .block_m = 16, .block_n = 16});
  add({.name = "window_left_causal", .lq = {129, 50}, .lk = {129, 70}, .causal = true, .wl = 20});
  add({.name = "window_right_only", .lq = {33, 60}, .lk = {50, 40}, .wr = 5});
  add({.name = "empty_sequences", .lq = {0, 5, 0, 3, 0}, .lk = {3, 0, 0, 4, 0}, .causal = false});
  add({.name = "batch1_bf16_causal", .lq = {129}, .lk = {129}, .dtype = DType::BF16, .causal = true});
  add({.name = "batch64_len1", .lq = std::vector<int>(64, 1), .lk = std::vector<int>(64, 1), .Hq = 3, .Hkv = 1});
  add({.name = "gqa3_odd_dims", .lq = {17, 97, 1}, .lk = {33, 97, 4}, .Hq = 6, .Hkv = 2, .D = 40, .Dv = 24, .causal = true});
  add({.name = "alibi_heads_causal", .lq = {50, 17}, .lk = {60, 17}, .Hq = 4, .Hkv = 4, .causal = true, .alibi = 1});
  add({.name = "alibi_batch_heads", .lq = {30, 9}, .lk = {20, 40}, .Hq = 3, .Hkv = 3, .alibi = 2});
  add({.name = "softcap", .lq = {65, 3}, .lk = {65, 80}, .causal = true, .softcap = 2.0});
  add({.name = "everything_with_user_mods", .lq = {40, 0, 70}, .lk = {50, 6, 70}, .Hq = 6, .Hkv = 2,
       .causal = true, .wl = 25, .softcap = 3.0, .alibi = 2,
       .score_mod = "score + bias(b, h) * (q_idx - kv_idx) / 16", .mask_mod = "(q_idx + kv_idx + b) % 5 != 0"});
  add({.name = "user_mods_see_sequence_positions", .lq = {33, 18}, .lk = {33, 40},
       .score_mod = "score + where(kv_idx < 8, bias(b, h), 0.0)", .mask_mod = "kv_idx <= q_idx + b * 10"});
  add({.name = "rows_past_last_sequence", .lq = {10, 7}, .lk = {12, 7}, .causal = true, .extra_rows = 5});
  add({.name = "strided_q_fp16", .lq = {37, 64}, .lk = {37, 64}, .dtype = DType::F16, .causal = true, .strided_q = true});
  add({.name = "bf16_fma_engine", .lq = {70, 33}, .lk = {70, 90}, .dtype = DType::BF16, .causal = true, .use_dpbf16 = 0});
  add({.name = "bf16_window_small_blocks", .lq = {97, 40}, .lk = {97, 50}, .dtype = DType::BF16, .wl = 9, .wr = 2,
       .block_m = 16, .block_n = 32});
  add({.name = "long_4097_causal", .lq = {4097, 3}, .lk = {4097, 3}, .Hq = 1, .Hkv = 1, .D = 16, .Dv = 16, .causal = true,
       .wl = 300});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Fa2, Varlen, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// A score_mod that reads a buffer at q_idx - kv_idx + 15 fails (error flag) for any element more
// than 31 before or 15 after the diagonal: with 16 x 16 blocks and a window of 4 keys back, only
// blocks out of the band reach such elements, so the call succeeding shows none is visited.
TEST(VarlenBand, BlocksOutsideTheBandAreNeverVisited) {
  const std::vector<int32_t> cu = {0, 200, 400};
  OwnedTensor q = packed(DType::F32, 400, 1, 16, 1), k = packed(DType::F32, 400, 1, 16, 2),
              v = packed(DType::F32, 400, 1, 16, 3), out = OwnedTensor::make("o", DType::F32, {400, 1, 16});
  OwnedTensor dist = OwnedTensor::make("dist", DType::F32, {47});
  std::memset(dist.bytes->data(), 0, dist.bytes->size());
  OwnedTensor cuq = OwnedTensor::make("cu", DType::I32, {3});
  std::memcpy(cuq.bytes->data(), cu.data(), 12);
  TracedMod sm = parse_mod("score + dist[q_idx - kv_idx + 15]", ModKind::Score, {dist}, {});
  auto [mods, bind] = combine(&sm, nullptr);
  VarlenOptions vo;
  vo.causal = true;
  vo.window_left = 4;
  AttentionOptions opt;
  opt.block_m = 16;
  opt.block_n = 16;
  EXPECT_NO_THROW(varlen_attention(q.view, k.view, v.view, cuq.view, cuq.view, 200, 200, out.view, nullptr, mods,
                                   bind, vo, opt));
  // Without the window the same mod reaches out of range: the check has teeth.
  vo.window_left = -1;
  EXPECT_THROW(varlen_attention(q.view, k.view, v.view, cuq.view, cuq.view, 200, 200, out.view, nullptr, mods, bind,
                                vo, opt),
               Error);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(VarlenErrors, SayWhatIsWrong) {
  OwnedTensor q = packed(DType::F32, 10, 2, 8, 1), k = packed(DType::F32, 12, 1, 8, 2), v = packed(DType::F32, 12, 1, 8, 3);
  OwnedTensor out = OwnedTensor::make("o", DType::F32, {10, 2, 8});
  auto cu = [](std::vector<int32_t> x) {
    OwnedTensor t = OwnedTensor::make("cu", DType::I32, {int64_t(x.size())});
    std::memcpy(t.bytes->data(), x.data(), x.size() * 4);
    return t;
  };
  OwnedTensor good_q = cu({0, 4, 10}), good_k = cu({0, 6, 12});
  ModSet none;
  ModBindings nb;
  auto call = [&](const TensorView& cq, const TensorView& ck, int64_t mq = 16, int64_t mk = 16,
                  const ModSet& mods = ModSet{}, const ModBindings& b = ModBindings{}, VarlenOptions vo = {}) {
    return error_of([&] { varlen_attention(q.view, k.view, v.view, cq, ck, mq, mk, out.view, nullptr, mods, b, vo); });
  };
  EXPECT_EQ(call(good_q.view, good_k.view), "(no error)");
  OwnedTensor i64 = OwnedTensor::make("cu", DType::I64, {3});
  EXPECT_NE(call(i64.view, good_k.view).find("cu_seqlens_q must be int32, got int64"), std::string::npos);
  OwnedTensor start1 = cu({1, 4, 10});
  EXPECT_NE(call(start1.view, good_k.view).find("cu_seqlens_q[0] must be 0, got 1"), std::string::npos);
  OwnedTensor back = cu({0, 8, 6});
  EXPECT_NE(call(good_q.view, back.view).find("cu_seqlens_k must not go backwards"), std::string::npos);
  OwnedTensor past = cu({0, 4, 11});
  EXPECT_NE(call(past.view, good_k.view).find("cu_seqlens_q ends at 11, past the 10 rows of q"), std::string::npos);
  OwnedTensor three = cu({0, 2, 4, 10});
  EXPECT_NE(call(three.view, good_k.view).find("cu_seqlens_q has 3 sequences but cu_seqlens_k has 2"),
            std::string::npos);
  EXPECT_NE(call(good_q.view, good_k.view, 5, 16).find("longest sequence has 6 queries"), std::string::npos);
  TracedMod reserved = parse_mod("score + varlen_softcap", ModKind::Score, {}, {{"varlen_softcap", 1.0}});
  auto [rm, rb] = combine(&reserved, nullptr);
  VarlenOptions capped;
  capped.softcap = 5;
  EXPECT_NE(call(good_q.view, good_k.view, 16, 16, rm, rb, capped).find("reserved"), std::string::npos);
  OwnedTensor slopes = OwnedTensor::make("s", DType::F32, {3});
  VarlenOptions al;
  al.alibi_slopes = &slopes.view;
  EXPECT_NE(call(good_q.view, good_k.view, 16, 16, none, nb, al).find("alibi_slopes must be [Hq] = [2]"),
            std::string::npos);
  VarlenOptions neg;
  neg.window_left = -2;
  EXPECT_NE(call(good_q.view, good_k.view, 16, 16, none, nb, neg).find("window sizes"), std::string::npos);
  TensorView q4 = q.view;
  q4.rank = 4;
  EXPECT_NE(error_of([&] {
              varlen_attention(q4, k.view, v.view, good_q.view, good_k.view, 16, 16, out.view, nullptr, none, nb);
            }).find("q must be 3-D [total, H, D]"),
            std::string::npos);
}

}  // namespace
}  // namespace flexjit

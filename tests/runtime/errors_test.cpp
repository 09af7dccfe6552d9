// LABELS: errors
// flex_attention's user errors: each bad call throws flexjit::Error whose message names the
// problem (and the fix where there is one), checked by substring; after every error the next
// valid call still works. Mods that index a buffer out of range or divide an int by zero at
// run time give an Error from the kernel's error flag, never a crash.
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <string>
#include <vector>

#include "jit/parser.h"
#include "runtime/attention.h"
#include "runtime/block_mask.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/tolerances.h"

namespace flexjit {
namespace {

OwnedTensor tensor(DType dt, std::vector<int64_t> sizes, uint64_t seed = 1) {
  OwnedTensor t = OwnedTensor::make("t", dt, std::move(sizes));
  if (dtype_is_float(dt)) fill_random(t.view, seed);
  return t;
}

// A call's tensors; defaults are valid: q/k/v/out [1, 2, 16, 32] fp32, lse [1, 2, 16].
struct Call {
  OwnedTensor q = tensor(DType::F32, {1, 2, 16, 32}, 1);
  OwnedTensor k = tensor(DType::F32, {1, 2, 16, 32}, 2);
  OwnedTensor v = tensor(DType::F32, {1, 2, 16, 32}, 3);
  OwnedTensor out = tensor(DType::F32, {1, 2, 16, 32});
  OwnedTensor lse = tensor(DType::F32, {1, 2, 16});
  ModSet mods;
  ModBindings bind;
  const runtime::BlockMask* mask = nullptr;
  AttentionOptions opt;
  bool with_lse = true;

  void run() {
    flex_attention(q.view, k.view, v.view, out.view, with_lse ? &lse.view : nullptr, mods, bind,
                   mask, opt);
  }
  // Max |out - float64 reference|.
  double error() const {
    RefResult ref =
        reference_attention(q.view, k.view, v.view, mods, bind,
                            opt.scale ? *opt.scale : 1.0 / std::sqrt(double(q.view.sizes[3])));
    std::vector<double> got = to_doubles(out.view);
    double e = 0;
    for (size_t i = 0; i < got.size(); ++i) e = std::max(e, std::fabs(got[i] - ref.out[i]));
    return e;
  }
};

// A ModSet from expression text with the given buffers (views) and params.
std::pair<ModSet, ModBindings> text_mods(
    const std::string& score, const std::string& mask, const std::vector<OwnedTensor>& buffers = {},
    const std::vector<std::pair<std::string, double>>& params = {}) {
  TracedMod s, m;
  if (!score.empty()) s = parse_mod(score, ModKind::Score, buffers, params);
  if (!mask.empty()) m = parse_mod(mask, ModKind::Mask, buffers, params);
  return combine(score.empty() ? nullptr : &s, mask.empty() ? nullptr : &m);
}

// A valid call with a score_mod, a mask_mod, a buffer and a param: it must run and be right.
void expect_next_call_works() {
  Call c;
  OwnedTensor slopes = OwnedTensor::make("slopes", DType::F32, {2});
  slopes.data<float>()[0] = 0.5f;
  slopes.data<float>()[1] = 0.25f;
  auto [mods, bind] = text_mods("cap * tanh(score / cap) + slopes[h] * (kv_idx - q_idx)",
                                "q_idx >= kv_idx", {slopes}, {{"cap", 20.0}});
  c.mods = mods;
  c.bind = bind;
  ASSERT_NO_THROW(c.run()) << "a valid call after an error failed";
  EXPECT_LT(c.error(), 1e-4);
}

// Runs `f`, expecting a flexjit::Error whose message contains every substring; then checks
// that a valid call still works.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> substrings) {
  try {
    f();
    ADD_FAILURE() << "no error; wanted one containing '" << *substrings.begin() << "'";
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& s : substrings)
      EXPECT_NE(msg.find(s), std::string::npos) << "want '" << s << "' in:\n" << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-flexjit exception: " << e.what();
  }
  expect_next_call_works();
}

TEST(Errors, ValidCallWorks) { expect_next_call_works(); }

TEST(Errors, WrongRank) {
  Call c;
  c.q = tensor(DType::F32, {2, 16, 32});
  expect_error([&] { c.run(); }, {"q must be 4-D [B, H, L, D]", "[2, 16, 32]"});
  Call d;
  d.k = tensor(DType::F32, {32});
  expect_error([&] { d.run(); }, {"k must be 4-D", "got shape [32]"});
  Call e;
  e.out = tensor(DType::F32, {2, 16, 32});
  expect_error([&] { e.run(); }, {"out must be 4-D"});
}

TEST(Errors, MismatchedHeadDims) {
  Call c;
  c.k = tensor(DType::F32, {1, 2, 16, 16});
  expect_error([&] { c.run(); },
               {"q and k head dims differ", "q [1, 2, 16, 32]", "k [1, 2, 16, 16]"});
  Call d;
  d.v = tensor(DType::F32, {1, 2, 15, 32});
  expect_error([&] { d.run(); }, {"k and v must agree on [B, H, L]"});
  Call e;
  e.q = tensor(DType::F32, {1, 2, 16, 300});
  e.k = tensor(DType::F32, {1, 2, 16, 300});
  expect_error([&] { e.run(); }, {"head dims up to 256", "D=300"});
}

TEST(Errors, HeadsAndBatch) {
  Call c;
  c.q = tensor(DType::F32, {1, 3, 16, 32});
  c.out = tensor(DType::F32, {1, 3, 16, 32});
  c.lse = tensor(DType::F32, {1, 3, 16});
  c.opt.enable_gqa = true;
  expect_error([&] { c.run(); }, {"query heads (3) must be a multiple of KV heads (2)"});
  Call d;
  d.q = tensor(DType::F32, {1, 4, 16, 32});
  d.out = tensor(DType::F32, {1, 4, 16, 32});
  d.lse = tensor(DType::F32, {1, 4, 16});
  expect_error([&] { d.run(); }, {"q has 4 heads but k/v have 2", "enable_gqa=true"});
  d.opt.enable_gqa = true;
  EXPECT_NO_THROW(d.run());
  EXPECT_LT(d.error(), 1e-4);
  Call e;
  e.q = tensor(DType::F32, {3, 2, 16, 32});
  e.out = tensor(DType::F32, {3, 2, 16, 32});
  e.lse = tensor(DType::F32, {3, 2, 16});
  e.k = tensor(DType::F32, {2, 2, 16, 32});
  e.v = tensor(DType::F32, {2, 2, 16, 32});
  expect_error([&] { e.run(); }, {"k/v batch must be 1 (broadcast) or q's batch 3"});
  Call f;
  f.k = tensor(DType::F32, {1, 2, 0, 32});
  f.v = tensor(DType::F32, {1, 2, 0, 32});
  expect_error([&] { f.run(); }, {"k has an empty dim"});
}

// The mods' index contract (b, h, q_idx, kv_idx below 2^31, which codegen relies on): a key length
// of 2^31 is refused before any element is read (a broadcast view over 32 floats: stride 0).
TEST(Errors, LengthsBeyondTheModIndexRange) {
  Call c;
  const int64_t big = int64_t(1) << 31;
  for (OwnedTensor* t : {&c.k, &c.v}) {
    t->view.sizes[2] = big;
    t->view.strides[2] = 0;
  }
  expect_error([&] { c.run(); }, {"flex_attention: the key length is 2147483648", "below 2^31", "split the call"});
  auto [mods, bind] = text_mods("", "q_idx >= kv_idx");
  expect_error([&] { (void)runtime::create_block_mask(mods, bind, 1, 1, big, 128, 1 << 20, 128); },
               {"create_block_mask: the query length is 2147483648", "below 2^31"});
}

TEST(Errors, WrongDtypes) {
  Call c;
  c.q = tensor(DType::F64, {1, 2, 16, 32});
  c.k = tensor(DType::F64, {1, 2, 16, 32});
  c.v = tensor(DType::F64, {1, 2, 16, 32});
  c.out = tensor(DType::F64, {1, 2, 16, 32});
  expect_error([&] { c.run(); }, {"q has dtype fp64", "supported: fp32, bf16, fp16"});
  Call d;
  d.k = tensor(DType::BF16, {1, 2, 16, 32});
  expect_error([&] { d.run(); }, {"q, k, v must share a dtype", "fp32, bf16, fp32"});
  Call e;
  e.out = tensor(DType::BF16, {1, 2, 16, 32});
  expect_error([&] { e.run(); }, {"out must have q's dtype fp32"});
  Call f;
  f.q = tensor(DType::I32, {1, 2, 16, 32});
  expect_error([&] { f.run(); }, {"q has dtype int32"});
}

TEST(Errors, OutAndLseShapes) {
  Call c;
  c.out = tensor(DType::F32, {1, 2, 16, 16});
  expect_error([&] { c.run(); },
               {"out must be [B, Hq, Lq, Dv] = [1, 2, 16, 32], got [1, 2, 16, 16]"});
  Call d;
  d.lse = tensor(DType::F32, {1, 2, 15});
  expect_error([&] { d.run(); }, {"lse must be fp32 [B, Hq, Lq]", "[1, 2, 15]"});
  Call e;
  e.lse = tensor(DType::BF16, {1, 2, 16});
  expect_error([&] { e.run(); }, {"lse must be fp32", "bf16"});
  Call f;
  f.lse = tensor(DType::F32, {1, 2, 16, 1});
  expect_error([&] { f.run(); }, {"lse must be fp32 [B, Hq, Lq]"});
}

TEST(Errors, Options) {
  Call c;
  c.opt.scale = std::nan("");
  expect_error([&] { c.run(); }, {"scale must be finite"});
  // The prefill kernel's blocks (FORCE_USE_FLEX_ATTENTION: these 16-row calls would decode).
  Call d;
  d.opt.force_prefill = true;
  d.opt.block_m = 1000;
  expect_error([&] { d.run(); }, {"BLOCK_M must be in 1..256", "1000"});
  Call e;
  e.opt.force_prefill = true;
  e.opt.block_n = -4;
  expect_error([&] { e.run(); }, {"BLOCK_N in 1..512"});
  // The decode kernel's: BLOCK_M is its query rows per work item, BLOCK_N a multiple of 16.
  Call dd;
  dd.opt.block_m = 1000;
  expect_error([&] { dd.run(); }, {"decode kernel takes BLOCK_M (query rows per work item) in 1..128", "1000"});
  Call de;
  de.opt.block_n = 40;
  expect_error([&] { de.run(); }, {"decode kernel needs BLOCK_N a multiple of 16", "FORCE_USE_FLEX_ATTENTION"});
  Call dp;
  dp.opt.block_n = 32;
  dp.opt.partition_size = 48;
  expect_error([&] { dp.run(); }, {"PARTITION_SIZE must be a positive multiple of 32", "got 48"});
  // Blocks in range whose stack scratch would not fit: a message, not a compile error. A prefill
  // call of one 4-row head with the given dtype, D and blocks.
  auto big_blocks = [](DType dt, int64_t D, int bm, int bn) {
    Call c;
    c.q = tensor(dt, {1, 1, 4, D}, 1);
    c.k = tensor(dt, {1, 1, 4, D}, 2);
    c.v = tensor(dt, {1, 1, 4, D}, 3);
    c.out = tensor(dt, {1, 1, 4, D});
    c.with_lse = false;
    c.opt.force_prefill = true;
    c.opt.block_m = bm;
    c.opt.block_n = bn;
    expect_error([&] { c.run(); }, {std::to_string(bm) + "x" + std::to_string(bn), "D=" + std::to_string(D),
                                    "over the kernel's 1 MiB", "use smaller blocks"});
  };
  big_blocks(DType::F32, 256, 256, 512);
  // The same for bf16, whose AMX engine lays its scratch out differently (bf16 P, VNNI V).
  big_blocks(DType::BF16, 128, 256, 512);
  // fp16 on AMX holds hi and lo halves of Q, K, P and V: blocks bf16 could take may not fit.
  if (amx_available()) big_blocks(DType::F16, 256, 128, 256);
}

TEST(Errors, BlockMaskForOtherLengths) {
  Call c;
  auto [mods, bind] = text_mods("", "q_idx >= kv_idx");
  runtime::BlockMask small = runtime::create_block_mask(mods, bind, 1, 2, 8, 8, 4, 4);
  c.mods = mods;
  c.mask = &small;
  expect_error([&] { c.run(); },
               {"block_mask was built for Lq=8, Lkv=8 but the call has Lq=16, Lkv=16",
                "rebuild it for these lengths"});
  runtime::BlockMask by_batch = runtime::create_block_mask(mods, bind, 1, 2, 16, 16, 16, 16);
  by_batch.B = 3;  // claims a batch the call does not have
  by_batch.kv_num_blocks.resize(size_t(3 * 1 * by_batch.num_q_blocks));
  c.mask = &by_batch;
  expect_error([&] { c.run(); }, {"block_mask has B=3 but q has batch 1", "use 1 to broadcast"});
}

// A mask built for shorter sequences can still cover the call's lengths with its blocks, but
// its full blocks were classified only over the shorter range: using it must either be
// rejected or still give the masked result.
TEST(Errors, BlockMaskForShorterLengthsWithinTheSameBlocks) {
  Call c;
  c.k = tensor(DType::F32, {1, 2, 120, 32}, 2);
  c.v = tensor(DType::F32, {1, 2, 120, 32}, 3);
  auto [mods, bind] = text_mods("", "kv_idx < 90");
  runtime::BlockMask m90 =
      runtime::create_block_mask(mods, bind, 1, 2, 16, 90);  // kv block 0 = 0..89: full
  ASSERT_EQ(m90.full_blocks(), 1);
  c.mods = mods;
  c.mask = &m90;
  try {
    c.run();
    EXPECT_LT(c.error(), 1e-4)
        << "a BlockMask built for Lkv=90 was used for Lkv=120: keys 90..119 were attended";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Lkv=90"), std::string::npos) << e.what();
  }
  expect_next_call_works();
}

TEST(Errors, BlockMaskBlocksMustTileTheKernelBlocks) {
  Call c;
  auto [mods, bind] = text_mods("", "q_idx >= kv_idx");
  runtime::BlockMask m = runtime::create_block_mask(mods, bind, 1, 2, 16, 16);  // 128 x 128
  c.mods = mods;
  c.mask = &m;
  c.opt.force_prefill = true;  // the prefill kernel's tiles (this 16-row call would decode)
  c.opt.block_n = 48;
  expect_error(
      [&] { c.run(); },
      {"block_mask block size 128x128 must be a multiple of the kernel's BLOCK_M x BLOCK_N",
       "x48"});
  c.opt.block_n = 0;
  c.opt.block_m = 96;
  expect_error([&] { c.run(); }, {"must be a multiple of the kernel's BLOCK_M x BLOCK_N = 96x"});
  // The decode kernel's key blocks must tile the mask's KV blocks too.
  c.opt = {};
  c.opt.block_n = 96;
  expect_error([&] { c.run(); }, {"block_mask kv block size 128 must be a multiple of BLOCK_N = 96"});
  // Without an explicit BLOCK_N the kernel adapts to the mask.
  runtime::BlockMask m48 = runtime::create_block_mask(mods, bind, 1, 2, 16, 16, 48, 48);
  c.opt = {};
  c.mask = &m48;
  EXPECT_NO_THROW(c.run());
  EXPECT_LT(c.error(), 1e-4);
}

TEST(Errors, BuffersAndParams) {
  OwnedTensor slopes = OwnedTensor::make("slopes", DType::F32, {2});
  slopes.data<float>()[0] = slopes.data<float>()[1] = 0.5f;
  auto [mods, bind] = text_mods("score + slopes[h] * cap", "", {slopes}, {{"cap", 2.0}});
  Call c;
  c.mods = mods;
  expect_error([&] { c.run(); }, {"the mods read buffer 'slopes' but no tensor is bound to it",
                                  "flexjit::capture", "--buffer slopes=FILE.npy"});
  c.bind.buffers = bind.buffers;
  expect_error([&] { c.run(); }, {"param 'cap' has no value", "--param cap=VALUE"});
  OwnedTensor as_int = OwnedTensor::make("slopes", DType::I32, {2});
  c.bind.params = bind.params;
  c.bind.buffers = {{"slopes", as_int.view}};
  expect_error([&] { c.run(); }, {"buffer 'slopes' is bound to a int32 tensor of rank 1",
                                  "the mod was built for fp32 rank 1"});
  OwnedTensor rank2 = OwnedTensor::make("slopes", DType::F32, {2, 1});
  c.bind.buffers = {{"slopes", rank2.view}};
  expect_error([&] { c.run(); }, {"rank 2", "fp32 rank 1"});
  // Mods address buffers with 32-bit offsets: an extent of 2^31 elements or more is refused
  // before any kernel reads it (a strided view over a huge tensor: two elements 2^31 apart).
  TensorView far = slopes.view;
  far.strides[0] = int64_t(1) << 31;
  c.bind.params = bind.params;
  c.bind.buffers = {{"slopes", far}};
  expect_error([&] { c.run(); }, {"buffer 'slopes' [2] spans 2147483649 elements", "below 2^31", "slice it",
                                  "make it contiguous"});
  c.bind = bind;
  EXPECT_NO_THROW(c.run());
  EXPECT_LT(c.error(), 1e-4);
}

TEST(Errors, InvalidModSets) {
  Call c;
  c.mods.mask_mod = ir::binary(ir::Op::Gt, ir::variable(ir::Var::Score), ir::constant(0));
  expect_error([&] { c.run(); }, {"mask_mod cannot read `score`"});
  Call d;
  d.mods.score_mod = ir::variable(ir::Var::QIdx);
  expect_error([&] { d.run(); }, {"score_mod must produce a float score"});
}

// ---- run-time errors inside mods: the error flag, never a crash ----

TEST(Errors, OutOfRangeBufferReadInAScoreMod) {
  OwnedTensor bias = OwnedTensor::make("bias", DType::F32, {16});
  auto [mods, bind] = text_mods("score + bias[kv_idx + 1000]", "", {bias});
  Call c;
  c.mods = mods;
  c.bind = bind;
  expect_error([&] { c.run(); },
               {"flex_attention: a mod indexed a captured buffer out of range", "bias [16]"});
  // A negative index too, and in a 2-D buffer.
  OwnedTensor t2 = OwnedTensor::make("t2", DType::F32, {2, 16});
  auto [m2, b2] = text_mods("score + t2(h, kv_idx - 1)", "", {t2});
  Call d;
  d.mods = m2;
  d.bind = b2;
  expect_error([&] { d.run(); }, {"out of range", "t2 [2, 16]"});
}

TEST(Errors, OutOfRangeBufferReadInAMaskMod) {
  OwnedTensor doc = OwnedTensor::make("doc", DType::I32, {16});
  auto [mods, bind] = text_mods("", "doc[q_idx] == doc[kv_idx + 1]", {doc});
  Call c;
  c.mods = mods;
  c.bind = bind;
  expect_error([&] { c.run(); }, {"out of range", "doc [16]"});
}

TEST(Errors, IntegerDivisionByZeroInAMod) {
  auto [mods, bind] = text_mods("score + float(q_idx / (kv_idx - 5))", "");
  Call c;
  c.mods = mods;
  expect_error([&] { c.run(); }, {"flex_attention:", "divided an int by zero"});
  auto [m2, b2] = text_mods("score + float(q_idx % (kv_idx - kv_idx))", "");
  Call d;
  d.mods = m2;
  expect_error([&] { d.run(); }, {"divided an int by zero"});
  auto [m3, b3] = text_mods("", "q_idx / (kv_idx - 3) >= 0");
  Call e;
  e.mods = m3;
  expect_error([&] { e.run(); }, {"divided an int by zero"});
}

// INT64_MIN / -1 overflows (SIGFPE on x86 if done naively); generated code wraps it.
TEST(Errors, Int64MinDividedByMinusOneDoesNotTrap) {
  auto [mods, bind] = text_mods(
      "score + float((-9223372036854775807 - 1 + q_idx - q_idx) / (kv_idx - kv_idx - 1) > 0)", "");
  Call c;
  c.mods = mods;
  EXPECT_NO_THROW(c.run());
}

// A literal -0.0 under a unary minus must still compile (C++ reads `--0.0f` as a decrement).
TEST(Errors, NegatedNegativeZeroLiteralCompiles) {
  Call c;
  c.mods.score_mod = ir::binary(ir::Op::Add, ir::variable(ir::Var::Score),
                                ir::unary(ir::Op::Neg, ir::constant(-0.0)));
  try {
    c.run();
    EXPECT_LT(c.error(), 1e-4);
  } catch (const Error& e) {
    ADD_FAILURE() << "score + -(-0.0) did not compile:\n" << std::string(e.what()).substr(0, 2000);
  }
  expect_next_call_works();
}

}  // namespace
}  // namespace flexjit

// LABELS: unit numerics
// create_block_mask against a dense brute-force classification (the mask_mod evaluated with
// ir::eval at every element): every built-in mask mod, odd lengths, several block sizes, B/H
// broadcast, a buffer-reading mask, the memory of a 128k causal mask, and dense_block_mask.
#include "runtime/block_mask.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "jit/parser.h"
#include "score_mods/registry.h"

namespace flexjit {
namespace {

using runtime::BlockMask;

enum Cls { kEmpty = 0, kPartial = 1, kFull = 2 };

// A mask mod with its bindings, resolved for one shape.
struct Mask {
  ModSet mods;
  ModBindings bind;
  std::vector<OwnedTensor> storage;
};

Mask make_mask(const std::string& name_or_text, const ShapeInfo& shape,
               std::vector<OwnedTensor> extra_buffers = {}) {
  Mask m;
  TracedMod t;
  if (has_mod(name_or_text)) {
    t = instantiate_example(find_mod(name_or_text), shape, &m.storage);
  } else {
    t = parse_mod(name_or_text, ModKind::Mask, extra_buffers, {});
    for (auto& b : extra_buffers) m.storage.push_back(b);
  }
  auto [set, bind] = combine(nullptr, &t);
  m.mods = set;
  m.bind = bind;
  return m;
}

// The mask's value at every element: [B][H][Lq][Lkv] (B, H of the call, not broadcast).
std::vector<char> dense_mask(const Mask& m, int64_t B, int64_t H, int64_t Lq, int64_t Lkv) {
  std::vector<char> out(size_t(B * H * Lq * Lkv));
  ir::EvalEnv env;
  env.params = m.bind.params;
  for (const auto& [n, v] : m.bind.buffers) env.buffers.push_back({n, v});
  size_t i = 0;
  for (env.b = 0; env.b < B; ++env.b)
    for (env.h = 0; env.h < H; ++env.h)
      for (env.q_idx = 0; env.q_idx < Lq; ++env.q_idx)
        for (env.kv_idx = 0; env.kv_idx < Lkv; ++env.kv_idx)
          out[i++] = ir::eval(m.mods.mask_mod, env).as_bool();
  return out;
}

// Block classification of the dense mask for (b, h, q-block, kv-block).
int classify(const std::vector<char>& dense, int64_t H, int64_t Lq, int64_t Lkv, int64_t b,
             int64_t h, int64_t qb, int64_t kb, int64_t qbs, int64_t kvbs) {
  int64_t n = 0, on = 0;
  for (int64_t q = qb * qbs; q < std::min(Lq, (qb + 1) * qbs); ++q)
    for (int64_t k = kb * kvbs; k < std::min(Lkv, (kb + 1) * kvbs); ++k) {
      ++n;
      on += dense[size_t(((b * H + h) * Lq + q) * Lkv + k)];
    }
  return on == 0 ? kEmpty : on == n ? kFull : kPartial;
}

// The index arrays are well formed: sizes, strides, ascending in-range indices.
void expect_well_formed(const BlockMask& m) {
  const int64_t rows = m.B * m.H * m.num_q_blocks;
  ASSERT_EQ(int64_t(m.kv_num_blocks.size()), rows);
  ASSERT_EQ(int64_t(m.full_kv_num_blocks.size()), rows);
  ASSERT_GE(m.kv_stride, 1);
  ASSERT_GE(m.full_kv_stride, 1);
  ASSERT_EQ(int64_t(m.kv_indices.size()), rows * m.kv_stride);
  ASSERT_EQ(int64_t(m.full_kv_indices.size()), rows * m.full_kv_stride);
  for (int64_t r = 0; r < rows; ++r) {
    ASSERT_LE(m.kv_num_blocks[r], m.kv_stride);
    ASSERT_LE(m.full_kv_num_blocks[r], m.full_kv_stride);
    for (int32_t j = 1; j < m.kv_num_blocks[r]; ++j)
      ASSERT_LT(m.kv_indices[r * m.kv_stride + j - 1], m.kv_indices[r * m.kv_stride + j]);
    for (int32_t j = 1; j < m.full_kv_num_blocks[r]; ++j)
      ASSERT_LT(m.full_kv_indices[r * m.full_kv_stride + j - 1],
                m.full_kv_indices[r * m.full_kv_stride + j]);
    for (int32_t j = 0; j < m.kv_num_blocks[r]; ++j) {
      ASSERT_GE(m.kv_indices[r * m.kv_stride + j], 0);
      ASSERT_LT(m.kv_indices[r * m.kv_stride + j], m.num_kv_blocks);
    }
  }
}

// The mask's own classification of every block, from its index arrays.
int mask_class(const BlockMask& m, int64_t b, int64_t h, int64_t qb, int64_t kb) {
  int64_t r = ((m.B == 1 ? 0 : b) * m.H + (m.H == 1 ? 0 : h)) * m.num_q_blocks + qb;
  for (int32_t j = 0; j < m.kv_num_blocks[r]; ++j)
    if (m.kv_indices[r * m.kv_stride + j] == kb) return kPartial;
  for (int32_t j = 0; j < m.full_kv_num_blocks[r]; ++j)
    if (m.full_kv_indices[r * m.full_kv_stride + j] == kb) return kFull;
  return kEmpty;
}

// Builds the mask and compares every block with the brute-force classification.
void compare_with_dense(const Mask& mk, const std::vector<char>& dense, int64_t B, int64_t H,
                        int64_t Lq, int64_t Lkv, int64_t qbs, int64_t kvbs) {
  SCOPED_TRACE("Lq=" + std::to_string(Lq) + " Lkv=" + std::to_string(Lkv) + " blocks " +
               std::to_string(qbs) + "x" + std::to_string(kvbs));
  runtime::BlockMaskBuildStats st;
  BlockMask m = runtime::create_block_mask(mk.mods, mk.bind, B, H, Lq, Lkv, qbs, kvbs, &st);
  ASSERT_NO_FATAL_FAILURE(expect_well_formed(m));
  EXPECT_EQ(m.Lq, Lq);
  EXPECT_EQ(m.Lkv, Lkv);
  EXPECT_EQ(m.q_block_size, qbs);
  EXPECT_EQ(m.kv_block_size, kvbs);
  EXPECT_EQ(m.num_q_blocks, (Lq + qbs - 1) / qbs);
  EXPECT_EQ(m.num_kv_blocks, (Lkv + kvbs - 1) / kvbs);
  EXPECT_EQ(st.blocks, m.B * m.H * m.num_q_blocks * m.num_kv_blocks);
  EXPECT_EQ(st.decided_by_interval + st.evaluated, st.blocks);
  int64_t partial = 0, full = 0;
  int bad = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t qb = 0; qb < m.num_q_blocks; ++qb)
        for (int64_t kb = 0; kb < m.num_kv_blocks; ++kb) {
          int want = classify(dense, H, Lq, Lkv, b, h, qb, kb, qbs, kvbs);
          int got = mask_class(m, b, h, qb, kb);
          if (want != got && ++bad <= 5)
            ADD_FAILURE() << "block b=" << b << " h=" << h << " q-block " << qb << " kv-block "
                          << kb << ": got " << got << ", brute force says " << want
                          << " (0 empty, 1 partial, 2 full)";
          if ((m.B == 1 ? b == 0 : true) && (m.H == 1 ? h == 0 : true)) {
            partial += want == kPartial;
            full += want == kFull;
          }
        }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(m.partial_blocks(), partial);
  EXPECT_EQ(m.full_blocks(), full);
}

class EveryBuiltinMask : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryBuiltinMask, MatchesBruteForce) {
  const std::string name = GetParam();
  const int64_t B = 2, H = 3;
  const int64_t lengths[] = {1, 17, 97, 129, 300};
  const std::pair<int64_t, int64_t> blocks[] = {
      {16, 16}, {64, 64}, {128, 128}, {16, 128}, {128, 64}};
  for (int64_t Lq : lengths)
    for (int64_t Lkv : lengths) {
      Mask mk = make_mask(name, ShapeInfo{B, H, H, Lq, Lkv});
      // Small params so windows and prefixes fall inside these lengths.
      for (auto& [n, v] : mk.bind.params) v = n == "window" ? 40 : 23;
      std::vector<char> dense = dense_mask(mk, B, H, Lq, Lkv);
      for (auto [qbs, kvbs] : blocks)
        ASSERT_NO_FATAL_FAILURE(compare_with_dense(mk, dense, B, H, Lq, Lkv, qbs, kvbs));
    }
}

std::vector<std::string> builtin_masks() {
  std::vector<std::string> out;
  for (const auto& n : builtin_mod_names())
    if (find_mod(n).kind == ModKind::Mask) out.push_back(n);
  return out;
}

INSTANTIATE_TEST_SUITE_P(BlockMask, EveryBuiltinMask, ::testing::ValuesIn(builtin_masks()),
                         [](const auto& info) { return info.param; });

// Masks the interval analysis can decide little of, so the compiled classifier does the work.
TEST(BlockMask, ExpressionMasksMatchBruteForce) {
  const int64_t B = 2, H = 3;
  for (const std::string text :
       {"q_idx % 3 != 1", "(q_idx - kv_idx) % 5 == 0 || h == b",
        "(q_idx * kv_idx) % 7 != 3 && q_idx >= kv_idx", "abs(q_idx - kv_idx) * (h + 1) < 40"}) {
    SCOPED_TRACE(text);
    for (auto [Lq, Lkv] : {std::pair<int64_t, int64_t>{97, 129}, {300, 17}}) {
      Mask mk = make_mask(text, ShapeInfo{B, H, H, Lq, Lkv});
      std::vector<char> dense = dense_mask(mk, B, H, Lq, Lkv);
      ASSERT_NO_FATAL_FAILURE(compare_with_dense(mk, dense, B, H, Lq, Lkv, 16, 64));
      ASSERT_NO_FATAL_FAILURE(compare_with_dense(mk, dense, B, H, Lq, Lkv, 128, 16));
    }
  }
}

TEST(BlockMask, BroadcastsBAndHWhenTheModDoesNotReadThem) {
  ShapeInfo shape{2, 3, 3, 97, 97};
  BlockMask causal =
      runtime::create_block_mask(make_mask("causal", shape).mods, {}, 2, 3, 97, 97, 16, 16);
  EXPECT_EQ(causal.B, 1);
  EXPECT_EQ(causal.H, 1);
  EXPECT_EQ(int64_t(causal.kv_num_blocks.size()), causal.num_q_blocks);

  Mask pad = make_mask("key_padding", shape);
  BlockMask by_batch = runtime::create_block_mask(pad.mods, pad.bind, 2, 3, 97, 97, 16, 16);
  EXPECT_EQ(by_batch.B, 2);
  EXPECT_EQ(by_batch.H, 1);

  Mask heads = make_mask("h % 2 == 0 || q_idx >= kv_idx", shape);
  BlockMask by_head = runtime::create_block_mask(heads.mods, heads.bind, 2, 3, 97, 97, 16, 16);
  EXPECT_EQ(by_head.B, 1);
  EXPECT_EQ(by_head.H, 3);
  EXPECT_EQ(int64_t(by_head.kv_num_blocks.size()), 3 * by_head.num_q_blocks);

  Mask both = make_mask("(b + h) % 2 == 0", shape);
  BlockMask by_both = runtime::create_block_mask(both.mods, both.bind, 2, 3, 97, 97, 16, 16);
  EXPECT_EQ(by_both.B, 2);
  EXPECT_EQ(by_both.H, 3);
  // (b, h) = (0, 0): everything full; (0, 1): everything empty.
  EXPECT_EQ(by_both.full_kv_num_blocks[0], by_both.num_kv_blocks);
  EXPECT_EQ(by_both.kv_num_blocks[0], 0);
  EXPECT_EQ(by_both.full_kv_num_blocks[size_t(by_both.num_q_blocks)], 0);
  EXPECT_EQ(by_both.kv_num_blocks[size_t(by_both.num_q_blocks)], 0);
}

TEST(BlockMask, DocumentMaskIsDecidedFromItsBuffer) {
  // Documents of 40 rows: with 40-row blocks every block is inside one document, so the
  // interval analysis decides all of them (full on the diagonal, empty elsewhere).
  const int64_t L = 400;
  OwnedTensor doc = OwnedTensor::make("doc", DType::I32, {L});
  for (int64_t i = 0; i < L; ++i) doc.data<int32_t>()[i] = int32_t(i / 40);
  Mask mk = make_mask("doc[q_idx] == doc[kv_idx]", ShapeInfo{1, 1, 1, L, L}, {doc});
  runtime::BlockMaskBuildStats st;
  BlockMask m = runtime::create_block_mask(mk.mods, mk.bind, 1, 1, L, L, 40, 40, &st);
  EXPECT_EQ(st.evaluated, 0);
  EXPECT_EQ(m.partial_blocks(), 0);
  EXPECT_EQ(m.full_blocks(), 10);
  for (int64_t qb = 0; qb < 10; ++qb) {
    ASSERT_EQ(m.full_kv_num_blocks[qb], 1);
    EXPECT_EQ(m.full_kv_indices[qb * m.full_kv_stride], qb);
  }
  // Misaligned blocks straddle documents: those are partial, found by exact evaluation.
  std::vector<char> dense = dense_mask(mk, 1, 1, L, L);
  compare_with_dense(mk, dense, 1, 1, L, L, 16, 64);
  // A different buffer content gives a different mask from the same mods (no recompile needed).
  for (int64_t i = 0; i < L; ++i) doc.data<int32_t>()[i] = int32_t(i / 100);
  BlockMask m2 = runtime::create_block_mask(mk.mods, mk.bind, 1, 1, L, L, 100, 100);
  EXPECT_EQ(m2.full_blocks(), 4);
  EXPECT_EQ(m2.partial_blocks(), 0);
}

// Document ids as 64-bit hashes: ids that differ only below the 53rd bit must still separate
// documents (a block across two of them is partial, not full).
TEST(BlockMask, Int64DocumentIds) {
  const int64_t L = 200;
  OwnedTensor doc = OwnedTensor::make("doc", DType::I64, {L});
  for (int64_t i = 0; i < L; ++i) doc.data<int64_t>()[i] = (int64_t(1) << 60) + i / 30;
  Mask mk = make_mask("doc[q_idx] == doc[kv_idx]", ShapeInfo{1, 1, 1, L, L}, {doc});
  std::vector<char> dense = dense_mask(mk, 1, 1, L, L);
  compare_with_dense(mk, dense, 1, 1, L, L, 64, 64);
}

TEST(BlockMask, CausalAt128kFitsInSixMegabytes) {
  const int64_t L = 128 * 1024;
  Mask mk = make_mask("causal", ShapeInfo{1, 1, 1, L, L});
  BlockMask m = runtime::create_block_mask(mk.mods, mk.bind, 1, 1, L, L);
  EXPECT_EQ(m.num_q_blocks, 1024);
  EXPECT_EQ(m.partial_blocks(), 1024);          // the diagonal
  EXPECT_EQ(m.full_blocks(), 1024 * 1023 / 2);  // strictly below it
  EXPECT_EQ(m.kv_stride, 1);
  EXPECT_LT(m.bytes(), size_t(6) << 20) << m.describe();
  EXPECT_NEAR(m.density(), 0.5, 0.001);
  EXPECT_NE(m.describe().find("partial=1024"), std::string::npos) << m.describe();
}

TEST(BlockMask, DenseBlockMask) {
  for (auto [Lq, Lkv, qbs, kvbs] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 128, 128},
                                    {17, 300, 16, 64},
                                    {129, 97, 128, 128},
                                    {300, 129, 64, 16}}) {
    BlockMask m = runtime::dense_block_mask(Lq, Lkv, qbs, kvbs);
    ASSERT_NO_FATAL_FAILURE(expect_well_formed(m));
    EXPECT_EQ(m.B, 1);
    EXPECT_EQ(m.H, 1);
    EXPECT_EQ(m.num_q_blocks, (Lq + qbs - 1) / qbs);
    EXPECT_EQ(m.num_kv_blocks, (Lkv + kvbs - 1) / kvbs);
    EXPECT_EQ(m.partial_blocks(), 0);
    EXPECT_EQ(m.full_blocks(), m.num_q_blocks * m.num_kv_blocks);
    EXPECT_DOUBLE_EQ(m.density(), 1.0);
    for (int64_t qb = 0; qb < m.num_q_blocks; ++qb)
      for (int64_t kb = 0; kb < m.num_kv_blocks; ++kb)
        EXPECT_EQ(mask_class(m, 0, 0, qb, kb), kFull);
  }
}

TEST(BlockMask, FullyMaskedAndFullyOpenMasks) {
  Mask none = make_mask("false", ShapeInfo{1, 1, 1, 97, 97});
  BlockMask m = runtime::create_block_mask(none.mods, none.bind, 1, 1, 97, 97, 16, 16);
  ASSERT_NO_FATAL_FAILURE(expect_well_formed(m));
  EXPECT_EQ(m.partial_blocks() + m.full_blocks(), 0);
  EXPECT_EQ(m.density(), 0.0);
  Mask all = make_mask("q_idx >= 0", ShapeInfo{1, 1, 1, 97, 97});
  BlockMask a = runtime::create_block_mask(all.mods, all.bind, 1, 1, 97, 97, 16, 16);
  EXPECT_EQ(a.full_blocks(), 7 * 7);
}

TEST(BlockMask, BadArgumentsAreErrors) {
  Mask mk = make_mask("causal", ShapeInfo{1, 1, 1, 16, 16});
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message([&] {
              runtime::create_block_mask(ModSet{}, {}, 1, 1, 16, 16);
            }).find("needs a mask_mod"),
            std::string::npos);
  EXPECT_NE(message([&] {
              runtime::create_block_mask(mk.mods, mk.bind, 0, 1, 16, 16);
            }).find("must be >= 1"),
            std::string::npos);
  EXPECT_NE(
      message([&] { runtime::create_block_mask(mk.mods, mk.bind, 1, 1, 16, 0); }).find("Lkv=0"),
      std::string::npos);
  EXPECT_NE(message([&] {
              runtime::create_block_mask(mk.mods, mk.bind, 1, 1, 16, 16, 0, 16);
            }).find("block sizes"),
            std::string::npos);
  EXPECT_NE(message([&] { runtime::dense_block_mask(16, 16, 16, -1); }).find("block sizes"),
            std::string::npos);
  // A mask that reads its buffer out of range: the classifier's error flag becomes an Error.
  OwnedTensor doc = OwnedTensor::make("doc", DType::I32, {50});
  for (int64_t i = 0; i < 50; ++i) doc.data<int32_t>()[i] = int32_t(i / 10);
  Mask oob = make_mask("doc[q_idx + 1] == doc[kv_idx]", ShapeInfo{1, 1, 1, 50, 50}, {doc});
  std::string msg =
      message([&] { runtime::create_block_mask(oob.mods, oob.bind, 1, 1, 50, 50, 16, 16); });
  EXPECT_NE(msg.find("create_block_mask"), std::string::npos) << msg;
  EXPECT_NE(msg.find("out of range"), std::string::npos) << msg;
  EXPECT_NE(msg.find("doc [50]"), std::string::npos) << msg;
  // A missing binding is named.
  msg = message([&] { runtime::create_block_mask(oob.mods, ModBindings{}, 1, 1, 50, 50); });
  EXPECT_NE(msg.find("buffer 'doc'"), std::string::npos) << msg;
  // And the next build still works.
  EXPECT_NO_THROW(runtime::create_block_mask(mk.mods, mk.bind, 1, 1, 16, 16));
}

}  // namespace
}  // namespace flexjit

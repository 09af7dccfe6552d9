// LABELS: unit compile_only
// Template instantiation: keys cover everything that affects the binary (a template edit, the
// spec, the mods), symbols are readable, and every template compiles with the identity mod for
// each dtype and a spread of head dims, so template errors show up here and not at a user's
// first call.
#include <gtest/gtest.h>

#include "jit/compile.h"
#include "jit/instantiate.h"
#include "jit/parser.h"

namespace flexjit::jit {
namespace {

ModSet mods_of(const std::string& score, const std::string& mask) {
  ModSet m;
  if (!score.empty()) m.score_mod = ir::cast(parse_expr(score, ParseScope{}), ir::Type::Float);
  ParseScope ms;
  ms.allow_score = false;
  if (!mask.empty()) m.mask_mod = ir::cast(parse_expr(mask, ms), ir::Type::Bool);
  return m;
}

TEST(Instantiate, KeyIsStableAndCoversSpecAndTemplates) {
  KernelSpec s;
  ModSet m = mods_of("score * 2.0", "q_idx >= kv_idx");
  Instantiation a = plan(s, m), b = plan(s, m);
  EXPECT_EQ(a.key, b.key);
  EXPECT_EQ(a.symbol, b.symbol);
  EXPECT_EQ(a.key.size(), 64u);

  auto differs = [&](const KernelSpec& s2, const ModSet& m2) { return plan(s2, m2).key != a.key; };
  KernelSpec t = s;
  t.head_dim = 80;
  EXPECT_TRUE(differs(t, m));
  t = s;
  t.head_dim_v = 80;
  EXPECT_TRUE(differs(t, m));
  t = s;
  t.block_m = 16;
  EXPECT_TRUE(differs(t, m));
  t = s;
  t.block_n = 32;
  EXPECT_TRUE(differs(t, m));
  t = s;
  t.gqa_group = 3;
  EXPECT_TRUE(differs(t, m));
  t = s;
  t.dtype = DType::BF16;
  EXPECT_TRUE(differs(t, m));
  // The attention kernel is mod-free: one binary per shape serves every mod set.
  EXPECT_FALSE(differs(s, mods_of("score * 3.0", "q_idx >= kv_idx")));
  EXPECT_FALSE(differs(s, ModSet{}));

  // The key folds in the kernel's own template files: one character changed in one of them
  // changes it; the other templates (the CUDA ones, say) do not enter it.
  std::vector<std::pair<std::string, std::string>> files;
  for (const auto& f : template_files(s)) files.emplace_back(f, template_text(f));
  ASSERT_FALSE(files.empty());
  std::string base = templates_digest(files);
  EXPECT_EQ(plan(s, m, base).key, a.key);
  files.back().second += " ";
  EXPECT_NE(plan(s, m, templates_digest(files)).key, a.key);
  EXPECT_NE(templates_digest(embedded_templates()), base);
  for (const auto& f : template_files(s)) EXPECT_EQ(f.find("templates/cuda/"), std::string::npos) << f;
}

TEST(Instantiate, ModsKeyCoversModsAndIgnoresShapes) {
  KernelSpec c;
  c.kind = KernelKind::Mods;
  ModSet m = mods_of("score * 2.0", "q_idx >= kv_idx");
  const std::string key = plan(c, m).key;
  EXPECT_NE(plan(c, mods_of("score * 5.0", "q_idx >= kv_idx")).key, key);
  EXPECT_NE(plan(c, mods_of("score * 2.0", "q_idx > kv_idx")).key, key);
  EXPECT_NE(plan(c, mods_of("score * 2.0", "")).key, key);
  KernelSpec other = c;
  other.head_dim = 80;
  other.dtype = DType::BF16;
  other.block_m = 16;
  EXPECT_EQ(plan(other, m).key, key);
  KernelSpec prefill;
  EXPECT_NE(plan(prefill, m).key, key);
  EXPECT_EQ(plan(c, m).symbol.rfind("flexjit_mods_", 0), 0u);
  // The Mods source holds the mod body; the attention source holds none.
  EXPECT_NE(make_source(c, m, "f").find("flexjit_score_mod"), std::string::npos);
  EXPECT_EQ(make_source(prefill, m, "f").find("flexjit_score_mod"), std::string::npos);
}

// Every mods source starts with the same precompilable prefix (jit/compile.h kPrefixEnd): the
// ABI, cpu/common.h and the codegen helpers, with nothing of the mod set, its symbol or the part.
TEST(Instantiate, ModsSourcesShareOnePrecompilablePrefix) {
  KernelSpec c;
  c.kind = KernelKind::Mods;
  auto prefix_of = [&](const ModSet& m, const std::string& symbol) {
    const std::string src = make_source(c, m, symbol);
    const size_t at = src.find(kPrefixEnd);
    EXPECT_NE(at, std::string::npos);
    EXPECT_EQ(src.find(kPrefixEnd, at + 1), std::string::npos) << "one marker";
    return src.substr(0, at);
  };
  const std::string p = prefix_of(mods_of("score * 2.0", "q_idx >= kv_idx"), "flexjit_mods_aaaa");
  EXPECT_EQ(prefix_of(mods_of("", "q_idx >= kv_idx"), "flexjit_mods_bbbb"), p);
  EXPECT_EQ(prefix_of(mods_of("score + float(kv_idx - q_idx)", ""), "flexjit_mods_cccc"), p);
  for (const char* absent : {"#define FLEXJIT_ENTRY", "FLEXJIT_PART ==", "FLEXJIT_PART !=", "#ifndef FLEXJIT_PART",
                              "#define FLEXJIT_HAS_", "#define FLEXJIT_NUM_", "flexjit_score_mod("})
    EXPECT_EQ(p.find(absent), std::string::npos) << absent << " in the prefix";
  EXPECT_NE(p.find("fj_tanhf"), std::string::npos) << "the helpers are in the prefix";
  // Attention kernels have none (their spec macros come first).
  EXPECT_EQ(make_source(KernelSpec{}, ModSet{}, "f").find(kPrefixEnd), std::string::npos);
}

TEST(Instantiate, SymbolIsReadable) {
  KernelSpec s;
  s.dtype = DType::BF16;
  s.head_dim = 128;
  s.head_dim_v = 128;
  s.block_m = 32;
  s.block_n = 64;
  s.gqa_group = 3;
  Instantiation i = plan(s, ModSet{});
  EXPECT_EQ(i.symbol.rfind("flexjit_prefill_bf16_d128_m32_n64_g3_", 0), 0u) << i.symbol;
  EXPECT_EQ(i.symbol.substr(i.symbol.size() - 8), i.key.substr(0, 8));
}

TEST(Instantiate, RejectsUnsupportedSpecs) {
  KernelSpec s;
  s.head_dim = 300;
  EXPECT_THROW(plan(s, ModSet{}), Error);
  s.head_dim = 64;
  s.dtype = DType::F64;
  EXPECT_THROW(plan(s, ModSet{}), Error);
}

struct CompileCase {
  KernelKind kind;
  DType dtype;
  int d, dv;
};

class TemplateCompiles : public ::testing::TestWithParam<CompileCase> {};

TEST_P(TemplateCompiles, WithIdentityMod) {
  const CompileCase& c = GetParam();
  KernelSpec s;
  s.kind = c.kind;
  s.dtype = c.dtype;
  s.head_dim = c.d;
  s.head_dim_v = c.dv;
  ModSet identity;
  if (c.kind == KernelKind::Mods) identity = mods_of("", "true");
  Instantiation i = plan(s, identity);
  std::string src = make_source(s, identity, i.symbol);
  EXPECT_EQ(src.find("#include"), std::string::npos) << "generated code must include no headers";
  CompileResult r = compile_cpp_to_object(src, i.symbol + ".cpp");
  EXPECT_NE(load_object(r.object, i.symbol), nullptr);
}

INSTANTIATE_TEST_SUITE_P(
    All, TemplateCompiles,
    ::testing::Values(CompileCase{KernelKind::Prefill, DType::F32, 64, 64},
                      CompileCase{KernelKind::Prefill, DType::F32, 1, 1},
                      CompileCase{KernelKind::Prefill, DType::BF16, 128, 128},
                      CompileCase{KernelKind::Prefill, DType::F16, 80, 48},
                      CompileCase{KernelKind::Prefill, DType::F32, 256, 256},
                      CompileCase{KernelKind::Decode, DType::F32, 64, 64},
                      CompileCase{KernelKind::Decode, DType::F32, 1, 1},
                      CompileCase{KernelKind::Decode, DType::BF16, 128, 128},
                      CompileCase{KernelKind::Decode, DType::BF16, 80, 48},
                      CompileCase{KernelKind::Decode, DType::F16, 256, 24},
                      CompileCase{KernelKind::Mods, DType::F32, 64, 64}),
    [](const auto& info) {
      const CompileCase& c = info.param;
      const char* kind = c.kind == KernelKind::Prefill ? "prefill_" : c.kind == KernelKind::Decode ? "decode_" : "mods_";
      return std::string(kind) + dtype_name(c.dtype) + "_d" +
             std::to_string(c.d) + "_dv" + std::to_string(c.dv);
    });

}  // namespace
}  // namespace flexjit::jit

#include "runtime/attention.h"


#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <numeric>

#include "jit/compile.h"
#include "jit/pipeline.h"
#include "runtime/bound_mods.h"
#include "runtime/decode.h"
#include "runtime/kernel_args.h"
#include "runtime/launch.h"
#include "runtime/tuning.h"

namespace flexjit {
namespace {

using runtime::BlockMask;

std::string dims(const TensorView& t) { return t.shape_str(); }

[[noreturn]] void fail(const std::string& msg) { throw Error("flex_attention: " + msg); }

// Checks run on every call: the message (string building, shape printing) is made only on failure.
#define REQUIRE(cond, msg) \
  do {                      \
    if (!(cond)) fail(msg);  \
  } while (0)

void check_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                  const TensorView* lse, const AttentionOptions& opt) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) {
    REQUIRE(t->rank == 4, std::string(name) + " must be 4-D [B, H, L, D], got shape " + dims(*t));
    REQUIRE(t->data != nullptr || t->numel() == 0, std::string(name) + " has no data");
    for (int i = 0; i < 4; ++i) REQUIRE(t->sizes[i] >= 1, std::string(name) + " has an empty dim: " + dims(*t));
  }
  REQUIRE(q.dtype == DType::F32 || q.dtype == DType::BF16 || q.dtype == DType::F16,
          std::string("q has dtype ") + dtype_name(q.dtype) + "; supported: fp32, bf16, fp16");
  REQUIRE(k.dtype == q.dtype && v.dtype == q.dtype,
          std::string("q, k, v must share a dtype, got ") + dtype_name(q.dtype) + ", " + dtype_name(k.dtype) +
              ", " + dtype_name(v.dtype));
  REQUIRE(out.dtype == q.dtype, std::string("out must have q's dtype ") + dtype_name(q.dtype));
  REQUIRE(k.sizes[3] == q.sizes[3], "q and k head dims differ: q " + dims(q) + ", k " + dims(k));
  REQUIRE(k.sizes[0] == v.sizes[0] && k.sizes[1] == v.sizes[1] && k.sizes[2] == v.sizes[2],
          "k and v must agree on [B, H, L]: k " + dims(k) + ", v " + dims(v));
  REQUIRE(k.sizes[0] == 1 || k.sizes[0] == q.sizes[0],
          "k/v batch must be 1 (broadcast) or q's batch " + std::to_string(q.sizes[0]) + ", got " + dims(k));
  int64_t Hq = q.sizes[1], Hkv = k.sizes[1];
  REQUIRE(Hq % Hkv == 0, "query heads (" + std::to_string(Hq) + ") must be a multiple of KV heads (" +
                             std::to_string(Hkv) + ")");
  REQUIRE(Hq == Hkv || opt.enable_gqa, "q has " + std::to_string(Hq) + " heads but k/v have " +
                                           std::to_string(Hkv) + "; pass enable_gqa=true for GQA/MQA");
  REQUIRE(out.sizes[0] == q.sizes[0] && out.sizes[1] == Hq && out.sizes[2] == q.sizes[2] &&
              out.sizes[3] == v.sizes[3],
          "out must be [B, Hq, Lq, Dv] = [" + std::to_string(q.sizes[0]) + ", " + std::to_string(Hq) + ", " +
              std::to_string(q.sizes[2]) + ", " + std::to_string(v.sizes[3]) + "], got " + dims(out));
  REQUIRE(q.sizes[3] <= 256 && v.sizes[3] <= 256,
          "head dims up to 256 are supported on CPU, got D=" + std::to_string(q.sizes[3]) +
              " Dv=" + std::to_string(v.sizes[3]));
  if (lse) {
    REQUIRE(lse->rank == 3 && lse->dtype == DType::F32 && lse->sizes[0] == q.sizes[0] &&
                lse->sizes[1] == Hq && lse->sizes[2] == q.sizes[2],
            "lse must be fp32 [B, Hq, Lq], got " + std::string(dtype_name(lse->dtype)) + " " + dims(*lse));
  }
  if (opt.scale) REQUIRE(std::isfinite(*opt.scale), "scale must be finite");
  runtime::check_mod_index_range(q.sizes[0], Hq, q.sizes[2], k.sizes[2], "flex_attention");
}

// FLEXJIT_DPBF16: "0" refuses the vdpbf16ps engine, "1" prefers it over AMX; else -1 (auto).
int dpbf16_env() {
  const char* env = std::getenv("FLEXJIT_DPBF16");
  if (!env) return -1;
  const std::string v = env;
  return v == "0" ? 0 : v == "1" ? 1 : -1;
}

// Why an engine cannot run: the host lacks the feature, or the compile target leaves it out.
std::string lacks(const char* feature) {
  return jit::host_has_feature(feature)
             ? "the compile target FLEXJIT_CPU_TARGET=" + jit::cpu_target_name() + " leaves out " + feature
             : std::string("the CPU lacks ") + feature;
}
}  // namespace

bool amx_available(std::string* why) {
  static const std::string reason = [] {
    const char* env = std::getenv("FLEXJIT_AMX");
    if (env && std::string(env) == "0") return std::string("FLEXJIT_AMX=0 is set");
    for (const char* f : {"amx-tile", "amx-bf16", "avx512bf16", "avx512bw"})
      if (!jit::target_has_feature(f)) return lacks(f);
#if defined(__linux__) && defined(SYS_arch_prctl)
    // Linux keeps the 8 KB tile data state off until a process asks (kernel 5.16+); the first
    // tile instruction of a process that did not ask faults. Granted per process, for every thread.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      return std::string("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)");
    return std::string();
#else
    return std::string("AMX is only enabled on Linux");
#endif
  }();
  if (why) *why = reason;
  return reason.empty();
}

bool dpbf16_available(std::string* why) {
  static const std::string reason = [] {
#if defined(__aarch64__)
    for (const char* f : {"bf16"})  // FEAT_BF16: BFDOT (templates/cpu/prefill_dpbf16.h's Arm spelling)
#else
    for (const char* f : {"avx512bf16", "avx512bw"})
#endif
      if (!jit::target_has_feature(f)) return lacks(f);
    return std::string();
  }();
  const std::string r = dpbf16_env() == 0 ? std::string("FLEXJIT_DPBF16=0 is set") : reason;
  if (why) *why = r;
  return r.empty();
}

PrefillEngine preferred_prefill_engine(DType dtype, const AttentionOptions& opt) {
  // bf16 and fp16 (as bf16 hi + lo halves, three products per step: templates/cpu/prefill_amx.h)
  // run on AMX tiles; vdpbf16ps takes bf16 only, so FLEXJIT_DPBF16 does not apply to fp16.
  const bool bf16 = dtype == DType::BF16, amx_dtype = bf16 || dtype == DType::F16;
  // An explicit USE_AMX=1 outranks the environment's preference for vdpbf16ps.
  const int want_dp = opt.use_dpbf16 >= 0 ? opt.use_dpbf16 : opt.use_amx == 1 || !bf16 ? -1 : dpbf16_env();
  REQUIRE(!(opt.use_amx == 1 && want_dp == 1),
          "USE_AMX=1 and USE_DPBF16=1 each require a different engine; set one of them");
  REQUIRE(opt.use_amx != 1 || amx_dtype, std::string("USE_AMX=1 needs bf16 or fp16 inputs, got ") + dtype_name(dtype));
  REQUIRE(opt.use_dpbf16 != 1 || bf16, std::string("USE_DPBF16=1 needs bf16 inputs, got ") + dtype_name(dtype));
  if (!amx_dtype) return PrefillEngine::Fma;
  std::string no_amx, no_dp;
  const bool amx_ok = opt.use_amx != 0 && want_dp != 1 && amx_available(&no_amx);
  const bool dp_ok = bf16 && want_dp != 0 && dpbf16_available(&no_dp);
  REQUIRE(opt.use_amx != 1 || amx_ok, "USE_AMX=1 but " + no_amx);
  REQUIRE(want_dp != 1 || dp_ok,
          (opt.use_dpbf16 == 1 ? "USE_DPBF16=1" : "FLEXJIT_DPBF16=1") + std::string(" but ") + no_dp +
              "; leave it unset to use the engine the host has");
  return amx_ok ? PrefillEngine::Amx : dp_ok ? PrefillEngine::Dpbf16 : PrefillEngine::Fma;
}

// FMA engine: 64 x 64 measured ~20% faster than 32 x 64 at long sequences on this CPU (fp32 and
// bf16, D 64 and 128). Query rows are padded to BLOCK_M, so short queries (decode: Lq = 1) take
// the smallest tile of one 16-lane vector, with longer KV blocks to amortise the per-block work:
// B=4 Hq=8 Hkv=2 Lkv=8192 D=64 decode went from 39 ms (64x64) to 16 ms (16x128) in fp32.
// AMX engine (bf16): each block's accumulator tiles go through memory once, and K and V stream
// once per query block, so larger blocks pay: 128 x 128 ran 0.74x the time of 64 x 64 at
// D=128 L=4096 (256 x 128 and 128 x 256 gained nothing more). The autotuner will replace this.
void default_blocks(int head_dim, DType dtype, int64_t q_len, int* block_m, int* block_n, PrefillEngine engine) {
  (void)head_dim;
  (void)dtype;
  const bool amx = engine == PrefillEngine::Amx;
  *block_m = q_len <= 16 ? 16 : q_len <= 32 ? 32 : q_len <= 64 || !amx ? 64 : 128;
  *block_n = q_len <= 16 || amx ? 128 : 64;
}

namespace runtime {

// An upper bound on the attention kernel's per-thread stack scratch (FjkTile of the engine in
// templates/cpu/prefill_<engine>.h). FMA: query rows padded to 16, KV rows and output features
// padded to a register group of at most 24, packed rows padded to 16 plus one cache line. AMX:
// query rows padded to 16, D and Dv to 32; fp32 S^T and O, bf16 K, P and VNNI Q, V (fp16: each
// of those four twice, hi and lo words). vdpbf16ps:
// the FMA engine's shapes with Q, K, P and V held as bf16 pairs (dwords).
// The templates static_assert 1 MiB; checking here turns a compile error into a plain message.
int64_t tile_scratch_bound(DType dtype, int64_t D, int64_t Dv, int64_t bm, int64_t bn, PrefillEngine engine) {
  auto up = [](int64_t x, int64_t g) { return (x + g - 1) / g * g; };
  const int64_t mp = up(bm, 16);
  if (engine == PrefillEngine::Amx) {
    const int64_t dp = up(D, 32), dvp = up(Dv, 32), halves = dtype == DType::F16 ? 2 : 1;
    return halves * (2 * dp * mp + 2 * bn * dp + 2 * mp * bn + 2 * bn * dvp) + 4 * bn * mp + 4 * mp * dvp + 4096;
  }
  const int64_t np = bn + 23, dvp = Dv + 23;
  if (engine == PrefillEngine::Dpbf16) {
    const int64_t dpairs = (D + 1) / 2, npairs = (bn + 1) / 2;
    const int64_t dwords = dpairs * mp + np * mp + npairs * mp + dvp * mp + np * (up(dpairs, 16) + 16) +
                           npairs * (up(dvp, 16) + 16);
    return dwords * 4 + 4096;
  }
  const int64_t floats = D * mp + np * mp + dvp * mp + np * (up(D, 16) + 16) + bn * (up(dvp, 16) + 16);
  return floats * 4 + 4096;  // + the softmax state vectors and alignment
}

void check_attention_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                            const TensorView* lse, const AttentionOptions& opt) {
  check_inputs(q, k, v, out, lse, opt);
}

PrefillEngine prefill_engine_for_blocks(PrefillEngine preferred, DType dtype, int bm, int bn, int64_t D,
                                        int64_t Dv, const AttentionOptions& opt, const char* what) {
  auto fail_here = [&](const std::string& msg) { throw Error(std::string(what) + ": " + msg); };
  // The AMX engine pairs KV rows by 32 (P V's left operand); other blocks fall back to
  // vdpbf16ps where the host has it.
  PrefillEngine engine = preferred;
  if (engine == PrefillEngine::Amx && bn % 32 != 0) {
    if (opt.use_amx == 1) fail_here("USE_AMX=1 needs BLOCK_N to be a multiple of 32, got " + std::to_string(bn));
    engine = dtype == DType::BF16 && opt.use_dpbf16 != 0 && dpbf16_available() ? PrefillEngine::Dpbf16
                                                                                : PrefillEngine::Fma;
  }
  const int64_t scratch = tile_scratch_bound(dtype, D, Dv, bm, bn, engine);
  if (scratch > kTileScratchLimit)
    fail_here("BLOCK_M x BLOCK_N = " + std::to_string(bm) + "x" + std::to_string(bn) + " with D=" +
              std::to_string(D) + ", Dv=" + std::to_string(Dv) + " needs up to " + std::to_string(scratch / 1024) +
              " KiB of per-thread scratch, over the kernel's 1 MiB; use smaller "
              "blocks, or leave BLOCK_M / BLOCK_N to the defaults");
  return engine;
}

PrefillKernels get_prefill_kernels(DType dtype, int head_dim, int head_dim_v, int bm, int bn, int gqa_group,
                                   PrefillEngine engine, const ModSet& mods) {
  // The attention kernel (per shape) and the mod set's kernels (per mod set) are separate
  // binaries: a new mod on a known shape compiles only the small one, and when both are new
  // they compile in parallel.
  jit::KernelSpec spec;
  spec.kind = jit::KernelKind::Prefill;
  spec.dtype = dtype;
  spec.head_dim = head_dim;
  spec.head_dim_v = head_dim_v;
  spec.block_m = bm;
  spec.block_n = bn;
  spec.gqa_group = gqa_group;
  spec.engine = engine;
  const bool any_mod = mods.has_score_mod() || mods.has_mask_mod();
  jit::KernelSpec mods_spec;
  mods_spec.kind = jit::KernelKind::Mods;
  std::vector<jit::KernelRequest> requests{{spec, &mods}};
  if (any_mod) requests.push_back({mods_spec, &mods});
  PrefillKernels pk;
  auto tk = std::chrono::steady_clock::now();
  pk.kernels = jit::get_kernels(requests);
  pk.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tk).count();
  if (any_mod) reinterpret_cast<FlexModKernelsFn>(pk.kernels[1].fn)(&pk.mods);
  return pk;
}

}  // namespace runtime

void flex_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                    const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                    const BlockMask* block_mask, const AttentionOptions& opt, AttentionReport* report) {
  check_inputs(q, k, v, out, lse, opt);
  validate(mods);
  if (runtime::decode_applies(q, k, v, block_mask, opt)) {
    runtime::DecodeKv kv;
    kv.k = &k;
    kv.v = &v;
    runtime::run_decode(q, kv, out, lse, mods, bind, block_mask, opt, report);
    return;
  }
  AttentionReport rep;
  // bf16 runs its matmuls on AMX tiles where it can, else on vdpbf16ps where it can.
  const PrefillEngine preferred = preferred_prefill_engine(q.dtype, opt);
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], Hkv = k.sizes[1], Lkv = k.sizes[2];
  // A mask built for this call broadcasts over batch / heads its mask_mod does not read.
  const bool mask_reads_b = mods.has_mask_mod() && ir::uses_var(mods.mask_mod, ir::Var::B);
  const bool mask_reads_h = mods.has_mask_mod() && ir::uses_var(mods.mask_mod, ir::Var::H);
  // Decode-like calls (a few query rows) with GQA pack the group's query heads into one tile,
  // so K and V stream once per KV head instead of once per query head. The tile's rows then
  // span heads, so the mask must not differ by head, and its first q-block must hold every row.
  const int64_t group = Hq / Hkv;
  const bool pack_gqa =
      group > 1 && Lq <= 16 &&
      (block_mask ? block_mask->H == 1 && Lq <= block_mask->q_block_size : !mask_reads_h);
  runtime::PrefillShape shape;
  shape.dtype = q.dtype;
  shape.head_dim = int(q.sizes[3]);
  shape.head_dim_v = int(v.sizes[3]);
  shape.gqa_group = int(group);
  shape.lq = Lq;
  shape.lkv = Lkv;
  shape.units = B * (pack_gqa ? Hkv : Hq);
  shape.pack_gqa = pack_gqa;
  shape.engine = preferred;
  shape.threads = runtime::planned_threads(opt);
  const runtime::PrefillKnobs knobs = runtime::plan_prefill(shape, opt);
  int bm = knobs.block_m, bn = knobs.block_n;
  REQUIRE(bm >= 1 && bm <= 256 && bn >= 1 && bn <= 512,
          "BLOCK_M must be in 1..256 and BLOCK_N in 1..512, got " + std::to_string(bm) + "x" + std::to_string(bn));
  if (block_mask) {
    // Kernel blocks must tile the mask's blocks; defaults adapt, explicit choices are checked.
    if (!opt.block_m && block_mask->q_block_size % bm) bm = int(std::gcd(int64_t(bm), block_mask->q_block_size));
    if (!opt.block_n && block_mask->kv_block_size % bn) bn = int(std::gcd(int64_t(bn), block_mask->kv_block_size));
    runtime::check_block_mask(*block_mask, q.sizes[0], q.sizes[1], q.sizes[2], k.sizes[2], bm, bn, "flex_attention");  // before anything compiles
  }
  const PrefillEngine engine =
      runtime::prefill_engine_for_blocks(preferred, q.dtype, bm, bn, q.sizes[3], v.sizes[3], opt,
                                        "flex_attention");
  runtime::PrefillKernels pk = runtime::get_prefill_kernels(q.dtype, int(q.sizes[3]), int(v.sizes[3]), bm, bn,
                                                            int(group), engine, mods);
  const FlexModKernels& mk = pk.mods;
  // A mask_mod without a BlockMask gets one for this call (in blocks that BLOCK_M x BLOCK_N
  // tile), classified by the mods kernel just fetched.
  BlockMask built;
  if (!block_mask && mods.has_mask_mod()) {
    int64_t qbs = ((128 + bm - 1) / bm) * bm, kvbs = ((128 + bn - 1) / bn) * bn;
    runtime::BlockMaskBuildStats st;
    built = runtime::create_block_mask(mods, bind, mask_reads_b ? B : 1, mask_reads_h ? Hq : 1, Lq, Lkv, qbs, kvbs,
                                       &st);
    rep.block_mask_ms = st.ms;
    runtime::check_block_mask(built, q.sizes[0], q.sizes[1], q.sizes[2], k.sizes[2], bm, bn, "flex_attention");
    block_mask = &built;
  }
  if (block_mask) rep.block_mask = block_mask->describe();
  runtime::BoundMods bound(mods, bind);

  FlexPrefillArgs a{};
  runtime::set_tensor_args(a, q, k, v, out, lse);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = Lq;
  a.Lkv = Lkv;
  a.Bkv = k.sizes[0];
  a.scale = float(opt.scale ? *opt.scale : 1.0 / std::sqrt(double(q.sizes[3])));
  if (block_mask) a.mask = runtime::kernel_args(*block_mask);
  a.apply_mods = mk.apply;  // null without a mod
  a.has_score_mod = mk.has_score_mod;
  a.has_mask_mod = mk.has_mask_mod;
  a.pack_gqa = pack_gqa ? 1 : 0;
  a.mod = bound.args();

  auto fn = reinterpret_cast<FlexPrefillFn>(pk.kernels[0].fn);
  const int64_t m_blocks = ((pack_gqa ? group * Lq : Lq) + bm - 1) / bm;
  const int64_t items = B * (pack_gqa ? Hkv : Hq) * m_blocks;
  auto t0 = std::chrono::steady_clock::now();
  // Items are ordered (b, h, m_block) and a causal item's cost grows with m_block: zigzag.
  runtime::run_items(opt, items, /*zigzag=*/true, [&](int64_t begin, int64_t end) { fn(&a, begin, end); });
  rep.kernel_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  bound.check_error_flag("flex_attention");

  if (report) {
    runtime::record_prefill(rep, pk, bm, bn, knobs.tuning, int(group), engine, q.dtype);
    rep.pack_gqa = pack_gqa;
    *report = rep;
  }
}

}  // namespace flexjit

#include "runtime/varlen.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "runtime/bound_mods.h"
#include "runtime/kernel_args.h"
#include "runtime/launch.h"
#include "runtime/tuning.h"

namespace flexjit {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error("flash_attn_varlen_func: " + msg); }
#define REQUIRE(cond, msg) \
  do {                      \
    if (!(cond)) fail(msg);  \
  } while (0)

std::string str(int64_t v) { return std::to_string(v); }

// The names the varlen options add to the mod set; a user mod may not use them.
constexpr const char* kOffsetBuffer = "varlen_seq_offset";  // int32 [batch]: sk - sq per sequence
constexpr const char* kSlopesBuffer = "varlen_alibi_slopes";
constexpr const char* kSoftcapParam = "varlen_softcap";

// Reads and checks one cu_seqlens tensor: int32 [batch + 1], 0 first, non-decreasing, ending at
// most at `total` (rows of the packed tensor it indexes).
std::vector<int32_t> read_cu_seqlens(const TensorView& t, const char* name, const char* tensor, int64_t total) {
  REQUIRE(t.dtype == DType::I32, std::string(name) + " must be int32, got " + dtype_name(t.dtype) +
                                     " (convert with .to(torch.int32))");
  REQUIRE(t.rank == 1 && t.sizes[0] >= 1,
          std::string(name) + " must be 1-D [batch + 1] with at least one entry, got shape " + t.shape_str());
  REQUIRE(t.data != nullptr, std::string(name) + " has no data");
  std::vector<int32_t> cu(size_t(t.sizes[0]));
  for (int64_t i = 0; i < t.sizes[0]; ++i) cu[size_t(i)] = static_cast<const int32_t*>(t.data)[i * t.strides[0]];
  REQUIRE(cu[0] == 0, std::string(name) + "[0] must be 0, got " + str(cu[0]));
  for (size_t i = 1; i < cu.size(); ++i)
    REQUIRE(cu[i] >= cu[i - 1], std::string(name) + " must not go backwards, but " + name + "[" + str(int64_t(i)) +
                                    "] = " + str(cu[i]) + " < " + name + "[" + str(int64_t(i) - 1) + "] = " +
                                    str(cu[i - 1]));
  REQUIRE(cu.back() <= total, std::string(name) + " ends at " + str(cu.back()) + ", past the " + str(total) +
                                  " rows of " + tensor);
  return cu;
}

void check_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                  const TensorView* lse, const VarlenOptions& vo) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) {
    REQUIRE(t->rank == 3, std::string(name) + " must be 3-D [total, H, D] (packed sequences), got shape " +
                              t->shape_str());
    REQUIRE(t->sizes[1] >= 1 && t->sizes[2] >= 1, std::string(name) + " has no heads or features: " + t->shape_str());
    REQUIRE(t->data != nullptr || t->numel() == 0, std::string(name) + " has no data");
  }
  REQUIRE(q.dtype == DType::F32 || q.dtype == DType::BF16 || q.dtype == DType::F16,
          std::string("q has dtype ") + dtype_name(q.dtype) + "; supported: fp32, bf16, fp16");
  REQUIRE(k.dtype == q.dtype && v.dtype == q.dtype && out.dtype == q.dtype,
          std::string("q, k, v and out must share a dtype, got ") + dtype_name(q.dtype) + ", " +
              dtype_name(k.dtype) + ", " + dtype_name(v.dtype) + ", " + dtype_name(out.dtype));
  REQUIRE(k.sizes[2] == q.sizes[2], "q and k head dims differ: q " + q.shape_str() + ", k " + k.shape_str());
  REQUIRE(k.sizes[0] == v.sizes[0] && k.sizes[1] == v.sizes[1],
          "k and v must agree on [total_k, Hkv]: k " + k.shape_str() + ", v " + v.shape_str());
  const int64_t Hq = q.sizes[1], Hkv = k.sizes[1];
  REQUIRE(Hq % Hkv == 0, "query heads (" + str(Hq) + ") must be a multiple of KV heads (" + str(Hkv) + ")");
  REQUIRE(out.sizes[0] == q.sizes[0] && out.sizes[1] == Hq && out.sizes[2] == v.sizes[2],
          "out must be [total_q, Hq, Dv] = [" + str(q.sizes[0]) + ", " + str(Hq) + ", " + str(v.sizes[2]) +
              "], got " + out.shape_str());
  REQUIRE(q.sizes[2] <= 256 && v.sizes[2] <= 256,
          "head dims up to 256 are supported on CPU, got D=" + str(q.sizes[2]) + " Dv=" + str(v.sizes[2]));
  if (lse)
    REQUIRE(lse->rank == 2 && lse->dtype == DType::F32 && lse->sizes[0] == Hq && lse->sizes[1] == q.sizes[0],
            "lse must be fp32 [Hq, total_q] = [" + str(Hq) + ", " + str(q.sizes[0]) + "], got " +
                dtype_name(lse->dtype) + " " + lse->shape_str());
  if (vo.scale) REQUIRE(std::isfinite(*vo.scale), "softmax_scale must be finite");
  REQUIRE(std::isfinite(vo.softcap) && vo.softcap >= 0,
          "softcap must be finite and >= 0 (0 = off), got " + std::to_string(vo.softcap));
  REQUIRE(vo.window_left >= -1 && vo.window_right >= -1,
          "window sizes must be >= 0, or -1 for unlimited, got (" + str(vo.window_left) + ", " +
              str(vo.window_right) + ")");
}

// The mods of a varlen call: the user's, wrapped in FA2's options (see varlen.h).
struct VarlenMods {
  ModSet mods;
  ModBindings bind;
  std::vector<int32_t> offsets;  // backs the offset buffer
};

void compose_mods(VarlenMods* vm, const ModSet& user, const ModBindings& user_bind, const VarlenOptions& vo,
                  int64_t wl, int64_t wr, const std::vector<int32_t>& cu_q, const std::vector<int32_t>& cu_k,
                  int64_t Hq) {
  for (const auto& b : user.buffers)
    REQUIRE(b.name != kOffsetBuffer && b.name != kSlopesBuffer,
            "the mods' buffer name '" + b.name + "' is reserved by the varlen options; rename it");
  for (const auto& p : user.params)
    REQUIRE(p.name != kSoftcapParam, "the mods' param name '" + p.name + "' is reserved by softcap; rename it");
  using namespace ir;
  ModSet& m = vm->mods;
  m = user;
  vm->bind = user_bind;
  const int64_t batch = int64_t(cu_q.size()) - 1;
  const bool alibi = vo.alibi_slopes != nullptr;
  // q_idx + offset[b]: the query's key position (bottom-right alignment). Where every sequence
  // has as many queries as keys (self-attention prefill) it is q_idx, and the mods read no
  // offset buffer (one gather less per score).
  Expr qpos = variable(Var::QIdx);
  if (wl >= 0 || wr >= 0 || alibi) {
    vm->offsets.resize(size_t(batch));
    bool any_offset = false;
    for (int64_t s = 0; s < batch; ++s) {
      vm->offsets[size_t(s)] = (cu_k[size_t(s) + 1] - cu_k[size_t(s)]) - (cu_q[size_t(s) + 1] - cu_q[size_t(s)]);
      any_offset |= vm->offsets[size_t(s)] != 0;
    }
    if (any_offset) {
      BufferDecl off{kOffsetBuffer, DType::I32, 1};
      m.buffers.push_back(off);
      vm->bind.buffers.push_back({kOffsetBuffer, contiguous_view(vm->offsets.data(), DType::I32, {batch})});
      qpos = binary(Op::Add, qpos, load(off, {variable(Var::B)}));
    }
  }
  Expr s = variable(Var::Score);
  bool wrapped = false;
  if (vo.softcap > 0) {
    const Expr c = param(kSoftcapParam);
    s = binary(Op::Mul, c, unary(Op::Tanh, binary(Op::Div, s, c)));
    m.params.push_back({kSoftcapParam});
    vm->bind.params.push_back({kSoftcapParam, vo.softcap});
    wrapped = true;
  }
  if (alibi) {
    const TensorView& sl = *vo.alibi_slopes;
    REQUIRE(sl.dtype == DType::F32, std::string("alibi_slopes must be fp32, got ") + dtype_name(sl.dtype));
    REQUIRE((sl.rank == 1 && sl.sizes[0] == Hq) || (sl.rank == 2 && sl.sizes[0] == batch && sl.sizes[1] == Hq),
            "alibi_slopes must be [Hq] = [" + str(Hq) + "] or [batch, Hq] = [" + str(batch) + ", " + str(Hq) +
                "], got " + sl.shape_str());
    REQUIRE(sl.data != nullptr, "alibi_slopes has no data");
    BufferDecl slopes{kSlopesBuffer, DType::F32, sl.rank};
    const Expr slope = sl.rank == 1 ? load(slopes, {variable(Var::H)})
                                    : load(slopes, {variable(Var::B), variable(Var::H)});
    const Expr dist = cast(unary(Op::Abs, binary(Op::Sub, qpos, variable(Var::KvIdx))), Type::Float);
    s = binary(Op::Sub, s, binary(Op::Mul, slope, dist));
    m.buffers.push_back(slopes);
    vm->bind.buffers.push_back({kSlopesBuffer, sl});
    wrapped = true;
  }
  if (wrapped) m.score_mod = user.score_mod ? substitute(user.score_mod, Var::Score, s) : s;
  if (wl >= 0 || wr >= 0) {
    Expr band;
    if (wl >= 0) band = binary(Op::Ge, variable(Var::KvIdx), binary(Op::Sub, qpos, constant_int(wl)));
    if (wr >= 0) {
      const Expr upper = binary(Op::Le, variable(Var::KvIdx), binary(Op::Add, qpos, constant_int(wr)));
      band = band ? binary(Op::And, band, upper) : upper;
    }
    m.mask_mod = user.mask_mod ? binary(Op::And, band, user.mask_mod) : band;
  }
  std::sort(m.buffers.begin(), m.buffers.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  std::sort(m.params.begin(), m.params.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  validate(m);
}

// Key blocks a tile of rows [q0, q0 + rows) visits: the kernel's fjk_walk_band, counted.
int64_t band_blocks(int64_t q0, int64_t rows, int64_t sq, int64_t sk, int64_t wl, int64_t wr, int64_t bn) {
  const int64_t off = sk - sq, first = q0 + off, last = q0 + rows - 1 + off;
  const int64_t lo = std::max<int64_t>(0, wl >= 0 ? first - wl : 0);
  const int64_t hi = std::min<int64_t>(sk, wr >= 0 ? last + wr + 1 : sk);
  return hi > lo ? (hi + bn - 1) / bn - lo / bn : 0;
}

}  // namespace

void varlen_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k, const TensorView& out, const TensorView* lse, const ModSet& user_mods,
                      const ModBindings& user_bind, const VarlenOptions& vo, const AttentionOptions& opt,
                      AttentionReport* report) {
  check_inputs(q, k, v, out, lse, vo);
  validate(user_mods);
  const std::vector<int32_t> cu_q = read_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", "q", q.sizes[0]);
  const std::vector<int32_t> cu_k = read_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", "k", k.sizes[0]);
  REQUIRE(cu_q.size() == cu_k.size(), "cu_seqlens_q has " + str(int64_t(cu_q.size()) - 1) +
                                          " sequences but cu_seqlens_k has " + str(int64_t(cu_k.size()) - 1) +
                                          "; both must be [batch + 1]");
  const int64_t batch = int64_t(cu_q.size()) - 1;
  runtime::check_mod_index_range(batch, q.sizes[1], q.sizes[0], k.sizes[0], "varlen_attention");
  int64_t longest_q = 0, longest_k = 0;
  for (int64_t s = 0; s < batch; ++s) {
    longest_q = std::max<int64_t>(longest_q, cu_q[size_t(s) + 1] - cu_q[size_t(s)]);
    longest_k = std::max<int64_t>(longest_k, cu_k[size_t(s) + 1] - cu_k[size_t(s)]);
  }
  REQUIRE(max_seqlen_q >= longest_q && max_seqlen_k >= longest_k,
          "max_seqlen_q / max_seqlen_k = " + str(max_seqlen_q) + " / " + str(max_seqlen_k) +
              " but the longest sequence has " + str(longest_q) + " queries / " + str(longest_k) +
              " keys; pass at least those (e.g. (cu_seqlens[1:] - cu_seqlens[:-1]).max())");
  const int64_t Hq = q.sizes[1], Hkv = k.sizes[1], D = q.sizes[2], Dv = v.sizes[2];
  const int64_t wl = vo.window_left, wr = vo.causal ? 0 : vo.window_right;

  VarlenMods vm;
  compose_mods(&vm, user_mods, user_bind, vo, wl, wr, cu_q, cu_k, Hq);
  const ModSet& mods = vm.mods;

  AttentionReport rep;
  rep.path = "varlen";
  const PrefillEngine preferred = preferred_prefill_engine(q.dtype, opt);
  runtime::PrefillShape shape;
  shape.dtype = q.dtype;
  shape.head_dim = int(D);
  shape.head_dim_v = int(Dv);
  shape.gqa_group = int(Hq / Hkv);
  shape.lq = std::max<int64_t>(longest_q, 1);
  shape.lkv = std::max<int64_t>(longest_k, 1);
  shape.units = std::max<int64_t>(batch, 1) * Hq;
  shape.engine = preferred;
  shape.threads = runtime::planned_threads(opt);
  const runtime::PrefillKnobs knobs = runtime::plan_prefill(shape, opt);
  const int bm = knobs.block_m, bn = knobs.block_n;
  REQUIRE(bm >= 1 && bm <= 256 && bn >= 1 && bn <= 512,
          "BLOCK_M must be in 1..256 and BLOCK_N in 1..512, got " + str(bm) + "x" + str(bn));
  const PrefillEngine engine =
      runtime::prefill_engine_for_blocks(preferred, q.dtype, bm, bn, D, Dv, opt, "flash_attn_varlen_func");

  // Work items (sequence, q-block), dearest first (cost: key blocks visited, plus a block's worth
  // of per-item work), so the long sequences start first and short ones fill in behind them.
  struct Entry {
    int32_t seq, qblock;
    int64_t cost;
  };
  std::vector<Entry> entries;
  for (int64_t s = 0; s < batch; ++s) {
    const int64_t sq = cu_q[size_t(s) + 1] - cu_q[size_t(s)], sk = cu_k[size_t(s) + 1] - cu_k[size_t(s)];
    for (int64_t qb = 0; qb * bm < sq; ++qb)
      entries.push_back({int32_t(s), int32_t(qb),
                         1 + band_blocks(qb * bm, std::min<int64_t>(bm, sq - qb * bm), sq, sk, wl, wr, bn)});
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.cost > b.cost; });
  std::vector<int32_t> items(2 * entries.size());
  for (size_t e = 0; e < entries.size(); ++e) {
    items[2 * e] = entries[e].seq;
    items[2 * e + 1] = entries[e].qblock;
  }

  runtime::PrefillKernels pk = runtime::get_prefill_kernels(q.dtype, int(D), int(Dv), bm, bn, int(Hq / Hkv),
                                                            engine, mods);
  runtime::BoundMods bound(mods, vm.bind);

  // The packed tensors as the kernel's 4-D views: [1, H, total, D] (a zero batch stride).
  auto as4 = [](const TensorView& t) {
    TensorView r = t;
    r.rank = 4;
    r.sizes[0] = 1, r.sizes[1] = t.sizes[1], r.sizes[2] = t.sizes[0], r.sizes[3] = t.sizes[2];
    r.strides[0] = 0, r.strides[1] = t.strides[1], r.strides[2] = t.strides[0], r.strides[3] = t.strides[2];
    return r;
  };
  TensorView lse3;
  if (lse) {
    lse3 = *lse;
    lse3.rank = 3;
    lse3.sizes[0] = 1, lse3.sizes[1] = lse->sizes[0], lse3.sizes[2] = lse->sizes[1];
    lse3.strides[0] = 0, lse3.strides[1] = lse->strides[0], lse3.strides[2] = lse->strides[1];
  }
  FlexPrefillArgs a{};
  runtime::set_tensor_args(a, as4(q), as4(k), as4(v), as4(out), lse ? &lse3 : nullptr);
  a.B = batch;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = longest_q;
  a.Lkv = longest_k;
  a.Bkv = 1;
  a.scale = float(vo.scale ? *vo.scale : 1.0 / std::sqrt(double(D)));
  a.apply_mods = pk.mods.apply;  // null without a mod
  a.has_score_mod = pk.mods.has_score_mod;
  a.has_mask_mod = pk.mods.has_mask_mod;
  a.mod = bound.args();
  a.cu_seqlens_q = cu_q.data();
  a.cu_seqlens_k = cu_k.data();
  a.varlen_items = items.data();
  a.window_left = wl;
  a.window_right = wr;
  a.varlen_mask_all = user_mods.has_mask_mod() ? 1 : 0;

  auto fn = reinterpret_cast<FlexPrefillFn>(pk.kernels[0].fn);
  auto t0 = std::chrono::steady_clock::now();
  runtime::run_items(opt, int64_t(entries.size()) * Hq, /*zigzag=*/true,
                     [&](int64_t begin, int64_t end) { fn(&a, begin, end); });
  // Rows past the last sequence belong to none: out 0, lse -inf (as a fully masked row).
  for (int64_t row = cu_q.back(); row < q.sizes[0]; ++row)
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t d = 0; d < Dv; ++d)
        write_element_f64(out, row * out.strides[0] + h * out.strides[1] + d * out.strides[2], 0.0);
      if (lse)
        static_cast<float*>(lse->data)[h * lse->strides[0] + row * lse->strides[1]] =
            -std::numeric_limits<float>::infinity();
    }
  rep.kernel_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  bound.check_error_flag("flash_attn_varlen_func");

  if (report) {
    runtime::record_prefill(rep, pk, bm, bn, knobs.tuning, int(Hq / Hkv), engine, q.dtype);
    *report = rep;
  }
}

}  // namespace flexjit

#include "runtime/backward.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "jit/pipeline.h"
#include "runtime/bound_mods.h"
#include "runtime/kernel_args.h"
#include "runtime/launch.h"

namespace flexjit {
namespace {

using runtime::BlockMask;

[[noreturn]] void fail(const std::string& msg) { throw Error("flex_attention_backward: " + msg); }
#define REQUIRE(cond, msg) \
  do {                      \
    if (!(cond)) fail(msg);  \
  } while (0)

// An upper bound on the backward kernel's per-thread stack scratch (FjbTile in
// templates/cpu/flash_backward.h, with the vdpbf16ps arrays); the template static_asserts 1.5 MiB,
// and checking here turns that compile error into a plain message.
int64_t backward_scratch_bound(int64_t D, int64_t Dv, int64_t bm, int64_t bn) {
  auto up = [](int64_t x) { return (x + 15) / 16 * 16; };
  const int64_t dp = up(D), dvp = up(Dv), np = up(bn);
  const int64_t floats = bn * dp * 2 + D * np + Dv * np + bn * dvp + bm * dp + bm * dvp + 3 * bm * np;
  const int64_t dwords = (D + 1) / 2 * np + (Dv + 1) / 2 * np + np / 2 * dp + bm * ((D + 1) / 2) +
                         bm * ((Dv + 1) / 2) + (bm + 1) / 2 * (dp + dvp + 2 * np) + bm * np / 2;
  return 4 * (floats + dwords) + 8192;
}

bool is_contiguous_f32(const TensorView& t) {
  if (t.dtype != DType::F32) return false;
  int64_t expect = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    if (t.sizes[i] != 1 && t.strides[i] != expect) return false;
    expect *= t.sizes[i];
  }
  return true;
}

void check_grad_view(const TensorView& g, const char* name, std::initializer_list<int64_t> sizes) {
  std::string want = "[";
  int i = 0;
  bool ok = g.rank == int(sizes.size());
  for (int64_t s : sizes) {
    want += (i ? ", " : "") + std::to_string(s);
    ok = ok && g.sizes[i] == s;
    ++i;
  }
  want += "]";
  REQUIRE(ok && is_contiguous_f32(g) && (g.data != nullptr || g.numel() == 0),
          std::string(name) + " must be an fp32 contiguous " + want + " tensor, got " + dtype_name(g.dtype) + " " +
              g.shape_str());
}

}  // namespace

namespace runtime {

BlockMask transpose_block_mask(const BlockMask& m) {
  BlockMask t;
  t.B = m.B;
  t.H = m.H;
  t.Lq = m.Lkv;
  t.Lkv = m.Lq;
  t.q_block_size = m.kv_block_size;
  t.kv_block_size = m.q_block_size;
  t.num_q_blocks = m.num_kv_blocks;
  t.num_kv_blocks = m.num_q_blocks;
  const int64_t rows = m.B * m.H;
  auto transpose = [&](const std::vector<int32_t>& num, const std::vector<int32_t>& idx, int64_t stride,
                       std::vector<int32_t>* tnum, std::vector<int32_t>* tidx, int64_t* tstride) {
    tnum->assign(rows * t.num_q_blocks, 0);
    for (int64_t bh = 0; bh < rows; ++bh)
      for (int64_t qb = 0; qb < m.num_q_blocks; ++qb) {
        const int64_t r = bh * m.num_q_blocks + qb;
        for (int32_t j = 0; j < num[r]; ++j) ++(*tnum)[bh * t.num_q_blocks + idx[r * stride + j]];
      }
    *tstride = std::max<int64_t>(1, tnum->empty() ? 1 : *std::max_element(tnum->begin(), tnum->end()));
    tidx->assign(rows * t.num_q_blocks * *tstride, 0);
    std::vector<int32_t> fill(rows * t.num_q_blocks, 0);
    // q-blocks in ascending order: the loop visits them so.
    for (int64_t bh = 0; bh < rows; ++bh)
      for (int64_t qb = 0; qb < m.num_q_blocks; ++qb) {
        const int64_t r = bh * m.num_q_blocks + qb;
        for (int32_t j = 0; j < num[r]; ++j) {
          const int64_t tr = bh * t.num_q_blocks + idx[r * stride + j];
          (*tidx)[tr * *tstride + fill[tr]++] = int32_t(qb);
        }
      }
  };
  transpose(m.kv_num_blocks, m.kv_indices, m.kv_stride, &t.kv_num_blocks, &t.kv_indices, &t.kv_stride);
  if (!m.full_kv_num_blocks.empty())
    transpose(m.full_kv_num_blocks, m.full_kv_indices, m.full_kv_stride, &t.full_kv_num_blocks,
              &t.full_kv_indices, &t.full_kv_stride);
  return t;
}

int64_t grad_groups(int64_t items, int64_t grad_elems) {
  if (grad_elems <= 0 || items <= 0) return 0;
  const int64_t cap = std::max<int64_t>(1, (int64_t(256) << 20) / 4 / grad_elems);
  return std::min({items, int64_t(64), cap});
}

}  // namespace runtime

void flex_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& dout, const TensorView& lse, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const ModSet& mods,
                             const ModBindings& bind, const std::vector<BufferGrad>& buffer_grads,
                             const BlockMask* block_mask, const AttentionOptions& opt, AttentionReport* report,
                             const TensorView* dlse) {
  runtime::check_attention_inputs(q, k, v, out, &lse, opt);
  validate(mods);
  REQUIRE(dout.rank == 4 && dout.dtype == out.dtype &&
              std::equal(dout.sizes, dout.sizes + 4, out.sizes),
          "dout must have out's shape " + out.shape_str() + " and dtype " + dtype_name(out.dtype) + ", got " +
              dtype_name(dout.dtype) + " " + dout.shape_str());
  REQUIRE(dout.data != nullptr, "dout has no data");
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
  const int64_t Bkv = k.sizes[0], Hkv = k.sizes[1], Lkv = k.sizes[2], Dv = v.sizes[3];
  check_grad_view(dq, "dq", {B, Hq, Lq, D});
  check_grad_view(dk, "dk", {Bkv, Hkv, Lkv, D});
  check_grad_view(dv, "dv", {Bkv, Hkv, Lkv, Dv});
  if (dlse)
    REQUIRE(dlse->rank == 3 && dlse->dtype == DType::F32 && dlse->sizes[0] == B && dlse->sizes[1] == Hq &&
                dlse->sizes[2] == Lq && dlse->data != nullptr,
            "dlse must be fp32 [B, Hq, Lq] like lse, got " + std::string(dtype_name(dlse->dtype)) + " " +
                dlse->shape_str());
  const int64_t group = Hq / Hkv;

  // Buffers whose gradients are wanted: float buffers the mods declare, bound to this call.
  struct Wanted {
    int slot;
    const TensorView* grad;
    int64_t numel, offset;  // offset: into one group's accumulator block
  };
  std::vector<Wanted> wanted;
  int64_t grad_elems = 0;
  for (const BufferGrad& bg : buffer_grads) {
    const int slot = mods.buffer_slot(bg.name);
    REQUIRE(slot >= 0, "a gradient was asked for buffer '" + bg.name + "', which no mod reads");
    REQUIRE(dtype_is_float(mods.buffers[slot].dtype),
            "buffer '" + bg.name + "' is " + dtype_name(mods.buffers[slot].dtype) + " (an index table): it has no gradient");
    for (const Wanted& w : wanted) REQUIRE(w.slot != slot, "buffer '" + bg.name + "' is listed twice");
    const TensorView* bound = bind.find_buffer(bg.name);
    REQUIRE(bound != nullptr, "buffer '" + bg.name + "' is not bound to a tensor in this call");
    REQUIRE(bg.grad.rank == bound->rank && std::equal(bound->sizes, bound->sizes + bound->rank, bg.grad.sizes) &&
                is_contiguous_f32(bg.grad),
            "the gradient of buffer '" + bg.name + "' must be an fp32 contiguous " + bound->shape_str() +
                " tensor, got " + dtype_name(bg.grad.dtype) + " " + bg.grad.shape_str());
    wanted.push_back({slot, &bg.grad, bound->numel(), grad_elems});
    grad_elems += bound->numel();
  }

  // Tiles: 64 x 64 unless given; they must tile the mask's blocks.
  int bm = opt.block_m ? opt.block_m : 64, bn = opt.block_n ? opt.block_n : 64;
  REQUIRE(bm >= 1 && bm <= 128 && bn >= 1 && bn <= 128,
          "backward tiles BLOCK_M and BLOCK_N must be in 1..128, got " + std::to_string(bm) + "x" + std::to_string(bn));
  if (block_mask) {
    if (!opt.block_m && block_mask->q_block_size % bm) bm = int(std::gcd(int64_t(bm), block_mask->q_block_size));
    if (!opt.block_n && block_mask->kv_block_size % bn) bn = int(std::gcd(int64_t(bn), block_mask->kv_block_size));
    runtime::check_block_mask(*block_mask, B, Hq, Lq, Lkv, bm, bn, "flex_attention_backward");
  }
  const int64_t scratch = backward_scratch_bound(D, Dv, bm, bn);
  REQUIRE(scratch <= (int64_t(3) << 19),
          "backward tiles " + std::to_string(bm) + "x" + std::to_string(bn) + " with D=" + std::to_string(D) +
              ", Dv=" + std::to_string(Dv) + " need up to " + std::to_string(scratch / 1024) +
              " KiB of per-thread scratch, over the kernel's 1.5 MiB; use smaller BLOCK_M / BLOCK_N, or the "
              "defaults");

  AttentionReport rep;
  rep.path = "backward";
  jit::KernelSpec spec;
  spec.kind = jit::KernelKind::Backward;
  spec.dtype = q.dtype;
  spec.head_dim = int(D);
  spec.head_dim_v = int(Dv);
  spec.block_m = bm;
  spec.block_n = bn;
  spec.gqa_group = int(group);
  // bf16 products on vdpbf16ps where the host has AVX512-BF16 (opt.use_dpbf16 / FLEXJIT_DPBF16 as
  // for the forward: 0 forbids it, 1 requires it); else fp32 FMAs on the widened values.
  if (q.dtype == DType::BF16 && opt.use_dpbf16 != 0) {
    std::string why;
    const bool can = dpbf16_available(&why);
    REQUIRE(can || opt.use_dpbf16 != 1, "USE_DPBF16=1 but " + why);
    if (can) spec.engine = PrefillEngine::Dpbf16;
  }
  jit::KernelSpec mods_spec, grad_spec;
  mods_spec.kind = jit::KernelKind::Mods;
  grad_spec.kind = jit::KernelKind::ModsGrad;
  std::vector<jit::KernelRequest> requests{{spec, &mods}};
  const bool any_mod = mods.has_score_mod() || mods.has_mask_mod();
  if (any_mod) requests.push_back({mods_spec, &mods});
  if (mods.has_score_mod()) requests.push_back({grad_spec, &mods});
  auto tk = std::chrono::steady_clock::now();
  std::vector<jit::KernelHandle> kernels = jit::get_kernels(requests);
  const double kernels_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tk).count();
  FlexModKernels mk{};
  FlexModGradKernels gk{};
  if (any_mod) reinterpret_cast<FlexModKernelsFn>(kernels[1].fn)(&mk);
  if (mods.has_score_mod()) reinterpret_cast<FlexModGradKernelsFn>(kernels[2].fn)(&gk);

  BlockMask built;
  if (!block_mask && mods.has_mask_mod()) {
    const bool reads_b = ir::uses_var(mods.mask_mod, ir::Var::B), reads_h = ir::uses_var(mods.mask_mod, ir::Var::H);
    runtime::BlockMaskBuildStats st;
    built = runtime::create_block_mask(mods, bind, reads_b ? B : 1, reads_h ? Hq : 1, Lq, Lkv,
                                       ((128 + bm - 1) / bm) * bm, ((128 + bn - 1) / bn) * bn, &st);
    rep.block_mask_ms = st.ms;
    block_mask = &built;
  }
  BlockMask transposed;
  if (block_mask) {
    transposed = runtime::transpose_block_mask(*block_mask);
    rep.block_mask = block_mask->describe();
  }
  runtime::BoundMods bound(mods, bind);

  // A broadcast KV batch: the kernel sees B batches of the same K / V and writes per-batch dK /
  // dV, summed here.
  const bool kv_broadcast = Bkv == 1 && B > 1;
  std::vector<float> dk_all, dv_all;
  if (kv_broadcast) {
    dk_all.assign(size_t(B * Hkv * Lkv * D), 0.0f);
    dv_all.assign(size_t(B * Hkv * Lkv * Dv), 0.0f);
  }
  std::vector<float> delta(size_t(B * Hq * Lq));

  FlexBackwardArgs a{};
  runtime::set_tensor_args(a, q, k, v, out, &lse);
  a.dout = dout.data;
  runtime::copy_strides(a.dout_strides, dout, 4);
  if (kv_broadcast) a.k_strides[0] = a.v_strides[0] = 0;
  a.delta = delta.data();
  if (dlse) {
    a.dlse = static_cast<const float*>(dlse->data);
    runtime::copy_strides(a.dlse_strides, *dlse, 3);
  }
  a.dq = static_cast<float*>(dq.data);
  a.dk = kv_broadcast ? dk_all.data() : static_cast<float*>(dk.data);
  a.dv = kv_broadcast ? dv_all.data() : static_cast<float*>(dv.data);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = Lq;
  a.Lkv = Lkv;
  a.scale = float(opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D)));
  if (block_mask) {
    a.mask = runtime::kernel_args(*block_mask);
    a.mask_t = runtime::kernel_args(transposed);
  }
  a.apply_mods = mk.apply;
  a.has_score_mod = mk.has_score_mod;
  a.has_mask_mod = mk.has_mask_mod;
  a.apply_grad = gk.apply_grad;
  a.mod = bound.args();

  // KV chunks per (b, hkv): enough units of pass 1 to spread over threads (32 or more where the
  // KV blocks allow), each with its own dQ partial. A function of the shape only: the sums, and so
  // the bits, are the same for every thread count.
  const int64_t nmb = (Lq + bm - 1) / bm, nnb = (Lkv + bn - 1) / bn, dp = (D + 15) / 16 * 16;
  const int64_t part_floats = B * Hq * nmb * bm * dp;  // a [BLOCK_M][D rounded up to 16] tile per q-block
  int64_t chunks = std::min(nnb, std::max<int64_t>(1, (32 + B * Hkv - 1) / (B * Hkv)));
  while (chunks > 1 && chunks * part_floats * 4 > (int64_t(1) << 30)) --chunks;  // at most 1 GiB of partials
  // The kernel reads and writes the partials' tiles as whole 64-byte vectors: align the base.
  std::vector<float> dq_part(size_t(std::max<int64_t>(1, chunks) * part_floats + 16));
  a.dq_part = dq_part.data() + (16 - (reinterpret_cast<uintptr_t>(dq_part.data()) / sizeof(float)) % 16) % 16;
  a.kv_chunks = std::max<int64_t>(1, chunks);

  auto fn = reinterpret_cast<FlexBackwardFn>(kernels[0].fn);
  const int64_t q_items = B * Hq * nmb, units = B * Hkv * a.kv_chunks;
  auto t0 = std::chrono::steady_clock::now();
  a.pass = 0;  // delta, zeroed partials
  runtime::run_items(opt, q_items, false, [&](int64_t b0, int64_t e0) { fn(&a, b0, e0); });
  a.pass = 1;  // dK, dV, dQ partials, buffer gradients
  const int64_t groups = gk.num_grad_loads > 0 ? runtime::grad_groups(units, grad_elems) : 0;
  std::vector<float> acc;
  if (groups == 0) {
    // Units are ordered (b, hkv, chunk) and a causal chunk's cost falls with its position: zigzag.
    runtime::run_items(opt, units, true, [&](int64_t b0, int64_t e0) { fn(&a, b0, e0); });
  } else {
    // Each fixed group of units accumulates into its own block, units in order: no atomics, and
    // the same sums in the same order however the groups are spread over threads.
    acc.assign(size_t(groups * grad_elems), 0.0f);
    std::vector<std::vector<float*>> slots(size_t(groups), std::vector<float*>(mods.buffers.size(), nullptr));
    std::vector<FlexGradArgs> gargs(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      for (const Wanted& w : wanted) slots[g][w.slot] = acc.data() + g * grad_elems + w.offset;
      gargs[g].grads = slots[g].data();
    }
    runtime::run_items(opt, groups, true, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        FlexBackwardArgs local = a;
        local.grad = &gargs[g];
        fn(&local, g * units / groups, (g + 1) * units / groups);
      }
    });
  }
  a.pass = 2;  // dQ: the partials summed
  runtime::run_items(opt, q_items, false, [&](int64_t b0, int64_t e0) { fn(&a, b0, e0); });
  rep.kernel_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  bound.check_error_flag("flex_attention_backward");

  // Fixed-order reductions: the groups' buffer gradients, the broadcast batch's dK / dV.
  for (const Wanted& w : wanted) {
    float* dst = static_cast<float*>(w.grad->data);
    for (int64_t e = 0; e < w.numel; ++e) {
      double s = 0;
      for (int64_t g = 0; g < groups; ++g) s += acc[size_t(g * grad_elems + w.offset + e)];
      dst[e] = float(s);
    }
  }
  if (kv_broadcast) {
    for (auto [all, dst, n] : {std::tuple{&dk_all, static_cast<float*>(dk.data), Hkv * Lkv * D},
                               std::tuple{&dv_all, static_cast<float*>(dv.data), Hkv * Lkv * Dv}}) {
      for (int64_t e = 0; e < n; ++e) {
        double s = 0;
        for (int64_t b = 0; b < B; ++b) s += (*all)[size_t(b * n + e)];
        dst[e] = float(s);
      }
    }
  }

  if (report) {
    runtime::record_kernels(rep, kernels, kernels_ms);
    rep.block_m = bm;
    rep.block_n = bn;
    rep.gqa_group = int(group);
    rep.engine = engine_name(spec.engine);
    rep.dtype = dtype_name(q.dtype);
    rep.tuning = opt.block_m || opt.block_n ? "user" : "default";
    *report = rep;
  }
}

}  // namespace flexjit

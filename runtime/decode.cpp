#include "runtime/decode.h"

#include <chrono>
#include <cmath>
#include <numeric>
#include <vector>

#include "jit/pipeline.h"
#include "runtime/bound_mods.h"
#include "runtime/kernel_args.h"
#include "runtime/launch.h"
#include "runtime/merge.h"
#include "runtime/tuning.h"

namespace flexjit::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The partial states of a call: reused by every call on this thread, so a decode loop does not
// fault in fresh pages each step (a few MB per call at long contexts).
float* workspace(size_t floats) {
  thread_local std::vector<float> ws;
  if (ws.size() < floats) ws.resize(floats);
  return ws.data();
}

}  // namespace

bool decode_applies(const TensorView& q, const TensorView& k, const TensorView& v, const BlockMask* block_mask,
                    const AttentionOptions& opt) {
  // USE_DPBF16=1 asks for a prefill kernel engine (the decode kernel has the dot and AMX engines).
  if (opt.force_prefill || opt.use_dpbf16 == 1 || q.sizes[2] > 16) return false;
  if (k.strides[3] != 1 || v.strides[3] != 1) return false;
  if (block_mask && (block_mask->q_block_size < q.sizes[2] || block_mask->kv_block_size % 16 != 0)) return false;
  return true;
}

void run_decode(const TensorView& q, const DecodeKv& kv, const TensorView& out, const TensorView* lse,
                const ModSet& mods, const ModBindings& bind, const BlockMask* block_mask,
                const AttentionOptions& opt, AttentionReport* report) {
  const bool paged = kv.block_table != nullptr;
  const std::string who = paged ? "paged_flex_attention" : "flex_attention";
  const TensorView& k = *kv.k;
  const TensorView& v = *kv.v;
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3], Dv = v.sizes[3];
  const int64_t Hkv = paged ? k.sizes[2] : k.sizes[1];
  const int64_t group = Hq / Hkv;

  // Sequence lengths: the paged tables' (validated by the caller), or Lkv for every sequence.
  std::vector<int64_t> lens;
  int64_t max_len = paged ? 0 : k.sizes[2];
  if (paged) {
    for (int64_t b = 0; b < B; ++b) {
      lens.push_back(int64_t(static_cast<const int32_t*>(kv.seq_lens->data)[b * kv.seq_lens->strides[0]]));
      max_len = std::max(max_len, lens.back());
    }
  }

  // A GQA group's query heads share an item (K and V read once per group) unless the mask
  // differs by head; then each query head is its own unit.
  const bool mask_reads_h = block_mask ? block_mask->H > 1
                                       : mods.has_mask_mod() && ir::uses_var(mods.mask_mod, ir::Var::H);
  const bool mask_reads_b = mods.has_mask_mod() && ir::uses_var(mods.mask_mod, ir::Var::B);
  const bool pack = group > 1 && !mask_reads_h;
  const int64_t rows = pack ? group * Lq : Lq;
  const int64_t heads = pack ? Hkv : Hq;
  // A paged cache's slots interleave the KV heads ([page, slot, Hkv, D]): per head, a row every
  // Hkv * D elements, and every 4 KB page visited once per head. Items that hold several head
  // units read each page once for all of them (runtime/tuning.h decode_heads_per_item).
  // Many rows per unit: AMX tiles where the host has them (runtime/tuning.h).
  PrefillEngine engine = preferred_decode_engine(q.dtype, rows, paged, opt, who);
  int64_t per_item = decode_heads_per_item(paged, mask_reads_h, heads, rows, opt.block_m, engine);

  DecodeShape shape;
  shape.dtype = q.dtype;
  shape.head_dim = int(D);
  shape.head_dim_v = int(Dv);
  shape.gqa_group = int(group);
  shape.lq = Lq;
  shape.rows = rows;
  shape.lkv = max_len;
  shape.units = B * ceil_div(heads, per_item);
  shape.paged = paged;
  shape.page_size = paged ? k.sizes[1] : 0;
  shape.threads = planned_threads(opt);
  shape.engine = engine;
  DecodeKnobs knobs = plan_decode(shape, opt);
  knobs.block_m = int(std::min<int64_t>(knobs.block_m, rows));
  // A given BlockMask's KV blocks must be whole numbers of kernel blocks.
  if (block_mask && block_mask->kv_block_size % knobs.block_n) {
    if (opt.block_n)
      throw Error(who + ": block_mask kv block size " + std::to_string(block_mask->kv_block_size) +
                  " must be a multiple of BLOCK_N = " + std::to_string(opt.block_n));
    knobs.block_n = int(std::gcd(int64_t(knobs.block_n), block_mask->kv_block_size));  // both multiples of 16
    if (!opt.partition_size) knobs.partition_size = ceil_div(knobs.partition_size, knobs.block_n) * knobs.block_n;
    finish_partitions(shape, &knobs);
  }
  if (block_mask) check_block_mask(*block_mask, B, Hq, Lq, max_len, 1, knobs.block_n, who);
  // A tuned entry may name the engine that won on this host (`flexjit tune` times both); then the
  // blocks may rule AMX out (BLOCK_N not a multiple of 32, scratch): the dot engine, whose items
  // may hold a different number of head units.
  const PrefillEngine planned = engine;
  if (opt.use_amx < 0 && knobs.engine == decode_engine_name(PrefillEngine::Fma)) engine = PrefillEngine::Fma;
  if (opt.use_amx < 0 && knobs.engine == decode_engine_name(PrefillEngine::Amx) && decode_amx_possible(q.dtype))
    engine = PrefillEngine::Amx;
  engine = decode_engine_for_blocks(engine, q.dtype, D, Dv, knobs.block_m, knobs.block_n, opt, who);
  if (engine != planned) {
    if (!opt.block_m) knobs.block_m = decode_default_block_m(engine, rows);
    per_item = decode_heads_per_item(paged, mask_reads_h, heads, rows, opt.block_m, engine);
  }
  const int64_t chunks = ceil_div(heads, per_item);

  jit::KernelSpec spec;
  spec.kind = jit::KernelKind::Decode;
  spec.dtype = q.dtype;
  spec.head_dim = int(D);
  spec.head_dim_v = int(Dv);
  spec.block_m = knobs.block_m;
  spec.block_n = knobs.block_n;
  spec.gqa_group = int(group);
  spec.engine = engine;
  const bool any_mod = mods.has_score_mod() || mods.has_mask_mod();
  jit::KernelSpec mods_spec;
  mods_spec.kind = jit::KernelKind::Mods;
  std::vector<jit::KernelRequest> requests{{spec, &mods}};
  if (any_mod) requests.push_back({mods_spec, &mods});
  auto tk = Clock::now();
  std::vector<jit::KernelHandle> kernels = jit::get_kernels(requests);
  const double kernels_ms = ms_since(tk);
  FlexModKernels mk{};
  if (any_mod) reinterpret_cast<FlexModKernelsFn>(kernels[1].fn)(&mk);

  AttentionReport rep;
  // A mask_mod without a BlockMask gets one for this call, in blocks of whole kernel blocks.
  BlockMask built;
  if (!block_mask && mods.has_mask_mod()) {
    const int64_t kvbs = ceil_div(128, knobs.block_n) * knobs.block_n;
    BlockMaskBuildStats st;
    if (paged)
      built = create_paged_block_mask(mods, bind, B, Hq, Lq, lens, kvbs, &st);
    else
      built = create_block_mask(mods, bind, mask_reads_b ? B : 1, mask_reads_h ? Hq : 1, Lq, max_len, 128, kvbs,
                                &st);
    rep.block_mask_ms = st.ms;
    block_mask = &built;
  }
  if (block_mask) rep.block_mask = block_mask->describe();
  BoundMods bound(mods, bind);

  FlexDecodeArgs a{};
  set_tensor_args(a, q, k, v, out, lse);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = Lq;
  a.Lkv = paged ? max_len : k.sizes[2];
  a.Bkv = paged ? 1 : k.sizes[0];
  a.scale = float(opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D)));
  std::vector<int32_t> seq_lens32(lens.begin(), lens.end());
  if (paged) {
    a.block_table = static_cast<const int*>(kv.block_table->data);
    a.block_table_stride = kv.block_table->strides[0];
    a.page_size = k.sizes[1];
    a.seq_lens = seq_lens32.data();
  }
  a.partition_size = knobs.partition_size;
  a.num_partitions = knobs.num_partitions;
  if (block_mask) a.mask = kernel_args(*block_mask);
  a.apply_mods = any_mod ? mk.apply : nullptr;
  a.has_score_mod = mk.has_score_mod;
  a.has_mask_mod = mk.has_mask_mod;
  a.pack_gqa = pack ? 1 : 0;
  a.mod = bound.args();

  const int64_t row_blocks = ceil_div(rows, knobs.block_m);
  FLEXJIT_CHECK(per_item == 1 || (row_blocks == 1 && per_item <= decode_max_units(knobs.block_m, engine)),
                "head units per decode item fit the kernel's scratch");
  a.heads_per_item = per_item;
  const int64_t np = knobs.num_partitions;
  const int64_t items = B * chunks * row_blocks * np;
  const int64_t item_rows = per_item * knobs.block_m;  // partial-state rows per item
  if (np > 1) {
    float* ws = workspace(size_t(items) * size_t(item_rows) * size_t(Dv + 1));
    a.ws_out = ws;
    a.ws_lse = ws + items * item_rows * Dv;
  }
  auto fn = reinterpret_cast<FlexDecodeFn>(kernels[0].fn);
  auto t0 = Clock::now();
  run_items(opt, items, /*zigzag=*/false, [&](int64_t begin, int64_t end) { fn(&a, begin, end); });
  rep.kernel_ms = ms_since(t0);
  bound.check_error_flag(who);

  if (np > 1) {
    // Merge each row's partitions: states of item (unit, row block, p) sit np items apart.
    auto tm = Clock::now();
    const int64_t bm = knobs.block_m;
    run_items(opt, B * chunks * row_blocks, false, [&](int64_t begin, int64_t end) {
      std::vector<float> row(static_cast<size_t>(Dv));
      for (int64_t g = begin; g < end; ++g) {  // g: an item without its partition
        const int64_t rb = g % row_blocks, c = (g / row_blocks) % chunks, b = g / (row_blocks * chunks);
        const int64_t first = g * np;
        for (int64_t u = 0; u < per_item && c * per_item + u < heads; ++u) {
          const int64_t h = c * per_item + u;  // head unit
          for (int64_t r = 0; r < bm && rb * bm + r < rows; ++r) {
            const int64_t gr = rb * bm + r;  // row among the unit's rows
            const int64_t hq = pack ? h * group + gr / Lq : h, qi = pack ? gr % Lq : gr;
            const int64_t at = first * item_rows + u * bm + r;
            float l = 0;
            merge_states_row(np, a.ws_out + at * Dv, item_rows * Dv, a.ws_lse + at, item_rows, Dv, row.data(), &l);
            char* dst = static_cast<char*>(out.data) +
                        (b * out.strides[0] + hq * out.strides[1] + qi * out.strides[2]) * dtype_size(out.dtype);
            store_row_f32(out.dtype, dst, out.strides[3], row.data(), Dv);
            if (lse)
              static_cast<float*>(lse->data)[b * lse->strides[0] + hq * lse->strides[1] + qi * lse->strides[2]] = l;
          }
        }
      }
    });
    rep.merge_ms = ms_since(tm);
  }

  if (report) {
    record_kernels(rep, kernels, kernels_ms);
    rep.path = "decode";
    rep.paged = paged;
    rep.partition_size = knobs.partition_size;
    rep.num_partitions = knobs.num_partitions;
    rep.tuning = knobs.tuning;
    rep.block_m = knobs.block_m;
    rep.block_n = knobs.block_n;
    rep.gqa_group = int(group);
    rep.pack_gqa = pack;
    rep.engine = decode_engine_name(engine);
    rep.dtype = dtype_name(q.dtype);
    *report = rep;
  }
}

}  // namespace flexjit::runtime

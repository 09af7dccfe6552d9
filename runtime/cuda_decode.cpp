#include "runtime/cuda_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>

#include "jit/pipeline.h"
#include "runtime/bound_mods.h"
#include "runtime/cuda_driver.h"
#include "runtime/kernel_args.h"
#ifndef FLEXJIT_NO_CPU_BACKEND
#include "runtime/tuning_db.h"
#endif

namespace flexjit {
namespace {

constexpr const char* kWho = "CUDA decode";

std::string num(int64_t x) { return std::to_string(x); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t cuda_decode_cost_model_partition(int64_t lkv, int64_t base_ctas, int64_t step, int64_t min_size,
                                         int64_t slots) {
  const int64_t L = std::max<int64_t>(lkv, 1), base = std::max<int64_t>(base_ctas, 1);
  slots = std::max<int64_t>(slots, 1);
  auto round_up = [&](int64_t x) { return ceil_div(x, step) * step; };
  // A CTA's time ~ its keys; CTAs beyond `slots` wait for a slot: the grid takes about
  // waves x keys per partition, so a split whose last wave is nearly empty costs almost a wave.
  auto cost = [&](int64_t size) { return ceil_div(base * ceil_div(L, size), slots) * size; };
  int64_t best = round_up(L);
  const int64_t max_parts = std::min<int64_t>(1024, ceil_div(L, std::max<int64_t>(min_size, 1)));
  for (int64_t parts = 2; parts <= max_parts; ++parts) {
    const int64_t size = std::max(round_up(ceil_div(L, parts)), round_up(min_size));
    if (double(cost(size)) < 0.97 * double(cost(best))) best = size;  // fewer partitions unless 3% faster
  }
  return best;
}

std::string CudaDecodePlan::describe() const {
  std::ostringstream os;
  os << spec.str() << ", grid " << grid[0] << "x" << grid[1] << "x" << grid[2] << ", " << block_threads << " threads, "
     << (smem_bytes + 1023) / 1024 << " KiB smem, " << num_partitions << " partition"
     << (num_partitions == 1 ? "" : "s") << " of " << partition_size << " (" << split << ")"
     << (pack_gqa ? ", GQA packed" : "");
  return os.str();
}

runtime::TuningBucket cuda_decode_bucket(DType dtype, int head_dim, int head_dim_v, int gqa_group, int64_t lq,
                                         int64_t lkv, int64_t work, bool paged, const CudaDeviceInfo& dev) {
  return cuda_tuning_bucket("decode", dtype, head_dim, head_dim_v, gqa_group, lq, lkv, work, paged, "cuda-mma", dev);
}

jit::KernelSpec cuda_decode_kernel_spec(DType dtype, int head_dim, int head_dim_v, int gqa_group,
                                        const CudaDeviceInfo& dev, int block_n) {
  jit::KernelSpec s;
  s.backend = jit::Backend::Cuda;
  s.kind = jit::KernelKind::Decode;
  s.dtype = dtype;
  s.head_dim = head_dim;
  s.head_dim_v = head_dim_v;
  s.gqa_group = gqa_group;
  s.arch = dev.arch;
  s.block_m = 16;
  s.block_n = block_n > 0 ? block_n : 32;
  if (s.block_n % 16 != 0 || s.block_n > 128)
    throw Error(std::string(kWho) + ": BLOCK_N must be a multiple of 16 up to 128, got " + num(s.block_n));
  if (dtype == DType::F32 && s.block_n != 32)
    throw Error(std::string(kWho) + ": fp32 K/V run one key per lane of a warp: BLOCK_N must be 32, got " +
                num(s.block_n));
  s.warps = 4;
  s.kv_stages = 2;
  while (jit::cuda_decode_smem_bytes(s) > dev.max_smem_optin) {
    if (s.kv_stages == 2) s.kv_stages = 1;
    else if (s.warps > 1) s.warps /= 2;
    else if (s.block_n > 16 && block_n <= 0 && dtype != DType::F32) s.block_n /= 2;
    else
      throw Error(std::string(kWho) + ": D=" + num(head_dim) + " with BLOCK_N " + num(s.block_n) + " needs " +
                  num(jit::cuda_decode_smem_bytes(s)) + " bytes of shared memory; this GPU allows " +
                  num(dev.max_smem_optin) + ". Use a smaller BLOCK_N");
  }
  return s;
}

CudaDecodePlan plan_cuda_decode(const TensorView& q, const CudaDecodeKv& kv, const TensorView& out,
                                const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                                const FlexBlockMaskArgs* mask, const AttentionOptions& opt,
                                const CudaDeviceInfo& dev, int* error_flag) {
  if (!kv.k || !kv.v) throw Error(std::string(kWho) + ": k and v are required");
  const TensorView& k = *kv.k;
  const TensorView& v = *kv.v;
  const bool paged = kv.block_table != nullptr;
  if (paged != (kv.seq_lens != nullptr))
    throw Error(std::string(kWho) + ": a paged call needs both block_table and seq_lens");

  // ---- inputs ----
  if (q.dtype != DType::BF16 && q.dtype != DType::F16 && q.dtype != DType::F32)
    throw Error(std::string(kWho) + " takes fp32, bf16 or fp16 q, k and v; got " + dtype_name(q.dtype));
  for (const auto* t : {&k, &v, &out})
    if (t->dtype != q.dtype)
      throw Error(std::string(kWho) + ": q, k, v and out must share one dtype; got q " + dtype_name(q.dtype) +
                  " and " + dtype_name(t->dtype));
  check_cuda_rows(q, kWho, "q");
  check_cuda_rows(k, kWho, paged ? "k_cache" : "k");
  check_cuda_rows(v, kWho, paged ? "v_cache" : "v");
  check_cuda_rows(out, kWho, "out");
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
  const int64_t Hkv = paged ? k.sizes[2] : k.sizes[1], Dv = v.sizes[3];
  if (Lq < 1 || Lq > 16)
    throw Error(std::string(kWho) + ": decoding takes 1..16 query rows per sequence, got Lq=" + num(Lq) +
                "; use the prefill kernel for longer queries");
  if (k.sizes[3] != D)
    throw Error(std::string(kWho) + ": k's head dim " + num(k.sizes[3]) + " differs from q's " + num(D));
  for (int d = 0; d < 3; ++d)
    if (v.sizes[d] != k.sizes[d])
      throw Error(std::string(kWho) + ": k " + k.shape_str() + " and v " + v.shape_str() +
                  " must match in every dim but the last");
  int64_t Lkv = 0, Bkv = 1;
  if (paged) {
    const TensorView& bt = *kv.block_table;
    const TensorView& sl = *kv.seq_lens;
    if (bt.dtype != DType::I32 || bt.rank != 2 || bt.sizes[0] != B || (bt.sizes[1] > 1 && bt.strides[1] != 1))
      throw Error(std::string(kWho) + ": block_table must be int32 [B=" + num(B) + ", max_pages] with contiguous rows, got " +
                  dtype_name(bt.dtype) + " " + bt.shape_str());
    if (sl.dtype != DType::I32 || sl.rank != 1 || sl.sizes[0] != B || (B > 1 && sl.strides[0] != 1))
      throw Error(std::string(kWho) + ": seq_lens must be contiguous int32 [B=" + num(B) + "], got " +
                  dtype_name(sl.dtype) + " " + sl.shape_str());
    const int64_t page_size = k.sizes[1];
    if (kv.max_seq_len < 0 || kv.max_seq_len > bt.sizes[1] * page_size)
      throw Error(std::string(kWho) + ": max_seq_len " + num(kv.max_seq_len) + " must be in 0.." +
                  num(bt.sizes[1] * page_size) + " (block_table's " + num(bt.sizes[1]) + " pages of " +
                  num(page_size) + " keys)");
    Lkv = kv.max_seq_len;
  } else {
    Bkv = k.sizes[0];
    Lkv = k.sizes[2];
    if (Bkv != 1 && Bkv != B)
      throw Error(std::string(kWho) + ": the KV batch must be 1 or q's batch " + num(B) + ", got " + num(Bkv));
  }
  if (Hkv < 1 || Hq % Hkv != 0)
    throw Error(std::string(kWho) + ": Hq=" + num(Hq) + " must be a multiple of Hkv=" + num(Hkv));
  if (Hq != Hkv && !opt.enable_gqa)
    throw Error(std::string(kWho) + ": Hq=" + num(Hq) + " != Hkv=" + num(Hkv) + " needs enable_gqa=True");
  if (out.sizes[0] != B || out.sizes[1] != Hq || out.sizes[2] != Lq || out.sizes[3] != Dv)
    throw Error(std::string(kWho) + ": out must be [B, Hq, Lq, Dv] = [" + num(B) + ", " + num(Hq) + ", " + num(Lq) +
                ", " + num(Dv) + "], got " + out.shape_str());
  if (D % 8 != 0 || Dv % 8 != 0 || D > 256 || Dv > 256 || D < 8 || Dv < 8)
    throw Error(std::string(kWho) + ": head dims D=" + num(D) + ", Dv=" + num(Dv) +
                " are not supported; the CUDA kernels need multiples of 8 in 8..256 (pad the head dim)");
  if (lse && (lse->dtype != DType::F32 || lse->rank != 3 || lse->sizes[0] != B || lse->sizes[1] != Hq ||
              lse->sizes[2] != Lq))
    throw Error(std::string(kWho) + ": lse must be fp32 [B, Hq, Lq], got " + std::string(dtype_name(lse->dtype)) + " " +
                lse->shape_str());

  // ---- block mask: one q-block holding the rows; kernel blocks tile its KV blocks ----
  const bool has_mask = mask && mask->kv_num_blocks;
  if (has_mask) {
    if (mask->q_block_size < Lq)
      throw Error(std::string(kWho) + ": the BlockMask's q-block (" + num(mask->q_block_size) +
                  ") must hold the call's " + num(Lq) + " query rows (decode masks have one q-block)");
    if ((mask->B != 1 && mask->B != B) || (mask->H != 1 && mask->H != Hq))
      throw Error(std::string(kWho) + ": the BlockMask's B=" + num(mask->B) + ", H=" + num(mask->H) +
                  " must be 1 or the call's B=" + num(B) + ", Hq=" + num(Hq));
    if (mask->kv_blocks * mask->kv_block_size < Lkv)
      throw Error(std::string(kWho) + ": the BlockMask covers " + num(mask->kv_blocks * mask->kv_block_size) +
                  " keys but the call has " + num(Lkv) + "; build it for this call's length");
  }

  // ---- rows: a GQA group shares a tile unless the block mask differs by head ----
  if (opt.block_m > 0 && opt.block_m != 16)
    throw Error(std::string(kWho) + ": BLOCK_M is the decode kernel's row tile, 16; got " + num(opt.block_m));
  CudaDecodePlan p;
  const int group = static_cast<int>(Hq / Hkv);
  p.pack_gqa = group > 1 && !(has_mask && mask->H > 1);
  const int64_t units = p.pack_gqa ? Hkv : Hq;
  const int64_t rows = p.pack_gqa ? group * Lq : Lq;
  const int64_t row_tiles = ceil_div(rows, 16);

  // ---- knobs: the user's, else the tuning database's for this GPU and bucket, else the cost model ----
  int block_n = opt.block_n;
  int64_t tuned_partition = 0;
#ifndef FLEXJIT_NO_CPU_BACKEND  // the database (JSON) is part of the full build
  if (opt.partition_size <= 0 && opt.block_n <= 0 && opt.use_tuning && !dev.name.empty()) {
    const runtime::TuningBucket bucket = cuda_decode_bucket(q.dtype, static_cast<int>(D), static_cast<int>(Dv), group,
                                                            Lq, Lkv, B * units, paged, dev);
    if (auto t = runtime::TuningDb::global().lookup(bucket); t && t->partition_size > 0) {
      block_n = t->block_n;
      tuned_partition = t->partition_size;
    }
  }
#endif

  // ---- spec: BLOCK_N, warps and stages that fit the device's shared memory ----
  p.spec = cuda_decode_kernel_spec(q.dtype, static_cast<int>(D), static_cast<int>(Dv), group, dev, block_n);
  jit::KernelSpec& s = p.spec;
  if (has_mask && mask->kv_block_size % s.block_n != 0)
    throw Error(std::string(kWho) + ": the BlockMask's KV block (" + num(mask->kv_block_size) +
                ") must be a multiple of BLOCK_N (" + num(s.block_n) + ")");
  p.smem_bytes = jit::cuda_decode_smem_bytes(s);
  p.block_threads = static_cast<unsigned>(s.warps * 32);

  // ---- partitions: the user's, the tuned ones, or enough CTAs to fill the SMs ----
  const int64_t step = s.block_n;  // partitions start on kernel-block boundaries
  if (tuned_partition > 0) {
    p.partition_size = ceil_div(tuned_partition, step) * step;
    p.split = "tuned";
  } else if (opt.partition_size > 0) {
    if (opt.partition_size % step != 0)
      throw Error(std::string(kWho) + ": PARTITION_SIZE " + num(opt.partition_size) + " must be a multiple of BLOCK_N (" +
                  num(step) + ")");
    p.partition_size = opt.partition_size;
    p.split = "user";
  } else {
    // CTAs that fit on an SM at once (by shared memory), times the SMs, are the slots a wave fills.
    // Each warp gets a few blocks, and a partition at least 256 keys: splitting further costs more
    // in the merge than it gains.
    const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(8, dev.max_smem_optin / std::max(1, p.smem_bytes)));
    const int64_t min_size = std::max<int64_t>(256, step * s.warps * 2);
    p.partition_size = cuda_decode_cost_model_partition(Lkv, B * units * row_tiles, step, min_size,
                                                        std::max<int64_t>(1, dev.sm_count) * per_sm);
    p.split = "cost model";
  }
  p.num_partitions = std::max<int64_t>(1, ceil_div(Lkv, p.partition_size));
  if (p.num_partitions > 0x7fffffff || units * row_tiles > 0x7fffffff || B > 65535)
    throw Error(std::string(kWho) + ": grid too large (" + num(p.num_partitions) + " partitions, " +
                num(units * row_tiles) + " row tiles, B " + num(B) + "; B is limited to 65535)");

  // ---- the parameter block ----
  FlexCudaDecodeArgs& a = p.args;
  runtime::set_tensor_args(a, q, k, v, out, lse);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = Lq;
  a.Lkv = paged ? 0 : Lkv;
  a.Bkv = Bkv;
  a.scale = static_cast<float>(opt.scale ? *opt.scale : 1.0 / std::sqrt(static_cast<double>(D)));
  a.pack_gqa = p.pack_gqa ? 1 : 0;
  if (paged) {
    a.block_table = static_cast<const int*>(kv.block_table->data);
    a.block_table_stride = kv.block_table->strides[0];
    a.max_pages = kv.block_table->sizes[1];
    a.page_size = k.sizes[1];
    a.num_pages = k.sizes[0];
    a.seq_lens = static_cast<const int*>(kv.seq_lens->data);
  }
  a.partition_size = p.partition_size;
  a.num_partitions = p.num_partitions;
  if (has_mask) a.mask = *mask;
  a.error_flag = error_flag;
  if (mods.buffers.size() > FLEXJIT_CUDA_MAX_BUFFERS || mods.params.size() > FLEXJIT_CUDA_MAX_PARAMS)
    throw Error(std::string(kWho) + ": the mods read " + num(int64_t(mods.buffers.size())) + " buffers and " +
                num(int64_t(mods.params.size())) + " params; a CUDA launch carries at most " +
                num(FLEXJIT_CUDA_MAX_BUFFERS) + " and " + num(FLEXJIT_CUDA_MAX_PARAMS));
  runtime::BoundMods bound(mods, bind);
  for (size_t i = 0; i < mods.buffers.size(); ++i) a.buffers[i] = bound.args().buffers[i];
  for (size_t i = 0; i < mods.params.size(); ++i) a.params[i] = bound.args().params[i];

  // ---- grids and workspace ----
  p.grid[0] = static_cast<unsigned>(p.num_partitions);
  p.grid[1] = static_cast<unsigned>(units * row_tiles);
  p.grid[2] = static_cast<unsigned>(B);
  if (p.num_partitions > 1) {
    p.merge_grid[0] = static_cast<unsigned>(units * row_tiles);
    p.merge_grid[1] = static_cast<unsigned>(B);
    p.merge_grid[2] = 1;
    const size_t slots = size_t(B) * size_t(units * row_tiles) * size_t(p.num_partitions) * 16;
    const size_t out_bytes = (slots * size_t(Dv) * 4 + 15) / 16 * 16;
    p.workspace_bytes = out_bytes + slots * 4;
  }
  return p;
}

void set_cuda_decode_workspace(CudaDecodePlan& plan, void* workspace) {
  if (plan.workspace_bytes == 0) {
    plan.args.ws_out = plan.args.ws_lse = nullptr;
    return;
  }
  if (!workspace)
    throw Error(std::string(kWho) + ": this call splits the keys into " + num(plan.num_partitions) +
                " partitions and needs a workspace of " + num(int64_t(plan.workspace_bytes)) + " bytes");
  if (reinterpret_cast<std::uintptr_t>(workspace) % 16 != 0)
    throw Error(std::string(kWho) + ": the workspace must be 16-byte aligned");
  // ws_out [slots, Dv] fp32, then ws_lse [slots] from the next 16-byte boundary.
  const size_t slots = size_t(plan.grid[0]) * plan.grid[1] * plan.grid[2] * 16;
  const size_t out_bytes = (slots * size_t(plan.spec.head_dim_v) * 4 + 15) / 16 * 16;
  plan.args.ws_out = static_cast<float*>(workspace);
  plan.args.ws_lse = reinterpret_cast<float*>(static_cast<char*>(workspace) + out_bytes);
}

CudaRunInfo run_cuda_decode(CudaDecodePlan& plan, const ModSet& mods, void* stream) {
  if (plan.workspace_bytes > 0 && plan.args.ws_out == nullptr)
    throw Error(std::string(kWho) + ": set_cuda_decode_workspace first (the call needs " +
                num(int64_t(plan.workspace_bytes)) + " bytes)");
  jit::CudaBinary bin = jit::get_cuda_binary(plan.spec, mods);
  CudaRunInfo info{bin.symbol, bin.cache, bin.compile_ms};
  if (plan.grid[0] == 0 || plan.grid[1] == 0 || plan.grid[2] == 0) return info;
  void* fn = cuda_load_function(bin.key, bin.cubin, bin.ptx, bin.symbol, plan.smem_bytes);
  cuda_launch(fn, plan.grid, plan.block_threads, plan.smem_bytes, stream, &plan.args);
  if (plan.num_partitions > 1) {
    void* merge = cuda_load_function(bin.key, bin.cubin, bin.ptx, jit::cuda_merge_symbol(bin.symbol), 0);
    cuda_launch(merge, plan.merge_grid, plan.merge_threads, 0, stream, &plan.args);
  }
  return info;
}

}  // namespace flexjit

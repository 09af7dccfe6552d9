#include "runtime/cuda_prefill.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>

#include "jit/pipeline.h"
#include "runtime/bound_mods.h"
#include "runtime/cuda_driver.h"
#include "runtime/kernel_args.h"
#include "runtime/tuning_db.h"

namespace flexjit {
namespace {

std::string dims(const TensorView& t) { return t.shape_str(); }

void check_rows(const TensorView& t, const char* name) { check_cuda_rows(t, "CUDA flex_attention", name); }

}  // namespace

void check_cuda_rows(const TensorView& t, const std::string& who, const std::string& name) {
  if (t.rank != 4) throw Error(who + ": " + name + " must be 4-D, got " + t.shape_str());
  if (t.sizes[3] > 1 && t.strides[3] != 1)
    throw Error(who + ": " + name + "'s last dim must be contiguous (stride 1), got stride " +
                std::to_string(t.strides[3]) + "; pass " + name + ".contiguous()");
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data);
  const int64_t per16 = 16 / std::max<int64_t>(1, int64_t(dtype_size(t.dtype)));  // elements per 16 bytes
  bool aligned = addr % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.sizes[d] <= 1 || t.strides[d] % per16 == 0);
  if (!aligned)
    throw Error(who + ": " + name + "'s rows must start 16-byte aligned (data pointer and outer strides multiples of " +
                std::to_string(per16) + " elements); pass " + name +
                ".contiguous() (and a head dim that is a multiple of 8)");
}

std::string CudaPrefillPlan::describe() const {
  std::ostringstream os;
  os << spec.str() << ", grid " << grid[0] << "x" << grid[1] << "x" << grid[2] << ", " << block_threads
     << " threads, " << (smem_bytes + 1023) / 1024 << " KiB smem" << (knobs == "tuned" ? " (tuned)" : "");
  return os.str();
}

CudaDeviceInfo cuda_device_info_for_arch(const std::string& arch) {
  CudaDeviceInfo d;
  d.arch = arch;
  d.sm_count = 132;
  if (arch == "sm_80" || arch == "sm_87") d.max_smem_optin = 166912;
  else if (arch == "sm_86" || arch == "sm_89" || arch == "sm_120" || arch == "sm_121") d.max_smem_optin = 101376;
  else d.max_smem_optin = 232448;  // sm_90, sm_100, sm_103
  return d;
}

std::string cuda_prefill_engine_name(const jit::KernelSpec& s) {
  return s.engine != PrefillEngine::Wgmma ? "mma" : s.kv_stages == 3 ? "wgmma2" : "wgmma";
}

int cuda_prefill_use_wgmma(const std::string& e) { return e == "mma" ? 0 : e == "wgmma" ? 1 : e == "wgmma2" ? 2 : -1; }

runtime::TuningBucket cuda_tuning_bucket(const std::string& path, DType dtype, int head_dim, int head_dim_v,
                                         int gqa_group, int64_t lq, int64_t lkv, int64_t work, bool paged,
                                         const std::string& engine, const CudaDeviceInfo& dev) {
  runtime::TuningBucket b;
  b.path = path;
  b.dtype = dtype;
  b.head_dim = head_dim;
  b.head_dim_v = head_dim_v;
  b.gqa_group = gqa_group;
  b.lq = lq;
  b.lkv = lkv;
  b.work = work;
  b.paged = paged;
  b.threads = dev.sm_count;  // the key's "threads": the GPU's SMs
  b.engine = engine;
  b.cpu = "GPU " + (dev.name.empty() ? dev.arch : dev.name);
  return b;
}

runtime::TuningBucket cuda_prefill_bucket(DType dtype, int head_dim, int head_dim_v, int gqa_group, int64_t lq,
                                          int64_t lkv, int64_t work, bool masked, const CudaDeviceInfo& dev) {
  return cuda_tuning_bucket("prefill", dtype, head_dim, head_dim_v, gqa_group, lq, lkv, work, false,
                            masked ? "cuda-mask" : "cuda", dev);
}

FlexBlockMaskArgs cuda_causal_mask(int64_t L, int block, CudaAllocations* mem) {
  const int64_t nb = (L + block - 1) / block;
  std::vector<int> num(size_t(nb), 1), idx(size_t(nb * nb), 0), full_num(size_t(nb), 0), full_idx(size_t(nb * nb), 0);
  for (int64_t i = 0; i < nb; ++i) {
    idx[size_t(i * nb)] = int(i);
    full_num[size_t(i)] = int(i);
    for (int64_t j = 0; j < i; ++j) full_idx[size_t(i * nb + j)] = int(j);
  }
  auto put = [&](const std::vector<int>& h) {
    void* d = mem->alloc(h.size() * 4);
    cuda_copy_to_device(d, h.data(), h.size() * 4);
    return static_cast<const int*>(d);
  };
  FlexBlockMaskArgs m{};
  m.kv_num_blocks = put(num);
  m.kv_indices = put(idx);
  m.full_kv_num_blocks = put(full_num);
  m.full_kv_indices = put(full_idx);
  m.B = m.H = 1;
  m.q_blocks = m.kv_blocks = nb;
  m.q_block_size = m.kv_block_size = block;
  m.kv_indices_stride = m.full_kv_indices_stride = nb;
  return m;
}

std::string cuda_wgmma_refusal(DType dtype, int head_dim, int head_dim_v, const CudaDeviceInfo& dev, int block_m,
                               int block_n) {
  if (dev.arch != "sm_90" && dev.arch != "sm_90a")
    return "it needs an sm_90 GPU (Hopper: wgmma), this one is " + dev.arch;
  if (dtype != DType::BF16 && dtype != DType::F16) return std::string("it takes bf16 or fp16, not ") + dtype_name(dtype);
  if (head_dim % 64 != 0 || head_dim > 256)
    return "it needs D a multiple of 64 up to 256, got D=" + std::to_string(head_dim);
  if (head_dim_v != 64 && head_dim_v != 128 && head_dim_v != 256)
    return "it needs Dv 64, 128 or 256, got Dv=" + std::to_string(head_dim_v);
  if (block_m != 0 && block_m != 64 && block_m != 128)
    return "it takes BLOCK_M 64 or 128 (warpgroups of 64 rows), got " + std::to_string(block_m);
  if (block_n != 0 && block_n != 64 && block_n != 128) return "it takes BLOCK_N 64 or 128, got " + std::to_string(block_n);
  return "";
}

int cuda_resolve_wgmma(int use_wgmma, DType dtype, int head_dim, int head_dim_v, const CudaDeviceInfo& dev,
                       int block_m, int block_n) {
  if (use_wgmma >= 0 && use_wgmma <= 2) return use_wgmma;
  const char* env = std::getenv("FLEXJIT_CUDA_WGMMA");
  const int wanted = env && std::string(env) == "1" ? 1 : env && std::string(env) == "2" ? 2 : 0;
  return wanted && cuda_wgmma_refusal(dtype, head_dim, head_dim_v, dev, block_m, block_n).empty() ? wanted : 0;
}

jit::KernelSpec cuda_prefill_kernel_spec(DType dtype, int head_dim, int head_dim_v, int gqa_group,
                                         const CudaDeviceInfo& dev, int block_m, int block_n, int use_wgmma) {
  if (use_wgmma < 0 || use_wgmma > 2)
    throw Error("CUDA flex_attention: USE_WGMMA must be 0 (mma.sync), 1 (wgmma) or 2 (wgmma, pipelined), got " +
                std::to_string(use_wgmma));
  if (use_wgmma >= 1) {
    const std::string why = cuda_wgmma_refusal(dtype, head_dim, head_dim_v, dev, block_m, block_n);
    if (!why.empty())
      throw Error("CUDA flex_attention: USE_WGMMA=" + std::to_string(use_wgmma) +
                  " (the wgmma prefill engine) cannot take this call: " + why +
                  ". Drop USE_WGMMA to use the mma.sync engine");
    jit::KernelSpec s;
    s.backend = jit::Backend::Cuda;
    s.kind = jit::KernelKind::Prefill;
    s.engine = PrefillEngine::Wgmma;
    s.dtype = dtype;
    s.head_dim = head_dim;
    s.head_dim_v = head_dim_v;
    s.gqa_group = gqa_group;
    s.arch = "sm_90a";  // wgmma is an sm_90a instruction
    s.block_m = block_m > 0 ? block_m : 128;
    // The pipelined schedule holds S of one block, P of the one before and O at once: 64-key blocks
    // above D 64 keep that within 255 registers without spilling (cuda_prefill_compile_test).
    s.block_n = block_n > 0                                                ? block_n
                : std::max(head_dim, head_dim_v) <= (use_wgmma == 2 ? 64 : 128) ? 128
                                                                         : 64;
    s.warps = s.block_m / 16;  // warpgroups of 4 warps, 64 rows each
    // 2: the pipelined schedule (block i + 1's softmax while block i's P V runs) on three K/V stages.
    s.kv_stages = use_wgmma == 2 ? 3 : 2;
    if (jit::cuda_prefill_smem_bytes(s) > dev.max_smem_optin && block_n <= 0) s.block_n = 64;
    if (jit::cuda_prefill_smem_bytes(s) > dev.max_smem_optin && use_wgmma == 2 && block_m <= 0) {
      s.block_m = 64;  // three stages at D 256: one warpgroup
      s.warps = 4;
    }
    if (jit::cuda_prefill_smem_bytes(s) > dev.max_smem_optin && use_wgmma == 1) s.kv_stages = 1;
    if (jit::cuda_prefill_smem_bytes(s) > dev.max_smem_optin)
      throw Error("CUDA flex_attention (wgmma): D=" + std::to_string(head_dim) + " with BLOCK " +
                  std::to_string(s.block_m) + "x" + std::to_string(s.block_n) + " needs " +
                  std::to_string(jit::cuda_prefill_smem_bytes(s)) + " bytes of shared memory per block; this GPU allows " +
                  std::to_string(dev.max_smem_optin) + ". Use BLOCK_M=64 / BLOCK_N=64");
    return s;
  }
  jit::KernelSpec s;
  s.backend = jit::Backend::Cuda;
  s.kind = jit::KernelKind::Prefill;
  s.dtype = dtype;
  s.head_dim = head_dim;
  s.head_dim_v = head_dim_v;
  s.gqa_group = gqa_group;
  s.arch = dev.arch;
  // Default 64 x 64: 4 warps of one m16 tile, no local memory with any built-in mod up to D 256.
  // BLOCK_M 128 is 4 warps of two tiles (FA2's tile: each K / V fragment read from shared memory
  // serves both), with 32-key blocks above D 64 so both tiles' accumulators fit in registers; at
  // D 128 some mods then spill ~92 bytes, so it is an option (BLOCK_M=128) until a GPU measures it.
  const int dmax = std::max(head_dim, head_dim_v);
  s.block_m = block_m > 0 ? block_m : 64;
  s.block_n = block_n > 0 ? block_n : s.block_m == 128 && dmax > 64 ? 32 : 64;
  if (s.block_m % 16 != 0 || s.block_m > 128 || s.block_n % 16 != 0 || s.block_n > 256)
    throw Error("CUDA flex_attention: BLOCK_M must be a multiple of 16 up to 128 and BLOCK_N a multiple of 16 up "
                "to 256; got " + std::to_string(s.block_m) + "x" + std::to_string(s.block_n));
  // Two m16 tiles per warp at 128 rows (4 warps: each K / V fragment serves both), else one.
  const int tiles = s.block_m == 128 ? 2 : 1;
  s.warps = s.block_m / (16 * tiles);
  // Two K/V stages where they fit, else one; with the default BLOCK_N, a 32-key block before
  // giving up (large D on GPUs with 99 KiB of shared memory, sm_86 / sm_89).
  auto fit_stages = [&] {
    s.kv_stages = 2;
    if (jit::cuda_prefill_smem_bytes(s) > dev.max_smem_optin) s.kv_stages = 1;
    return jit::cuda_prefill_smem_bytes(s) <= dev.max_smem_optin;
  };
  if (!fit_stages() && block_n <= 0) {
    s.block_n = 32;
    fit_stages();
  }
  if (jit::cuda_prefill_smem_bytes(s) > dev.max_smem_optin)
    throw Error("CUDA flex_attention: D=" + std::to_string(head_dim) + " with BLOCK " + std::to_string(s.block_m) + "x" +
                std::to_string(s.block_n) + " needs " + std::to_string(jit::cuda_prefill_smem_bytes(s)) +
                " bytes of shared memory per block; this GPU allows " + std::to_string(dev.max_smem_optin) +
                ". Use smaller BLOCK_M / BLOCK_N kernel options");
  return s;
}

CudaPrefillPlan plan_cuda_prefill(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const TensorView* lse, const ModSet& mods,
                                  const ModBindings& bind, const FlexBlockMaskArgs* mask,
                                  const AttentionOptions& opt, const CudaDeviceInfo& dev,
                                  int* error_flag) {
  // ---- inputs ----
  if (q.dtype != DType::BF16 && q.dtype != DType::F16)
    throw Error(std::string("CUDA flex_attention takes bf16 or fp16 q, k and v (fp32 accumulation); got ") +
                dtype_name(q.dtype) + ". Convert them, e.g. q.to(torch.bfloat16)");
  for (const auto* t : {&k, &v, &out})
    if (t->dtype != q.dtype)
      throw Error(std::string("CUDA flex_attention: q, k, v and out must share one dtype; got q ") +
                  dtype_name(q.dtype) + " and " + dtype_name(t->dtype));
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  check_rows(out, "out");
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
  const int64_t Bkv = k.sizes[0], Hkv = k.sizes[1], Lkv = k.sizes[2], Dv = v.sizes[3];
  if (k.sizes[3] != D || v.sizes[0] != Bkv || v.sizes[1] != Hkv || v.sizes[2] != Lkv)
    throw Error("CUDA flex_attention: k " + dims(k) + " and v " + dims(v) + " do not match each other and q " +
                dims(q) + " (k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv])");
  if (Bkv != 1 && Bkv != B)
    throw Error("CUDA flex_attention: the KV batch must be 1 or q's batch " + std::to_string(B) + ", got " +
                std::to_string(Bkv));
  if (Hkv < 1 || Hq % Hkv != 0)
    throw Error("CUDA flex_attention: Hq=" + std::to_string(Hq) + " must be a multiple of Hkv=" + std::to_string(Hkv));
  if (Hq != Hkv && !opt.enable_gqa)
    throw Error("CUDA flex_attention: Hq=" + std::to_string(Hq) + " != Hkv=" + std::to_string(Hkv) +
                " needs enable_gqa=True");
  if (out.sizes[0] != B || out.sizes[1] != Hq || out.sizes[2] != Lq || out.sizes[3] != Dv)
    throw Error("CUDA flex_attention: out must be [B, Hq, Lq, Dv] = [" + std::to_string(B) + ", " +
                std::to_string(Hq) + ", " + std::to_string(Lq) + ", " + std::to_string(Dv) + "], got " + dims(out));
  if (D % 8 != 0 || Dv % 8 != 0 || D > 256 || Dv > 256 || D < 8 || Dv < 8)
    throw Error("CUDA flex_attention: head dims D=" + std::to_string(D) + ", Dv=" + std::to_string(Dv) +
                " are not supported; the CUDA kernel needs multiples of 8 in 8..256 (pad the head dim)");
  if (lse && (lse->dtype != DType::F32 || lse->rank != 3 || lse->sizes[0] != B || lse->sizes[1] != Hq ||
              lse->sizes[2] != Lq))
    throw Error("CUDA flex_attention: lse must be fp32 [B, Hq, Lq], got " + std::string(dtype_name(lse->dtype)) + " " +
                lse->shape_str());

  // ---- kernel spec: blocks and K/V stages that fit the device's shared memory ----
  CudaPrefillPlan p;
  // Default tiles must tile a BlockMask's blocks: the largest of 128 / 64 / 32 / 16 that divides them.
  int block_m = opt.block_m, block_n = opt.block_n, use_wgmma_opt = opt.use_wgmma;
  const bool masked = mask && mask->kv_num_blocks;
  if (block_m > 0 || block_n > 0 || use_wgmma_opt >= 0) p.knobs = "user";
#ifndef FLEXJIT_NO_CPU_BACKEND  // the database (JSON) is part of the full build
  // A tuned engine and blocks for this GPU and bucket, where the call allows them.
  if (p.knobs == "default" && opt.use_tuning && !dev.name.empty()) {
    const runtime::TuningBucket bucket = cuda_prefill_bucket(q.dtype, static_cast<int>(D), static_cast<int>(Dv),
                                                             static_cast<int>(Hq / Hkv), Lq, Lkv, B * Hq, masked, dev);
    if (auto t = runtime::TuningDb::global().lookup(bucket)) {
      const int w = cuda_prefill_use_wgmma(t->engine);
      const bool fits_mask = !masked || (t->block_m > 0 && t->block_n > 0 && mask->q_block_size % t->block_m == 0 &&
                                         mask->kv_block_size % t->block_n == 0);
      const bool engine_ok =
          w == 0 || (w > 0 && cuda_wgmma_refusal(q.dtype, static_cast<int>(D), static_cast<int>(Dv), dev, t->block_m,
                                                 t->block_n).empty());
      if (w >= 0 && fits_mask && engine_ok) {
        block_m = t->block_m;
        block_n = t->block_n;
        use_wgmma_opt = w;
        p.knobs = "tuned";
      }
    }
  }
#endif
  if (mask && mask->kv_num_blocks) {
    auto fit = [](int64_t size, int want) {
      int b = want;
      while (b > 16 && size % b != 0) b /= 2;
      return b;
    };
    const int want_wgmma = cuda_resolve_wgmma(use_wgmma_opt, q.dtype, static_cast<int>(D), static_cast<int>(Dv), dev,
                                              block_m, block_n);
    const jit::KernelSpec def = cuda_prefill_kernel_spec(q.dtype, static_cast<int>(D), static_cast<int>(Dv),
                                                         static_cast<int>(Hq / Hkv), dev, block_m, block_n, want_wgmma);
    if (block_m <= 0) block_m = fit(mask->q_block_size, def.block_m);
    if (block_n <= 0) block_n = fit(mask->kv_block_size, def.block_n);
  }
  // Auto (-1) falls back to the mma.sync engine where the blocks (a BlockMask's) do not suit wgmma.
  const int use_wgmma = cuda_resolve_wgmma(use_wgmma_opt, q.dtype, static_cast<int>(D), static_cast<int>(Dv), dev,
                                           block_m, block_n);
  p.spec = cuda_prefill_kernel_spec(q.dtype, static_cast<int>(D), static_cast<int>(Dv), static_cast<int>(Hq / Hkv),
                                    dev, block_m, block_n, use_wgmma);
  jit::KernelSpec& s = p.spec;
  p.smem_bytes = jit::cuda_prefill_smem_bytes(s);

  // ---- block mask: the kernel's blocks must tile the mask's ----
  if (mask && mask->kv_num_blocks) {
    if (mask->q_block_size % s.block_m != 0 || mask->kv_block_size % s.block_n != 0)
      throw Error("CUDA flex_attention: the BlockMask's blocks (" + std::to_string(mask->q_block_size) + "x" +
                  std::to_string(mask->kv_block_size) + ") must be multiples of the kernel's BLOCK_M x BLOCK_N (" +
                  std::to_string(s.block_m) + "x" + std::to_string(s.block_n) + ")");
    if ((mask->B != 1 && mask->B != B) || (mask->H != 1 && mask->H != Hq))
      throw Error("CUDA flex_attention: the BlockMask's B=" + std::to_string(mask->B) + ", H=" +
                  std::to_string(mask->H) + " must be 1 or the call's B=" + std::to_string(B) + ", Hq=" +
                  std::to_string(Hq));
    if (mask->q_blocks * mask->q_block_size < Lq || mask->kv_blocks * mask->kv_block_size < Lkv)
      throw Error("CUDA flex_attention: the BlockMask covers " + std::to_string(mask->q_blocks * mask->q_block_size) +
                  " x " + std::to_string(mask->kv_blocks * mask->kv_block_size) + " but the call is " +
                  std::to_string(Lq) + " x " + std::to_string(Lkv) + "; build it for this call's lengths");
  }

  // ---- the parameter block ----
  FlexCudaPrefillArgs& a = p.args;
  runtime::set_tensor_args(a, q, k, v, out, lse);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = Lq;
  a.Lkv = Lkv;
  a.Bkv = Bkv;
  a.scale = static_cast<float>(opt.scale ? *opt.scale : 1.0 / std::sqrt(static_cast<double>(D)));
  if (mask && mask->kv_num_blocks) a.mask = *mask;
  a.error_flag = error_flag;
  if (mods.buffers.size() > FLEXJIT_CUDA_MAX_BUFFERS || mods.params.size() > FLEXJIT_CUDA_MAX_PARAMS)
    throw Error("CUDA flex_attention: the mods read " + std::to_string(mods.buffers.size()) + " buffers and " +
                std::to_string(mods.params.size()) + " params; a CUDA launch carries at most " +
                std::to_string(FLEXJIT_CUDA_MAX_BUFFERS) + " and " + std::to_string(FLEXJIT_CUDA_MAX_PARAMS));
  runtime::BoundMods bound(mods, bind);  // checks every buffer's dtype / rank and every param
  for (size_t i = 0; i < mods.buffers.size(); ++i) a.buffers[i] = bound.args().buffers[i];
  for (size_t i = 0; i < mods.params.size(); ++i) a.params[i] = bound.args().params[i];

  // ---- launch geometry ----
  p.block_threads = static_cast<unsigned>(s.warps * 32);
  const int64_t q_blocks = (Lq + s.block_m - 1) / s.block_m;
  if (q_blocks > 0x7fffffff || Hq > 65535 || B > 65535)
    throw Error("CUDA flex_attention: grid too large (query blocks " + std::to_string(q_blocks) + ", Hq " +
                std::to_string(Hq) + ", B " + std::to_string(B) + "; Hq and B are limited to 65535)");
  p.grid[0] = static_cast<unsigned>(q_blocks);
  p.grid[1] = static_cast<unsigned>(Hq);
  p.grid[2] = static_cast<unsigned>(B);
  return p;
}

CudaRunInfo run_cuda_prefill(CudaPrefillPlan& plan, const ModSet& mods, void* stream) {
  jit::CudaBinary bin = jit::get_cuda_binary(plan.spec, mods);
  CudaRunInfo info{bin.symbol, bin.cache, bin.compile_ms};
  if (plan.grid[0] == 0 || plan.grid[1] == 0 || plan.grid[2] == 0) return info;  // nothing to compute
  void* fn = cuda_load_function(bin.key, bin.cubin, bin.ptx, bin.symbol, plan.smem_bytes);
  cuda_launch(fn, plan.grid, plan.block_threads, plan.smem_bytes, stream, &plan.args);
  return info;
}

}  // namespace flexjit

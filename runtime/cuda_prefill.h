// Host-side planning of one CUDA prefill launch: validation, kernel spec, grid, shared memory
// and the __grid_constant__ parameter block (templates/cuda/abi.cuh). Plain C++ on plain views
// (device pointers are carried, never dereferenced), so it is unit-tested on machines without a
// GPU; the launch itself (driver module load, the caller's stream) is the runtime's next step.
#pragma once

#include <string>

#include "jit/instantiate.h"
#include "jit/mods.h"
#include "runtime/attention.h"
#include "runtime/cuda_driver.h"
#include "runtime/tuning_db.h"
#include "templates/mod_abi.h"
#include "templates/cuda/abi.cuh"

namespace flexjit {

// What the planner needs to know of the GPU (the driver reports it; tests make it up).
struct CudaDeviceInfo {
  std::string name;             // "NVIDIA H200" (tuning database key; empty: unknown, not tuned)
  std::string arch = "sm_90";   // compute capability as NVRTC's arch
  int max_smem_optin = 232448;  // dynamic shared memory a block may opt in to (bytes)
  int sm_count = 132;
};
// What the planners assume of a GPU known only by its arch (cache warm for a fleet): the opt-in
// shared memory per block of that generation (sm_80 163 KiB, sm_86 / sm_89 / sm_120 99 KiB,
// sm_90 / sm_100 227 KiB) and 132 SMs.
CudaDeviceInfo cuda_device_info_for_arch(const std::string& arch);

// The planners' view of a device the driver describes.
inline CudaDeviceInfo cuda_device_info(const CudaDeviceProps& p) {
  CudaDeviceInfo d;
  d.name = p.name;
  d.arch = p.arch;
  d.max_smem_optin = p.max_smem_optin;
  d.sm_count = p.sm_count;
  return d;
}

struct CudaPrefillPlan {
  jit::KernelSpec spec;        // backend Cuda, prefill: what get_cuda_binary compiles
  std::string knobs = "default";  // where engine and blocks came from: "default", "user", "tuned"
  unsigned grid[3] = {0, 0, 0};  // (query blocks, Hq, B); any 0: nothing to launch
  unsigned block_threads = 0;
  int smem_bytes = 0;          // dynamic shared memory (opt-in above 48 KiB)
  FlexCudaPrefillArgs args{};  // the kernel's single parameter, by value
  std::string describe() const;  // "cuda prefill bf16 D=128 ... grid 64x32x1, 128 threads, 88 KiB smem"
};

// Throws flexjit::Error("<who>: ...") unless t is 4-D with its last dim contiguous and every row
// 16-byte aligned (what the CUDA kernels' cp.async tiles need), saying how to fix it.
void check_cuda_rows(const TensorView& t, const std::string& who, const std::string& name);

// The prefill kernel spec for these head dims and GQA group on `dev`.
// mma.sync engine (sm_80+): BLOCK_M (block_m, 0 = 64) as warps of one or two m16 tiles (BLOCK_M
// 128: 4 warps of two, FA2's tile), BLOCK_N (block_n, 0 = 64, or 32 with BLOCK_M 128 above D 64),
// two K/V stages where shared memory allows, else one (and with the default BLOCK_N, 32).
// wgmma engine (use_wgmma, see AttentionOptions; sm_90 GPUs, compiled for sm_90a): BLOCK_M 64 or
// 128 (one or two warpgroups, default 128), BLOCK_N 64 or 128 (default 128 up to D 128, else 64).
// plan_cuda_prefill picks smaller defaults where a BlockMask's blocks need them. Throws
// flexjit::Error for blocks the kernel cannot take or that do not fit, or for use_wgmma 1 where
// the wgmma engine cannot run (saying why).
jit::KernelSpec cuda_prefill_kernel_spec(DType dtype, int head_dim, int head_dim_v, int gqa_group,
                                         const CudaDeviceInfo& dev, int block_m = 0, int block_n = 0,
                                         int use_wgmma = 0);
// Why the wgmma engine cannot take this call ("" when it can): the arch, the head dims, the dtype
// or the blocks (0 = default).
std::string cuda_wgmma_refusal(DType dtype, int head_dim, int head_dim_v, const CudaDeviceInfo& dev, int block_m,
                               int block_n);
// The engine a spec runs, by the tuning database's name: "mma", "wgmma" (USE_WGMMA=1), "wgmma2" (2).
std::string cuda_prefill_engine_name(const jit::KernelSpec& spec);
// The USE_WGMMA value of such a name; -1 for a name that is none of them.
int cuda_prefill_use_wgmma(const std::string& engine_name);

// A CUDA tuning-database bucket: `path` (decode / prefill), the call's sizes, `engine` (the key's
// kernel family) and the GPU's model ("cpu" field) and SM count ("threads" field).
runtime::TuningBucket cuda_tuning_bucket(const std::string& path, DType dtype, int head_dim, int head_dim_v,
                                         int gqa_group, int64_t lq, int64_t lkv, int64_t work, bool paged,
                                         const std::string& engine, const CudaDeviceInfo& dev);
// The tuning-database bucket of a CUDA prefill call (runtime/cuda_autotune.h tunes it): the GPU's
// model and SM count, dtype, head dims, GQA group, Lq / Lkv / B x Hq rounded up to powers of two,
// and whether a BlockMask is given ("cuda-mask" / "cuda").
runtime::TuningBucket cuda_prefill_bucket(DType dtype, int head_dim, int head_dim_v, int gqa_group, int64_t lq,
                                          int64_t lkv, int64_t work, bool masked, const CudaDeviceInfo& dev);

// A causal BlockMask for L x L in square blocks of `block` keys (query block i: block i partial,
// blocks 0 .. i-1 full), its arrays uploaded into `mem` (which must outlive the launches that use
// it), for the GPU benchmark and tuner. Needs a GPU (see runtime/cuda_driver.h).
FlexBlockMaskArgs cuda_causal_mask(int64_t L, int block, CudaAllocations* mem);

// use_wgmma as the call gives it (-1 auto: FLEXJIT_CUDA_WGMMA=1 turns the engine on where the call
// allows it) resolved to 0 or 1 for these blocks.
int cuda_resolve_wgmma(int use_wgmma, DType dtype, int head_dim, int head_dim_v, const CudaDeviceInfo& dev,
                       int block_m, int block_n);

// q [B, Hq, Lq, D], k [Bkv, Hkv, Lkv, D], v [Bkv, Hkv, Lkv, Dv], out [B, Hq, Lq, Dv] on the GPU,
// bf16 or fp16, last dim contiguous, rows 16-byte aligned; lse [B, Hq, Lq] fp32 or null.
// `mask`: a BlockMask already on the device (its int32 arrays), or null for none. `error_flag`: a
// device int the kernel ORs bits into (null: not reported): 1 when a mod indexes a buffer out of
// range, 2 when a block mask's count or index is out of range (that entry is skipped, not read).
// Buffers bound in `bind` must be device tensors. Throws flexjit::Error naming what is wrong
// and how to fix it. Knobs: opt.block_m / opt.block_n (0 = default), opt.use_wgmma, opt.scale, opt.enable_gqa.
// With none of block_m / block_n / use_wgmma given and opt.use_tuning, a tuning-database entry for
// this GPU (dev.name) and bucket sets the engine and blocks (plan.knobs "tuned"), unless a
// BlockMask's blocks or the call rule them out (full build only: the database is JSON).
CudaPrefillPlan plan_cuda_prefill(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const TensorView* lse, const ModSet& mods,
                                  const ModBindings& bind, const FlexBlockMaskArgs* mask,
                                  const AttentionOptions& opt, const CudaDeviceInfo& dev,
                                  int* error_flag);

// Compiles (or finds in the cache) the plan's kernel for its mods, loads it into the current
// context and enqueues it on `stream` (null: the default stream). Asynchronous: errors of the
// kernel itself surface at the next synchronisation. Needs a GPU (see runtime/cuda_driver.h).
struct CudaRunInfo {
  std::string symbol, cache;  // cache: miss / disk (of the compiled binary)
  double compile_ms = 0;
};
CudaRunInfo run_cuda_prefill(CudaPrefillPlan& plan, const ModSet& mods, void* stream);

}  // namespace flexjit

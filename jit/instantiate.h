// Template instantiation: kernel template text + generated mod body + spec -> one translation
// unit with one extern "C" entry, plus the content key that names it in the cache.
#pragma once

#include <string>
#include <vector>

#include "jit/codegen.h"
#include "jit/mods.h"

namespace flexjit::jit {

// Prefill: flash attention specialised on dtype, head dims, blocks and GQA group; mod-free (it
//          calls the mods through FlexPrefillArgs.apply_mods), so its key ignores the ModSet.
// Decode:  flash decoding (templates/cpu/flash_decode.h, FlexDecodeArgs): the same fields, with
//          BLOCK_M = query rows per work item; mod-free like Prefill.
// Mods:    a mod set's FlexModKernels (apply + classify); its key ignores every shape field.
// With backend Cuda, Prefill is templates/cuda/flash_prefill.cuh compiled by NVRTC for `arch`:
// the mods are inlined (no call per tile on a GPU), so its key covers the ModSet, and it is
// keyed on the NVRTC version and arch instead of the host CPU.
// Backward: the CPU backward pass (templates/cpu/flash_backward.h, FlexBackwardArgs); mod-free
//          like Prefill, shape fields as Prefill (the FMA engine only).
// ModsGrad: a score_mod's derivatives (FlexModGradKernels); keyed like Mods.
enum class KernelKind { Prefill, Decode, Mods, Backward, ModsGrad };

// Everything a kernel is specialised on at compile time. Sizes and strides are runtime values.
// The fields below `kind` describe Prefill and Decode kernels; Mods kernels ignore them.
// PARTITION_SIZE is deliberately not a compile-time field: a decode loop's KV length crosses
// partition buckets every few hundred steps, and a 0.3 s compile at each would stall it, while
// the kernel's inner loops run over BLOCK_N keys and gain nothing from knowing it.
struct KernelSpec {
  KernelKind kind = KernelKind::Prefill;
  DType dtype = DType::F32;  // q/k/v/out element type
  int head_dim = 64;         // HEAD_DIM
  int head_dim_v = 64;       // HEAD_DIM_V
  int block_m = 32;          // BLOCK_M
  int block_n = 64;          // BLOCK_N
  int gqa_group = 1;         // GQA_GROUP = Hq / Hkv
  // CPU Prefill: the matmul engine (templates/cpu/prefill_<engine>.h); Amx is bf16 and fp16, Dpbf16 bf16 only.
  PrefillEngine engine = PrefillEngine::Fma;
  Backend backend = Backend::Cpu;
  std::string arch;   // Cuda: "sm_80", "sm_90", ... (what NVRTC compiles for)
  int kv_stages = 2;  // Cuda: K/V shared-memory stages (FLEXJIT_KV_STAGES: 1 or 2)
  // Cuda: warps per CTA. Decode: they take the partition's KV blocks in turn. Prefill: each owns
  // BLOCK_M / warps query rows (one or two m16 tiles; runtime/cuda_prefill picks).
  int warps = 4;
  // "prefill fp32 HEAD_DIM=64 HEAD_DIM_V=64 BLOCK_M=32 BLOCK_N=64 GQA_GROUP=1 ENGINE=fma"
  std::string str() const;
};

struct Instantiation {
  std::string key;     // hex content hash of everything that affects the binary
  std::string symbol;  // readable prefix + short hash: flexjit_prefill_fp32_d128_m32_n64_g1_3fa9c1e2
};

// Computes key and symbol without building the source (cheap enough for every call's slow path).
Instantiation plan(const KernelSpec& spec, const ModSet& mods);
// The same with an explicit digest of the template files (tests use it to show that editing a
// template changes every key).
Instantiation plan(const KernelSpec& spec, const ModSet& mods, const std::string& templates_digest);

// SHA-256 over (path, text) pairs: what plan() folds into keys for the embedded templates.
std::string templates_digest(const std::vector<std::pair<std::string, std::string>>& files);
const std::vector<std::pair<std::string, std::string>>& embedded_templates();

// The template files a kernel's translation unit is made of, in order.
std::vector<std::string> template_files(const KernelSpec& spec);

// Dynamic shared memory a CUDA prefill kernel needs per CTA, in bytes (its kSmemBytes).
int cuda_prefill_smem_bytes(const KernelSpec& spec);
// The same for the CUDA decode kernel (templates/cuda/flash_decode.cuh).
int cuda_decode_smem_bytes(const KernelSpec& spec);
// The CUDA decode kernel's second entry (the partitions' merge) for its symbol.
std::string cuda_merge_symbol(const std::string& symbol);

// The full translation unit for `spec` and `mods`, defining `symbol`.
std::string make_source(const KernelSpec& spec, const ModSet& mods, const std::string& symbol);
// A CUDA kernel's source for running on the CPU (tests/support/cuda_emulator): make_source's text
// with templates/cuda/emulate.cuh after the spec macros, compiled by the CPU JIT, never by NVRTC.
std::string make_emulation_source(const KernelSpec& spec, const ModSet& mods, const std::string& symbol);

// Text of an embedded template file, by path relative to the repository ("templates/cpu/...").
const std::string& template_text(const std::string& path);

}  // namespace flexjit::jit

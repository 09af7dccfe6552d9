#include "jit/instantiate.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <sstream>

#include "jit/cache.h"
#include "jit/codegen.h"
#include "jit/compile.h"
#include "jit/emulation.h"
#include "jit/nvrtc.h"

namespace flexjit::jit {

namespace {

const char* kind_name(KernelKind k) {
  switch (k) {
    case KernelKind::Prefill: return "prefill";
    case KernelKind::Decode: return "decode";
    case KernelKind::Mods: return "mods";
    case KernelKind::Backward: return "backward";
    case KernelKind::ModsGrad: return "mods_grad";
  }
  return "?";
}

int dtype_code(DType t) {
  switch (t) {
    case DType::F32: return 0;
    case DType::BF16: return 1;
    case DType::F16: return 2;
    default: break;
  }
  throw Error(std::string("kernel dtype ") + dtype_name(t) + " is not supported; use fp32, bf16 or fp16");
}

bool is_mods_kind(KernelKind k) { return k == KernelKind::Mods || k == KernelKind::ModsGrad; }

// What of the ModSet a kernel's binary depends on: all of it for Mods and CUDA kernels (which
// inline the mods), none of it for CPU Prefill and Decode.
ModSet effective_mods(const KernelSpec& spec, const ModSet& mods) {
  return is_mods_kind(spec.kind) || spec.backend == Backend::Cuda ? mods : ModSet{};
}

bool is_cuda(const KernelSpec& s) { return s.backend == Backend::Cuda; }

std::string spec_defines(const KernelSpec& s, const std::string& symbol) {
  std::ostringstream os;
  os << "// flexjit kernel: " << s.str() << "\n";
  if (!is_mods_kind(s.kind)) {
    os << "#define FLEXJIT_DTYPE " << dtype_code(s.dtype) << "\n"
       << "#define HEAD_DIM " << s.head_dim << "\n"
       << "#define HEAD_DIM_V " << s.head_dim_v << "\n"
       << "#define BLOCK_M " << s.block_m << "\n"
       << "#define BLOCK_N " << s.block_n << "\n"
       << "#define GQA_GROUP " << s.gqa_group << "\n";
    if (is_cuda(s)) os << "#define FLEXJIT_KV_STAGES " << s.kv_stages << "\n";
    if (is_cuda(s) && s.kind == KernelKind::Prefill) os << "#define FLEXJIT_WARPS " << s.warps << "\n";
    if (is_cuda(s) && s.engine == PrefillEngine::Wgmma) os << "#define FLEXJIT_WGMMA 1\n";
    if (is_cuda(s) && s.kind == KernelKind::Decode)
      os << "#define FLEXJIT_DECODE_WARPS " << s.warps << "\n"
         << "#define FLEXJIT_ENTRY_MERGE " << cuda_merge_symbol(symbol) << "\n";
    if (s.kind == KernelKind::Backward)
      os << "#define FLEXJIT_BWD_DPBF16 " << (s.engine == PrefillEngine::Dpbf16 ? 1 : 0) << "\n";
  }
  os << "#define FLEXJIT_ENTRY " << symbol << "\n";
  return os.str();
}

}  // namespace

// The template files a kernel's translation unit is made of, in order (a CUDA TU has the generated
// mod body before its last file, a Mods / ModsGrad TU before cpu/mods_local.h, see make_source).
// A CPU Prefill TU is the shared item
// code, one engine (the tile scratch and the matmuls) and the driver.
std::vector<std::string> template_files(const KernelSpec& s) {
  if (is_cuda(s) && s.kind == KernelKind::Decode)
    return {"templates/mod_abi.h", "templates/cuda/abi.cuh", "templates/cuda/common.cuh", "templates/cuda/flash_block.cuh",
            "templates/cuda/flash_decode.cuh"};
  if (is_cuda(s) && s.engine == PrefillEngine::Wgmma)
    return {"templates/mod_abi.h",           "templates/cuda/abi.cuh",          "templates/cuda/common.cuh",
            "templates/cuda/wgmma.cuh",      "templates/cuda/flash_block.cuh",  "templates/cuda/prefill_walk.cuh",
            "templates/cuda/flash_prefill_wgmma.cuh"};
  if (is_cuda(s))
    return {"templates/mod_abi.h", "templates/cuda/abi.cuh", "templates/cuda/common.cuh", "templates/cuda/flash_block.cuh",
            "templates/cuda/prefill_walk.cuh", "templates/cuda/flash_prefill.cuh"};
  if (s.kind == KernelKind::Mods)
    return {"templates/mod_abi.h", "templates/cpu/common.h", "templates/cpu/split.h", "templates/cpu/mods_local.h",
            "templates/cpu/mods.h"};
  if (s.kind == KernelKind::ModsGrad)
    return {"templates/mod_abi.h", "templates/cpu/common.h", "templates/cpu/split.h", "templates/cpu/mods_local.h",
            "templates/cpu/mods_grad.h"};
  if (s.kind == KernelKind::Backward)
    return {"templates/mod_abi.h", "templates/cpu/common.h", "templates/cpu/split.h", "templates/cpu/elem.h",
            "templates/cpu/flash_backward.h"};
  if (s.kind == KernelKind::Decode && s.engine == PrefillEngine::Amx)
    return {"templates/mod_abi.h", "templates/cpu/common.h",    "templates/cpu/split.h",
            "templates/cpu/elem.h", "templates/cpu/amx_tiles.h", "templates/cpu/decode_amx.h",
            "templates/cpu/flash_decode.h"};
  if (s.kind == KernelKind::Decode)
    return {"templates/mod_abi.h", "templates/cpu/common.h", "templates/cpu/split.h", "templates/cpu/elem.h",
            "templates/cpu/decode_dot.h", "templates/cpu/flash_decode.h"};
  std::vector<std::string> files = {"templates/mod_abi.h", "templates/cpu/common.h", "templates/cpu/split.h",
                                    "templates/cpu/elem.h", "templates/cpu/prefill_item.h"};
  files.push_back(s.engine == PrefillEngine::Amx ? "templates/cpu/amx_tiles.h"           // the tiles' steps
                                                 : "templates/cpu/prefill_lanes.h");  // FMA, vdpbf16ps
  files.push_back(std::string("templates/cpu/prefill_") + engine_name(s.engine) + ".h");
  files.push_back("templates/cpu/flash_prefill.h");
  return files;
}

int cuda_prefill_smem_bytes(const KernelSpec& s) {
  if (s.engine == PrefillEngine::Wgmma)  // templates/cuda/flash_prefill_wgmma.cuh kSmemBytes: 1024 for alignment
    return 1024 + 2 * (s.block_m * s.head_dim + s.kv_stages * s.block_n * (s.head_dim + s.head_dim_v));
  auto up16 = [](int x) { return (x + 15) / 16 * 16; };
  const int qs = up16(s.head_dim) + 8, ks = up16(s.head_dim) + 8, vs = up16(s.head_dim_v) + 8;
  return 2 * (s.block_m * qs + s.kv_stages * s.block_n * (ks + vs));
}

int cuda_decode_smem_bytes(const KernelSpec& s) {  // templates/cuda/flash_decode.cuh kSmemBytes
  auto up16 = [](int x) { return (x + 15) / 16 * 16; };
  const bool f32 = s.dtype == DType::F32;
  const int elem = f32 ? 4 : 2;
  const int qs = f32 ? s.head_dim + 4 : up16(s.head_dim) + 8, ks = qs,
            vs = f32 ? s.head_dim_v + 4 : up16(s.head_dim_v) + 8;
  const int p_scratch = f32 ? 4 * s.warps * s.block_m * 32 : 0;
  const int kv = elem * s.warps * s.kv_stages * s.block_n * (ks + vs);
  const int merge = 4 * s.warps * s.block_m * (up16(s.head_dim_v) + 2);
  return elem * s.block_m * qs + p_scratch + std::max(kv, merge);
}

std::string cuda_merge_symbol(const std::string& symbol) { return symbol + "_merge"; }

std::string KernelSpec::str() const {
  std::ostringstream os;
  if (backend == Backend::Cuda) os << "cuda ";
  os << kind_name(kind);
  if (!is_mods_kind(kind))
    os << " " << dtype_name(dtype) << " HEAD_DIM=" << head_dim << " HEAD_DIM_V=" << head_dim_v
       << " BLOCK_M=" << block_m << " BLOCK_N=" << block_n << " GQA_GROUP=" << gqa_group
       << " ENGINE="
       << (backend == Backend::Cuda ? (engine == PrefillEngine::Wgmma ? "wgmma" : "mma")
           : kind == KernelKind::Decode && engine == PrefillEngine::Fma ? "dot"
                                                                          : engine_name(engine));
  if (backend == Backend::Cuda) os << " ARCH=" << arch << " KV_STAGES=" << kv_stages;
  if (backend == Backend::Cuda) os << " WARPS=" << warps;
  return os.str();
}

const std::string& template_text(const std::string& path) {
  for (const auto& [p, text] : embedded_templates())
    if (p == path) return text;
  internal_error(__FILE__, __LINE__, "embedded template exists: " + path);
}

std::string templates_digest(const std::vector<std::pair<std::string, std::string>>& files) {
  std::string all;
  for (const auto& [p, text] : files) all += p + "\n" + sha256_hex(text) + "\n";
  return sha256_hex(all);
}

Instantiation plan(const KernelSpec& spec, const ModSet& mods) {
  // The digest of the kernel's own template files (so a CUDA template edit leaves every CPU key
  // alone); the templates are fixed for the life of the binary, so each list is hashed once.
  static std::mutex mu;
  static std::map<std::vector<std::string>, std::string> digests;
  std::vector<std::string> files = template_files(spec);
  std::string digest;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = digests.find(files);
    if (it == digests.end()) {
      std::vector<std::pair<std::string, std::string>> texts;
      for (const auto& f : files) texts.emplace_back(f, template_text(f));
      it = digests.emplace(files, templates_digest(texts)).first;
    }
    digest = it->second;
  }
  return plan(spec, mods, digest);
}

Instantiation plan(const KernelSpec& spec, const ModSet& mods, const std::string& templates_hash) {
  if (!is_mods_kind(spec.kind)) {
    dtype_code(spec.dtype);
    if (spec.kind == KernelKind::Backward &&
        (spec.engine == PrefillEngine::Amx || (spec.engine == PrefillEngine::Dpbf16 && spec.dtype != DType::BF16) ||
         is_cuda(spec)))
      throw Error("the backward kernel runs on CPU with the FMA engine, or vdpbf16ps for bf16; got " + spec.str());
    const bool fma = spec.engine == PrefillEngine::Fma;
    if (spec.kind == KernelKind::Decode && !is_cuda(spec) &&
        (!(fma || spec.engine == PrefillEngine::Amx) || spec.block_n % 16 != 0 || spec.block_m < 1))
      throw Error("the decode kernel needs BLOCK_N a multiple of 16, BLOCK_M >= 1 and the dot or AMX engine, got " +
                  spec.str());
    if (spec.engine == PrefillEngine::Amx &&
        ((spec.dtype != DType::BF16 && spec.dtype != DType::F16) || spec.block_n % 32 != 0))
      throw Error("the AMX engine needs bf16 or fp16 and BLOCK_N a multiple of 32, got " + spec.str());
    if (spec.engine == PrefillEngine::Dpbf16 && spec.dtype != DType::BF16)
      throw Error("the vdpbf16ps engine needs bf16, got " + spec.str());
    if (spec.head_dim < 1 || spec.head_dim > 256 || spec.head_dim_v < 1 || spec.head_dim_v > 256)
      throw Error("head dims D=" + std::to_string(spec.head_dim) + ", Dv=" + std::to_string(spec.head_dim_v) +
                  " are not supported on CPU; D and Dv must be in 1..256");
  }
  if (is_cuda(spec)) {
    if (spec.kind != KernelKind::Prefill && spec.kind != KernelKind::Decode)
      throw Error("CUDA kernels exist for prefill and decode; got " + spec.str());
    if (spec.dtype != DType::BF16 && spec.dtype != DType::F16 &&
        !(spec.dtype == DType::F32 && spec.kind == KernelKind::Decode))
      throw Error(std::string("the CUDA kernels take bf16 or fp16 inputs (fp32 accumulation; fp32 for decode only), got ") +
                  dtype_name(spec.dtype) + "; convert q, k and v first");
    if (spec.dtype == DType::F32 && spec.block_n != 32)
      throw Error("the CUDA fp32 decode kernel takes one key per lane: BLOCK_N 32, got " + spec.str());
    if (spec.head_dim % 8 != 0 || spec.head_dim_v % 8 != 0)
      throw Error("the CUDA kernels need D and Dv multiples of 8 (16-byte rows), got D=" +
                  std::to_string(spec.head_dim) + ", Dv=" + std::to_string(spec.head_dim_v));
    if (spec.kind == KernelKind::Decode &&
        (spec.block_m != 16 || spec.block_n % 16 != 0 || spec.block_n < 16 || spec.block_n > 128 ||
         spec.warps < 1 || spec.warps > 8 || (spec.kv_stages != 1 && spec.kv_stages != 2) ||
         spec.engine != PrefillEngine::Fma))
      throw Error("CUDA decode: BLOCK_M 16, BLOCK_N a multiple of 16 in 16..128, 1..8 warps, KV stages 1 or 2, "
                  "the default engine; got " + spec.str());
    if (spec.kind == KernelKind::Prefill && spec.engine == PrefillEngine::Wgmma &&
        ((spec.block_m != 64 && spec.block_m != 128) || (spec.block_n != 64 && spec.block_n != 128) ||
         spec.warps != spec.block_m / 16 || spec.kv_stages < 1 || spec.kv_stages > 3 || spec.head_dim % 64 != 0 ||
         spec.head_dim > 256 || (spec.head_dim_v != 64 && spec.head_dim_v != 128 && spec.head_dim_v != 256) ||
         spec.arch != "sm_90a"))
      throw Error("CUDA wgmma prefill: BLOCK_M 64 or 128 (4 warps per 64 rows), BLOCK_N 64 or 128, KV stages 1 to 3, "
                  "D a multiple of 64 up to 256, Dv 64 / 128 / 256, arch sm_90a; got " + spec.str());
    if (spec.kind == KernelKind::Prefill && spec.engine != PrefillEngine::Wgmma && (spec.block_m % 16 != 0 || spec.block_m < 16 || spec.block_m > 128 || spec.block_n % 16 != 0 ||
        spec.block_n < 16 || spec.block_n > 256 || (spec.kv_stages != 1 && spec.kv_stages != 2) ||
        spec.engine != PrefillEngine::Fma || spec.warps < 1 || spec.block_m % (16 * spec.warps) != 0 ||
        spec.block_m / (16 * spec.warps) > 2))
      throw Error("CUDA prefill blocks: BLOCK_M a multiple of 16 in 16..128 split over warps of one or two m16 "
                  "tiles, BLOCK_N a multiple of 16 in 16..256, KV stages 1 or 2, the default engine; got " +
                  spec.str());
    if (spec.arch.empty()) throw Error("a CUDA kernel spec needs an arch (sm_80, sm_90, ...)");
  }
  ModSet eff = effective_mods(spec, mods);
  Instantiation inst;
  if (is_cuda(spec)) {
    inst.key = make_key({{"templates", templates_hash},
                         {"spec", spec.str()},
                         {"mods", eff.signature()},
                         {"codegen", codegen_identity(Backend::Cuda)}},
                        "nvrtc=" + nvrtc_version() + ";arch=" + spec.arch);
  } else {
#ifdef FLEXJIT_NO_CPU_BACKEND
    throw Error("this flexjit was built without the CPU backend (FLEXJIT_CPU_BACKEND=OFF), so it cannot make " +
                spec.str() + "; use CUDA tensors, or a build with the CPU backend");
#else
    // Only the mods kinds hold generated code: an attention kernel's key leaves codegen out, so a
    // codegen change (or FLEXJIT_MOD_TABLES) does not recompile them.
    inst.key = make_key({{"templates", templates_hash},
                         {"spec", spec.str()},
                         {"mods", eff.signature()},
                         {"codegen", is_mods_kind(spec.kind) ? codegen_identity(Backend::Cpu) : "none"}});
#endif
  }
  std::ostringstream sym;
  sym << "flexjit_" << (is_cuda(spec) ? "cuda_" : "") << kind_name(spec.kind);
  if (!is_mods_kind(spec.kind))
    sym << "_" << dtype_name(spec.dtype) << "_d" << spec.head_dim
        << (spec.head_dim_v != spec.head_dim ? "_dv" + std::to_string(spec.head_dim_v) : "") << "_m"
        << spec.block_m << "_n" << spec.block_n << "_g" << spec.gqa_group
        << (spec.engine != PrefillEngine::Fma ? std::string("_") + engine_name(spec.engine) : "")
        << (is_cuda(spec) && spec.kind == KernelKind::Decode ? "_w" + std::to_string(spec.warps) : "")
        << (is_cuda(spec) ? "_" + spec.arch : "");
  sym << "_" << inst.key.substr(0, 8);
  inst.symbol = sym.str();
  return inst;
}

std::string make_emulation_source(const KernelSpec& spec, const ModSet& mods, const std::string& symbol) {
  FLEXJIT_CHECK(is_cuda(spec), "make_emulation_source takes CUDA kernel specs");
  const char* prelude = "templates/cuda/emulate.cuh";
  return with_emulation_prelude(make_source(spec, mods, symbol), prelude, template_text(prelude));
}

std::string make_source(const KernelSpec& spec, const ModSet& mods, const std::string& symbol) {
  std::vector<std::string> files = template_files(spec);
  if (spec.kind == KernelKind::Mods && !is_cuda(spec)) {
    // A precompilable prefix the same for every mod set (the ABI, cpu/common.h and the codegen
    // helpers: jit/compile.h kPrefixEnd), then what is this mod set's.
    std::string src = "// flexjit kernel: " + spec.str() + "\n";
    for (size_t i = 0; i < 2; ++i) src += "// ---- " + files[i] + " ----\n" + template_text(files[i]) + "\n";
    src += "// == flexjit jit/codegen helpers (cpu) ==\n" + mod_helpers(Backend::Cpu);
    src += kPrefixEnd;
    src += "#define FLEXJIT_ENTRY " + symbol + "\n";
    for (size_t i = 2; i < files.size(); ++i) {
      if (i == files.size() - 2) src += emit_mod_body(mods, Backend::Cpu, /*with_helpers=*/false);
      src += "// ---- " + files[i] + " ----\n" + template_text(files[i]) + "\n";
    }
    return src;
  }
  std::string src = spec_defines(spec, symbol);
  // The generated mod body goes before flash_block.cuh (the first file that calls the mods) of a CUDA TU, before
  // mods_local.h (which sizes its copies by the body's counts) and the kernel file of a Mods / ModsGrad TU.
  const size_t body_at =
      is_cuda(spec) ? size_t(std::find(files.begin(), files.end(), "templates/cuda/flash_block.cuh") - files.begin())
      : is_mods_kind(spec.kind) ? files.size() - 2
                                : files.size();
  for (size_t i = 0; i < files.size(); ++i) {
    if (i == body_at)
      src += is_cuda(spec) ? emit_mod_body(mods, Backend::Cuda)
             : spec.kind == KernelKind::Mods ? emit_mod_body(mods, Backend::Cpu)
                                             : emit_mod_grad_body(mods);
    src += "// ---- " + files[i] + " ----\n" + template_text(files[i]) + "\n";
  }
  return src;
}

}  // namespace flexjit::jit

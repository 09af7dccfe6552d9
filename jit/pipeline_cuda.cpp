// The CUDA half of the JIT pipeline (jit/pipeline.h: get_cuda_binary): plan -> disk cache ->
// make_source -> NVRTC. LLVM-free, so the CUDA-only build (FLEXJIT_CPU_BACKEND=OFF) has it too.
#include "jit/cache.h"
#include "jit/nvrtc.h"
#include "jit/pipeline.h"
#include "jit/types.h"

namespace flexjit::jit {

CudaBinary get_cuda_binary(const KernelSpec& spec, const ModSet& mods) {
  FLEXJIT_CHECK(spec.backend == Backend::Cuda, "get_cuda_binary takes CUDA kernel specs");
  Instantiation inst = plan(spec, mods);
  KernelCache& cache = KernelCache::global();
  CudaBinary out;
  out.symbol = inst.symbol;
  out.key = inst.key;
  out.arch = spec.arch;
  KernelCache::Blob blob = cache.get_or_build(inst.key, inst.symbol, [&]() -> std::string {
    const std::string source = make_source(spec, mods, inst.symbol);
    if (KernelCache::dump_sources_requested()) out.source_path = cache.keep_source(inst.key, ".cu", source, false);
    const std::string name = out.source_path.empty() ? inst.key + ".cu" : out.source_path;
    try {
      return pack_cuda_binary(compile_cuda(source, name, spec.arch));
    } catch (const flexjit::Error& e) {
      const std::string kept = cache.keep_source(inst.key, ".cu", source, true);
      throw flexjit::Error("flexjit: CUDA kernel '" + inst.symbol + "' (cache key " + inst.key +
                           ") failed to compile; " +
                           (kept.empty() ? std::string("its source could not be written anywhere")
                                         : "the generated source is at " + kept) +
                           ".\n" + e.what());
    }
  });
  CudaCompileResult r;
  if (!unpack_cuda_binary(blob.bytes, &r) || r.arch != spec.arch)
    throw flexjit::Error("flexjit: the cache entry " + inst.key + ".bin passed its checksum but is not a " +
                         spec.arch + " CUDA binary; remove it (flexjit cache clear)");
  out.cubin = std::move(r.cubin);
  out.ptx = std::move(r.ptx);
  out.cache = cache_hit_name(blob.hit);
  out.compile_ms = blob.build_ms;
  return out;
}

}  // namespace flexjit::jit

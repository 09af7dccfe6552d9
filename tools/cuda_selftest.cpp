// The CUDA-only build's smoke test (FLEXJIT_CPU_BACKEND=OFF; no GoogleTest there): every
// built-in mod through plan -> codegen -> template -> NVRTC -> disk cache for one arch, then
// the same again from the cache, then a launch plan. Prints one line per step; exit 0 = all
// compiled. Usage: flexjit_cuda_selftest [ARCH=sm_90]; its cache is a fresh temporary directory.
#include <cstdio>
#include <cstdlib>
#include <system_error>
#include <filesystem>
#include <string>

#include <unistd.h>

#include "jit/cache.h"
#include "jit/nvrtc.h"
#include "jit/pipeline.h"
#include "runtime/cuda_driver.h"
#include "runtime/cuda_prefill.h"
#include "score_mods/registry.h"

int main(int argc, char** argv) {
  using namespace flexjit;
  const std::string arch = argc > 1 ? argv[1] : "sm_90";
  std::string dir = (std::filesystem::temp_directory_path() / "flexjit-cuda-selftest-XXXXXX").string();
  if (!::mkdtemp(dir.data())) {
    std::printf("cuda selftest: could not create a temporary cache directory\n");
    return 1;
  }
  ::setenv("FLEXJIT_CACHE_DIR", dir.c_str(), 1);  // before the cache is first used
  std::string why;
  if (!jit::nvrtc_available(&why)) {
    std::printf("cuda selftest: SKIPPED, no NVRTC: %s\n", why.c_str());
    return 0;
  }
  const std::string gpu = cuda_driver_status();
  std::printf("cuda selftest: NVRTC %s, arch %s, GPU: %s\n", jit::nvrtc_version().c_str(), arch.c_str(),
              gpu.empty() ? (std::to_string(cuda_device_count()) + " device(s)").c_str() : gpu.c_str());
  int failures = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (const std::string& name : builtin_mod_names()) {
      const RegisteredMod& r = find_mod(name);
      ModSet mods;
      (r.kind == ModKind::Score ? mods.score_mod : mods.mask_mod) = r.mod.expr;
      mods.buffers = r.mod.buffers;
      mods.params = r.mod.params;
      jit::KernelSpec spec;
      spec.backend = jit::Backend::Cuda;
      spec.kind = jit::KernelKind::Prefill;
      spec.dtype = DType::BF16;
      spec.head_dim = spec.head_dim_v = 128;
      spec.block_m = spec.block_n = 64;
      spec.gqa_group = 4;
      spec.arch = arch;
      try {
        jit::CudaBinary b = jit::get_cuda_binary(spec, mods);
        const bool ok = b.cubin.size() > 4 && b.cubin.compare(0, 4, "\x7f" "ELF") == 0 && !b.ptx.empty() &&
                        (pass == 0 ? b.cache == "miss" : b.cache == "disk");
        std::printf("  %-16s %s %-5s %6.0f ms  %s\n", name.c_str(), ok ? "ok  " : "FAIL", b.cache.c_str(),
                    b.compile_ms, b.symbol.c_str());
        failures += ok ? 0 : 1;
      } catch (const std::exception& e) {
        std::printf("  %-16s FAIL %s\n", name.c_str(), e.what());
        ++failures;
      }
    }
  }
  // A launch plan for a Llama-style call (pointers are placeholders: nothing is launched).
  alignas(16) static unsigned char fake[64];
  auto view = [&](int64_t b, int64_t h, int64_t l, int64_t d) {
    TensorView t;
    t.data = fake, t.dtype = DType::BF16, t.rank = 4;
    t.sizes[0] = b, t.sizes[1] = h, t.sizes[2] = l, t.sizes[3] = d;
    t.strides[3] = 1, t.strides[2] = d, t.strides[1] = l * d, t.strides[0] = h * l * d;
    return t;
  };
  AttentionOptions opt;
  opt.enable_gqa = true;
  CudaDeviceInfo dev;
  dev.arch = arch;
  CudaPrefillPlan plan = plan_cuda_prefill(view(1, 32, 4096, 128), view(1, 8, 4096, 128), view(1, 8, 4096, 128),
                                           view(1, 32, 4096, 128), nullptr, ModSet{}, ModBindings{}, nullptr, opt,
                                           dev, nullptr);
  std::printf("  plan: %s\n", plan.describe().c_str());
  std::printf("cuda selftest: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return failures ? 1 : 0;
}

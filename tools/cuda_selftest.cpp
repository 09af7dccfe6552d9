// The CUDA-only build's smoke test (FLEXJIT_CPU_BACKEND=OFF; no GoogleTest there): every
// built-in mod through plan -> codegen -> template -> NVRTC -> disk cache for one arch, then
// the same again from the cache, then a launch plan. Prints one line per step; exit 0 = all
// compiled. Usage: flexjit_cuda_selftest [ARCH=sm_90]; its cache is a fresh temporary directory.
#include <algorithm>
#include <functional>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>
#include <cstdlib>
#include <system_error>
#include <filesystem>
#include <string>

#include <unistd.h>

#include "jit/cache.h"
#include "jit/executor.h"
#include "jit/nvrtc.h"
#include "jit/pipeline.h"
#include "runtime/cuda_decode.h"
#include "runtime/cuda_driver.h"
#include "runtime/cuda_prefill.h"
#include "runtime/reference.h"
#include "score_mods/registry.h"
#include "tests/support/wgmma_probe.h"

namespace {

using namespace flexjit;

// A registered mod (or "all_masked": a mask_mod keeping nothing) with its example buffers for
// `shape` bound on the host (*host) and on the device (*dev).
ModSet host_case_mods(const std::string& name, const ShapeInfo& shape, std::vector<OwnedTensor>* storage,
                      ModBindings* host) {
  ModSet mods;
  if (name == "all_masked") {
    mods.mask_mod = ir::binary(ir::Op::Gt, ir::variable(ir::Var::KvIdx),
                               ir::binary(ir::Op::Add, ir::variable(ir::Var::QIdx), ir::constant_int(100000)));
  } else if (!name.empty()) {
    const RegisteredMod& r = find_mod(name);
    TracedMod t = instantiate_example(r, shape, storage);
    mods = mod_set_of(t, r.kind);
    *host = t.bindings;
  }
  return mods;
}
ModSet case_mods(const std::string& name, const ShapeInfo& shape, std::vector<OwnedTensor>* storage,
                 ModBindings* host, ModBindings* dev, CudaAllocations* mem) {
  const ModSet mods = host_case_mods(name, shape, storage, host);
  *dev = *host;
  for (auto& [n, view] : dev->buffers) view = mem->upload(view);
  return mods;
}

// out (bf16) and lse against the reference: max |out - ref| and |lse - ref| (finite entries),
// whether the -inf entries agree, and the verdict.
struct Agreement {
  double err = 0, lse_err = 0;
  bool lse_ok = true, ok = false;
};
Agreement compare(const OwnedTensor& out, const OwnedTensor& lse, const RefResult& ref, int64_t Lq) {
  Agreement a;
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < Lq; ++i) rows.push_back(i);
  a.err = max_abs_error(out.view, ref, rows);
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    const double got = static_cast<const float*>(lse.view.data)[i], want = ref.lse[i];
    if (std::isinf(want) || std::isinf(got)) a.lse_ok = a.lse_ok && std::isinf(want) && std::isinf(got) && got < 0;
    else a.lse_err = std::max(a.lse_err, std::fabs(got - want));
  }
  a.ok = a.err <= 2e-2 && a.lse_ok && a.lse_err <= 1e-2 && std::isfinite(a.err);
  return a;
}

// One kernel run on the GPU against the float64 reference (same bf16 inputs). Returns false on a
// numerical mismatch; prints a line either way.
bool gpu_case(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lkv, int64_t D, const std::string& mod_name,
              const CudaDeviceProps& props, int use_wgmma = 0) {
  ShapeInfo shape;
  shape.B = B, shape.Hq = Hq, shape.Hkv = Hkv, shape.Lq = Lq, shape.Lkv = Lkv;
  OwnedTensor q = OwnedTensor::make("q", DType::BF16, {B, Hq, Lq, D});
  OwnedTensor k = OwnedTensor::make("k", DType::BF16, {B, Hkv, Lkv, D});
  OwnedTensor v = OwnedTensor::make("v", DType::BF16, {B, Hkv, Lkv, D});
  OwnedTensor out = OwnedTensor::make("out", DType::BF16, {B, Hq, Lq, D});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {B, Hq, Lq});
  fill_random(q.view, 1 + Lq);
  fill_random(k.view, 2 + Lkv);
  fill_random(v.view, 3 + D);
  ModBindings host_bind, dev_bind;
  std::vector<OwnedTensor> storage;
  CudaAllocations mem;
  const std::string label = mod_name.empty() ? "none" : mod_name;
  const ModSet mods = case_mods(mod_name, shape, &storage, &host_bind, &dev_bind, &mem);
  TensorView dq = mem.upload(q.view), dk = mem.upload(k.view), dv = mem.upload(v.view);
  TensorView dout = mem.upload(out.view), dlse = mem.upload(lse.view);
  AttentionOptions opt;
  opt.enable_gqa = Hq != Hkv;
  opt.use_wgmma = use_wgmma;
  const CudaDeviceInfo dev = cuda_device_info(props);
  const double scale = 1.0 / std::sqrt(double(D));
  bool ok = false;
  char line[512];
  try {
    int* no_flag = nullptr;
    CudaPrefillPlan plan = plan_cuda_prefill(dq, dk, dv, dout, &dlse, mods, dev_bind, nullptr, opt, dev, no_flag);
    CudaRunInfo info = run_cuda_prefill(plan, mods, nullptr);
    cuda_synchronize();
    cuda_copy_to_host(out.view.data, dout.data, size_t(out.view.numel()) * 2);
    cuda_copy_to_host(lse.view.data, dlse.data, size_t(lse.view.numel()) * 4);
    const Agreement g = compare(out, lse, reference_attention(q.view, k.view, v.view, mods, host_bind, scale), Lq);
    ok = g.ok;
    std::snprintf(line, sizeof(line), "  gpu %-5s B%lld Hq%lld Hkv%lld Lq%lld Lkv%lld D%lld %-14s max|out-ref| %.2e  lse %.2e%s  (%s, %s)",
                  ok ? "ok" : "FAIL", (long long)B, (long long)Hq, (long long)Hkv, (long long)Lq, (long long)Lkv,
                  (long long)D, label.c_str(), g.err, g.lse_err, g.lse_ok ? "" : " (-inf mismatch)", info.cache.c_str(),
                  plan.describe().c_str());
  } catch (const std::exception& e) {
    std::snprintf(line, sizeof(line), "  gpu FAIL  D%lld %s: %s", (long long)D, label.c_str(), e.what());
  }
  std::printf("%s\n", line);
  return ok;
}

// The wgmma layout probe (tests/support/wgmma_probe.h) on an sm_90 GPU: the descriptors, swizzle
// and fragment layouts the wgmma engine relies on, one at a time against a plain matmul (the CPU
// emulator passes the same kernel). Returns the number of failed modes; prints a line per mode.
int gpu_wgmma_probe() {
  int failed = 0;
  try {
    const std::string src = testing::wgmma_probe_source();
    const jit::CudaCompileResult r = jit::compile_cuda(src, "wgmma_probe.cu", "sm_90a");
    void* fn = cuda_load_function("flexjit-wgmma-probe", r.cubin, r.ptx, testing::kWgmmaProbeSymbol,
                                  testing::kWgmmaProbeSmem);
    bool mode1_ok = true;
    for (int mode : {0, 6, 1, 8}) {
      const testing::WgmmaProbeCase c = testing::wgmma_probe_case(mode);
      CudaAllocations mem;
      void* da = mem.alloc(c.a.size() * 2);
      void* db = mem.alloc(c.b.size() * 2);
      void* dd = mem.alloc(c.d_elems * 4);
      cuda_copy_to_device(da, c.a.data(), c.a.size() * 2);
      cuda_copy_to_device(db, c.b.data(), c.b.size() * 2);
      testing::WgmmaProbeArgs args{static_cast<const unsigned short*>(da), static_cast<const unsigned short*>(db),
                                   static_cast<float*>(dd), mode};
      const unsigned grid[3] = {1, 1, 1};
      cuda_launch(fn, grid, testing::kWgmmaProbeThreads, testing::kWgmmaProbeSmem, nullptr, &args);
      cuda_synchronize();
      std::vector<float> d(c.d_elems);
      cuda_copy_to_host(d.data(), dd, d.size() * 4);
      std::string where;
      const double err = testing::wgmma_probe_error(mode, c, d, &where);
      const bool ok = err <= 1e-3;
      if (mode == 8) {  // a diagnostic: the swapped reading must disagree; it agreeing explains a mode 1 failure
        std::printf("  gpu %-5s wgmma probe mode 8: %s: max |D - ref| %.2e%s\n", ok == mode1_ok ? "FAIL" : "ok",
                    testing::wgmma_probe_what(mode), err,
                    ok && !mode1_ok ? ": this GPU reads MN-major descriptors with LBO and SBO the other way: swap "
                                      "them for V in flash_prefill_wgmma.cuh (and in the emulator's decode())"
                                    : "");
        failed += ok == mode1_ok ? 1 : 0;
        continue;
      }
      if (mode == 1) mode1_ok = ok;
      failed += ok ? 0 : 1;
      std::printf("  gpu %-5s wgmma probe mode %d: %s: max |D - ref| %.2e%s%s\n", ok ? "ok" : "FAIL", mode,
                  testing::wgmma_probe_what(mode), err, ok ? "" : " at ", ok ? "" : where.c_str());
    }
  } catch (const std::exception& e) {
    std::printf("  gpu FAIL  wgmma probe: %s\n", e.what());
    ++failed;
  }
  return failed;
}

// One decode call (runtime/cuda_decode) on the GPU against the float64 reference: contiguous KV
// (page_size 0) or a paged cache with a shuffled block table; `lens` are the sequences' lengths
// (contiguous: all the same). Returns false on a mismatch; prints a line either way.
bool gpu_decode_case(int64_t Hq, int64_t Hkv, int64_t Lq, const std::vector<int64_t>& lens, int64_t D,
                     int64_t page_size, int64_t partition, const std::string& mod_name, const CudaDeviceProps& props) {
  const int64_t B = int64_t(lens.size());
  const bool paged = page_size > 0;
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());
  ShapeInfo shape;
  shape.B = B, shape.Hq = Hq, shape.Hkv = Hkv, shape.Lq = paged ? max_len : Lq, shape.Lkv = max_len;
  OwnedTensor q = OwnedTensor::make("q", DType::BF16, {B, Hq, Lq, D});
  OwnedTensor k, v, table, seq;
  int64_t num_pages = 0, max_pages = 1;
  if (paged) {
    for (int64_t l : lens) num_pages += (l + page_size - 1) / page_size, max_pages = std::max(max_pages, (l + page_size - 1) / page_size);
    num_pages += 2;
    k = OwnedTensor::make("k", DType::BF16, {num_pages, page_size, Hkv, D});
    v = OwnedTensor::make("v", DType::BF16, {num_pages, page_size, Hkv, D});
    table = OwnedTensor::make("block_table", DType::I32, {B, max_pages});
    seq = OwnedTensor::make("seq_lens", DType::I32, {B});
    std::vector<int> order(static_cast<size_t>(num_pages));
    for (size_t i = 0; i < order.size(); ++i) order[i] = int((i * 7919) % order.size());  // a fixed shuffle
    int next = 0;
    for (int64_t b = 0; b < B; ++b) {
      seq.data<int>()[b] = int(lens[size_t(b)]);
      for (int64_t j = 0; j < max_pages; ++j)
        table.data<int>()[b * max_pages + j] = j < (lens[size_t(b)] + page_size - 1) / page_size ? order[size_t(next++)] : 0;
    }
  } else {
    k = OwnedTensor::make("k", DType::BF16, {B, Hkv, max_len, D});
    v = OwnedTensor::make("v", DType::BF16, {B, Hkv, max_len, D});
  }
  OwnedTensor out = OwnedTensor::make("out", DType::BF16, {B, Hq, Lq, D});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {B, Hq, Lq});
  fill_random(q.view, 5 + Lq);
  fill_random(k.view, 6 + max_len);
  fill_random(v.view, 7 + D);
  ModBindings host_bind, dev_bind;
  std::vector<OwnedTensor> storage;
  CudaAllocations mem;
  const ModSet mods = case_mods(mod_name, shape, &storage, &host_bind, &dev_bind, &mem);
  TensorView dq = mem.upload(q.view), dk = mem.upload(k.view), dv = mem.upload(v.view);
  TensorView dout = mem.upload(out.view), dlse = mem.upload(lse.view);
  TensorView dtable, dseq;
  int* dflag = static_cast<int*>(mem.alloc(4));
  const int zero = 0;
  cuda_copy_to_device(dflag, &zero, 4);
  CudaDecodeKv kv;
  kv.k = &dk;
  kv.v = &dv;
  if (paged) {
    dtable = mem.upload(table.view);
    dseq = mem.upload(seq.view);
    kv.block_table = &dtable;
    kv.seq_lens = &dseq;
    kv.max_seq_len = max_len;
  }
  AttentionOptions opt;
  opt.enable_gqa = Hq != Hkv;
  opt.partition_size = partition;
  const CudaDeviceInfo dev = cuda_device_info(props);
  const double scale = 1.0 / std::sqrt(double(D));
  bool ok = false;
  char line[640];
  std::string label = (mod_name.empty() ? "none" : mod_name) + (paged ? " paged" + std::to_string(page_size) : "");
  try {
    CudaDecodePlan plan = plan_cuda_decode(dq, kv, dout, &dlse, mods, dev_bind, nullptr, opt, dev, dflag);
    set_cuda_decode_workspace(plan, plan.workspace_bytes ? mem.alloc(plan.workspace_bytes) : nullptr);
    CudaRunInfo info = run_cuda_decode(plan, mods, nullptr);
    cuda_synchronize();
    int flag = -1;
    cuda_copy_to_host(&flag, dflag, 4);
    cuda_copy_to_host(out.view.data, dout.data, size_t(out.view.numel()) * 2);
    cuda_copy_to_host(lse.view.data, dlse.data, size_t(lse.view.numel()) * 4);
    RefResult ref = paged ? reference_paged_attention(q.view, k.view, v.view, table.view, seq.view, mods, host_bind, scale)
                          : reference_attention(q.view, k.view, v.view, mods, host_bind, scale);
    const Agreement g = compare(out, lse, ref, Lq);
    const double err = g.err, lse_err = g.lse_err;
    const bool lse_ok = g.lse_ok;
    ok = g.ok && flag == 0;
    std::snprintf(line, sizeof(line),
                  "  gpu %-5s decode B%lld Hq%lld Hkv%lld Lq%lld Lkv%lld D%lld %-16s max|out-ref| %.2e  lse %.2e%s flag %d  (%s, %s)",
                  ok ? "ok" : "FAIL", (long long)B, (long long)Hq, (long long)Hkv, (long long)Lq, (long long)max_len,
                  (long long)D, label.c_str(), err, lse_err, lse_ok ? "" : " (-inf mismatch)", flag, info.cache.c_str(),
                  plan.describe().c_str());
  } catch (const std::exception& e) {
    std::snprintf(line, sizeof(line), "  gpu FAIL  decode D%lld %s: %s", (long long)D, label.c_str(), e.what());
  }
  std::printf("%s\n", line);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
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
  // Every built-in mod's prefill (mma.sync; on sm_90 also the wgmma engine's two schedules, for
  // sm_90a) and decode kernel: compiled on all cores (NVRTC takes ~1 s a kernel: on a GPU host,
  // minutes of a short session otherwise), then each found again in the disk cache.
  struct Job {
    std::string name;
    jit::KernelSpec spec;
    ModSet mods;
  };
  std::vector<Job> jobs;
  const CudaDeviceInfo target = cuda_device_info_for_arch(arch);
  for (const std::string& name : builtin_mod_names()) {
    const RegisteredMod& r = find_mod(name);
    std::vector<jit::KernelSpec> specs = {cuda_prefill_kernel_spec(DType::BF16, 128, 128, 4, target),
                                          cuda_decode_kernel_spec(DType::BF16, 128, 128, 4, target)};
    if (cuda_wgmma_refusal(DType::BF16, 128, 128, target, 0, 0).empty())
      for (int use : {1, 2}) specs.push_back(cuda_prefill_kernel_spec(DType::BF16, 128, 128, 4, target, 0, 0, use));
    for (const jit::KernelSpec& spec : specs) jobs.push_back({name, spec, mod_set_of(r.mod, r.kind)});
  }
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<std::string> lines(jobs.size());
    std::vector<int> bad(jobs.size(), 0);
    auto compile = [&](size_t i) {
      char line[512];
      try {
        jit::CudaBinary b = jit::get_cuda_binary(jobs[i].spec, jobs[i].mods);
        const bool ok = b.cubin.size() > 4 && b.cubin.compare(0, 4, "\x7f" "ELF") == 0 && !b.ptx.empty() &&
                        (pass == 0 ? b.cache == "miss" : b.cache == "disk");
        std::snprintf(line, sizeof line, "  %-16s %s %-5s %6.0f ms  %s", jobs[i].name.c_str(), ok ? "ok  " : "FAIL",
                      b.cache.c_str(), b.compile_ms, b.symbol.c_str());
        bad[i] = ok ? 0 : 1;
      } catch (const std::exception& e) {
        std::snprintf(line, sizeof line, "  %-16s FAIL %s", jobs[i].name.c_str(), e.what());
        bad[i] = 1;
      }
      lines[i] = line;
    };
    const auto t0 = std::chrono::steady_clock::now();
    unsigned n = 1;
    if (pass == 0) n = jit::for_each_on_cores(jobs.size(), compile, 16);
    else for (size_t i = 0; i < jobs.size(); ++i) compile(i);
    for (size_t i = 0; i < jobs.size(); ++i) {
      std::printf("%s\n", lines[i].c_str());
      failures += bad[i];
    }
    std::printf("  %s: %zu kernels in %.1f s on %u thread%s\n", pass == 0 ? "compiled" : "found in the disk cache",
                jobs.size(), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), n,
                n == 1 ? "" : "s");
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

  // On a GPU: run kernels on odd shapes and every kind of mod against the float64 reference.
  if (gpu.empty()) {
    try {
      cuda_use_primary_context();
      CudaDeviceProps props = cuda_current_device_props();
      std::printf("  GPU: %s, %d SMs, %d bytes of opt-in shared memory per block\n", props.arch.c_str(),
                  props.sm_count, props.max_smem_optin);
      struct C { int64_t B, Hq, Hkv, Lq, Lkv, D; const char* mod; };
      const C cases[] = {{1, 4, 4, 1, 1, 64, ""},          {2, 6, 2, 17, 97, 80, "causal"},
                         {1, 3, 1, 129, 129, 128, "alibi"}, {1, 4, 2, 97, 4097, 64, "softcap"},
                         {1, 2, 2, 129, 17, 256, "sliding_window"}, {2, 4, 4, 200, 200, 64, "document"},
                         {1, 4, 4, 64, 64, 128, "all_masked"},      {1, 8, 8, 1000, 1000, 128, "prefix_lm"}};
      // The wgmma engine (sm_90: Hopper) on the same kinds of case, its head dims (multiples of 64).
      const C wcases[] = {{1, 4, 4, 1, 1, 64, ""},          {2, 6, 2, 17, 97, 128, "causal"},
                          {1, 3, 1, 129, 129, 128, "alibi"}, {1, 4, 2, 97, 4097, 64, "softcap"},
                          {1, 2, 2, 129, 17, 256, "sliding_window"}, {2, 4, 4, 200, 200, 64, "document"},
                          {1, 4, 4, 64, 64, 128, "all_masked"},      {1, 8, 8, 1000, 1000, 128, "prefix_lm"}};
      // Decoding: KV 1, P-1, P, P+1, 4097 and 65536 around P = 256; GQA 1, 3, 4, 8; paged caches
      // (shuffled pages, an empty sequence); the cost model's split (partition 0).
      struct DC { int64_t Hq, Hkv, Lq; std::vector<int64_t> lens; int64_t D, page, partition; const char* mod; };
      const DC dcases[] = {{4, 4, 1, {1}, 128, 0, 256, ""},
                           {6, 2, 1, {255}, 128, 0, 256, "alibi"},
                           {8, 2, 2, {256}, 128, 0, 256, "causal"},
                           {16, 2, 1, {257}, 128, 0, 256, "softcap"},
                           {32, 8, 1, {4097, 4097}, 128, 0, 256, "sliding_window"},
                           {32, 8, 1, {65536}, 128, 0, 0, ""},
                           {12, 4, 5, {300, 300}, 64, 0, 0, "rel_pos"},
                           {32, 8, 1, {1000, 0, 37, 4097}, 128, 16, 256, "alibi"},
                           {32, 8, 4, {5000, 64, 129}, 128, 64, 0, "causal"},
                           {8, 8, 1, {2000}, 256, 16, 0, "softcap"}};
      const bool hopper = cuda_wgmma_refusal(DType::BF16, 128, 128, cuda_device_info(props), 0, 0).empty();
      // Every case's kernel compiled on all cores first (one at a time, NVRTC's ~1 s each would cost
      // a short GPU session half a minute); a spec that differs from the case's plan only wastes a
      // compile.
      {
        const CudaDeviceInfo dev = cuda_device_info(props);
        std::vector<std::pair<jit::KernelSpec, ModSet>> warm;
        std::vector<OwnedTensor> storage;
        auto add = [&](int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lkv, int64_t D, const char* mod,
                       bool decode, int use) {
          ShapeInfo shape;
          shape.B = B, shape.Hq = Hq, shape.Hkv = Hkv, shape.Lq = Lq, shape.Lkv = Lkv;
          ModBindings bind;
          const ModSet mods = host_case_mods(mod, shape, &storage, &bind);
          const int group = int(Hq / Hkv);
          warm.push_back({decode ? cuda_decode_kernel_spec(DType::BF16, int(D), int(D), group, dev)
                                 : cuda_prefill_kernel_spec(DType::BF16, int(D), int(D), group, dev, 0, 0, use),
                          mods});
        };
        for (const C& c : cases) add(c.B, c.Hq, c.Hkv, c.Lq, c.Lkv, c.D, c.mod, false, 0);
        for (int use : {1, 2})
          for (const C& c : wcases)
            if (hopper) add(c.B, c.Hq, c.Hkv, c.Lq, c.Lkv, c.D, c.mod, false, use);
        for (const DC& c : dcases) {
          const int64_t max_len = *std::max_element(c.lens.begin(), c.lens.end());
          add(int64_t(c.lens.size()), c.Hq, c.Hkv, c.page > 0 ? max_len : c.Lq, max_len, c.D, c.mod, true, 0);
        }
        const auto t0 = std::chrono::steady_clock::now();
        const unsigned n = jit::for_each_on_cores(warm.size(), [&](size_t i) {
          try {
            jit::get_cuda_binary(warm[i].first, warm[i].second);
          } catch (const std::exception&) {  // the case reports it
          }
        }, 16);
        std::printf("  the cases' %zu kernels compiled in %.1f s on %u threads\n", warm.size(),
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), n);
      }
      for (const C& c : cases) failures += gpu_case(c.B, c.Hq, c.Hkv, c.Lq, c.Lkv, c.D, c.mod, props) ? 0 : 1;
      if (hopper) {
        failures += gpu_wgmma_probe();
        for (int use : {1, 2})  // 2: the pipelined schedule
          for (const C& c : wcases)
            failures += gpu_case(c.B, c.Hq, c.Hkv, c.Lq, c.Lkv, c.D, c.mod, props, use) ? 0 : 1;
      } else {
        std::printf("  wgmma engine: SKIPPED (%s is not sm_90)\n", props.arch.c_str());
      }
      for (const DC& c : dcases)
        failures += gpu_decode_case(c.Hq, c.Hkv, c.Lq, c.lens, c.D, c.page, c.partition, c.mod, props) ? 0 : 1;
    } catch (const std::exception& e) {
      std::printf("  GPU run FAILED: %s\n", e.what());
      ++failures;
    }
  } else {
    std::printf("  GPU runs: SKIPPED (%s)\n", gpu.c_str());
  }
  std::printf("cuda selftest: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return failures ? 1 : 0;
}

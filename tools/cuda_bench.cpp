// The GPU benchmark of the CUDA kernels on their own (no torch): what issue 9 and 10's bars measure
// on flexjit's side, in one run on the GPU at hand.
//   - device-to-device copy bandwidth (cuMemcpyDtoD of 1 GiB), the ceiling decode is held to;
//   - decode: bf16, Llama-3.1-8B heads (Hq 32, Hkv 8, D 128), B 1..64, KV 4k..128k, contiguous and
//     paged (pages of 16, shuffled), GB/s of K and V read per call next to the copy bandwidth;
//   - prefill: bf16, D 128, causal (a causal BlockMask) and ALiBi, L 4k..16k, B x H = 128 heads,
//     TFLOP/s (causal counted as half).
// Times are medians of 5 repetitions of 10 back-to-back calls (host clock around a device
// synchronisation). Inputs are constant (bf16 2^-7), so every output element must be that value:
// each case checks its output and says WRONG (JSON "ok": false) otherwise, so a kernel that skips
// work can never pass as a fast one. The torch baselines (torch.compile(flex_attention), SDPA) are measured by
// bench/cuda_prefill_bench.py in the same GPU session. Writes a table to stdout and JSON to the
// path given.
//   flexjit_cuda_bench OUT.json [--quick | --smoke]
// --smoke: tiny shapes, one timed call each: every path of the bench for the emulated CUDA device
// (tests/support/emulated_cuda_device.cpp; its times measure the emulator, not a GPU).
// Without a GPU it says so and exits 0; with one, 1 when a case failed or its output was wrong.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "jit/executor.h"
#include "jit/pipeline.h"
#include "runtime/cuda_decode.h"
#include "runtime/cuda_driver.h"
#include "runtime/cuda_prefill.h"
#include "score_mods/registry.h"

namespace {

using namespace flexjit;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

bool g_smoke = false;

// Milliseconds per call: the median over 5 repetitions of `calls` back-to-back calls (--smoke: one
// repetition of one call).
double time_ms(const std::function<void()>& call, int calls = 10) {
  call();
  cuda_synchronize();
  std::vector<double> reps;
  if (g_smoke) calls = 1;
  for (int r = 0; r < (g_smoke ? 1 : 5); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) call();
    cuda_synchronize();
    reps.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / calls);
  }
  return median(reps);
}

constexpr unsigned short kOne = 0x3c00;  // bf16 2^-7: every input element

// Whether every `stride`-th of `count` bf16 elements at device address p is kOne within one bf16
// ulp (softmax weights sum to 1, so with constant V each output element is V's value; P is
// rounded to bf16 for P V while the row sum is not, hence the ulp).
bool output_is_constant(const void* p, size_t count, size_t stride = 1) {
  std::vector<unsigned short> h(count);
  cuda_copy_to_host(h.data(), p, count * 2);
  for (size_t i = 0; i < count; i += stride)
    if (h[i] < kOne - 1 || h[i] > kOne + 1) return false;
  return true;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '"' ? std::string("\\\"") : std::string(1, c);
  return o;
}

// The prefill variants timed per case: the mma.sync engine's default tile (64 x 64, a warp per
// m16 tile) and FA2's (128 rows, 4 warps of two tiles); on sm_90 the wgmma engine's default
// (128 x 128: two warpgroups sharing K / V, one CTA per SM), one-warpgroup tiles (64 x 64 fits two
// CTAs per SM, whose softmax and MMAs can overlap) and the pipelined schedule (USE_WGMMA=2: three
// stages, 128 x 64).
struct Variant {
  int block_m, block_n, use_wgmma;
};
std::vector<Variant> prefill_variants(const CudaDeviceInfo& dev, int64_t D) {
  std::vector<Variant> v = {{0, 0, 0}, {128, 0, 0}};
  if (cuda_wgmma_refusal(DType::BF16, int(D), int(D), dev, 0, 0).empty())
    v.insert(v.end(), {{0, 0, 1}, {64, 64, 1}, {64, 128, 1}, {0, 0, 2}});
  return v;
}
AttentionOptions variant_options(const Variant& var) {
  AttentionOptions opt;
  opt.block_m = var.block_m;
  opt.block_n = var.block_n;
  opt.use_wgmma = var.use_wgmma;
  return opt;
}

// A prefill case's mods: "alibi" (its example slopes, bound on the host) or "causal" (mask_mod).
ModSet bench_mods(const std::string& mod, int64_t B, int64_t H, int64_t L, ModBindings* bind,
                  std::vector<OwnedTensor>* storage) {
  const RegisteredMod& r = find_mod(mod);
  if (mod != "alibi") return mod_set_of(r.mod, r.kind);
  ShapeInfo shape;
  shape.B = B, shape.Hq = H, shape.Hkv = H, shape.Lq = L, shape.Lkv = L;
  TracedMod t = instantiate_example(r, shape, storage);
  *bind = t.bindings;
  return mod_set_of(t, r.kind);
}

// Compiles every kernel the bench will run, on all cores (up to 16), before any timing: NVRTC
// takes ~1 s a kernel, which one at a time would cost a short GPU session ~15 s. Planning never
// dereferences the views' pointers.
void prewarm(const CudaDeviceInfo& dev, int64_t D, int64_t Hq, int64_t Hkv, const std::vector<int64_t>& plens) {
  alignas(64) static unsigned char fake[64];
  std::vector<std::pair<jit::KernelSpec, ModSet>> jobs;
  std::vector<OwnedTensor> storage;
  for (bool paged : {false, true}) {
    TensorView q = contiguous_view(fake, DType::BF16, {1, Hq, 1, D}), k, table, lens;
    CudaDecodeKv kv;
    if (paged) {
      k = contiguous_view(fake, DType::BF16, {256, 16, Hkv, D});
      table = contiguous_view(fake, DType::I32, {1, 256});
      lens = contiguous_view(fake, DType::I32, {1});
      kv.block_table = &table, kv.seq_lens = &lens, kv.max_seq_len = 4096;
    } else {
      k = contiguous_view(fake, DType::BF16, {1, Hkv, 4096, D});
    }
    kv.k = kv.v = &k;
    for (int block_n : {0, 64}) {
      AttentionOptions opt;
      opt.enable_gqa = true;
      opt.block_n = block_n;
      jobs.push_back({plan_cuda_decode(q, kv, q, nullptr, ModSet{}, ModBindings{}, nullptr, opt, dev, nullptr).spec,
                      ModSet{}});
    }
  }
  for (int64_t L : plens)
    for (const std::string mod : {"causal", "alibi"}) {
      ModBindings bind;
      const ModSet mods = bench_mods(mod, 1, 2, L, &bind, &storage);
      const TensorView t = contiguous_view(fake, DType::BF16, {1, 2, L, D});
      for (const Variant& var : prefill_variants(dev, D)) try {
          jobs.push_back({plan_cuda_prefill(t, t, t, t, nullptr, mods, bind, nullptr, variant_options(var), dev,
                                            nullptr).spec,
                          mods});
        } catch (const std::exception&) {  // the timed run reports it
        }
    }
  const auto t0 = std::chrono::steady_clock::now();
  const unsigned n = jit::for_each_on_cores(jobs.size(), [&](size_t j) {
    try {
      jit::get_cuda_binary(jobs[j].first, jobs[j].second);
    } catch (const std::exception&) {  // the timed run reports it
    }
  }, 16);
  std::printf("  compiled or found %zu kernels in %.1f s on %u threads\n", jobs.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), n);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string json_path = argc > 1 ? argv[1] : "cuda_bench.json";
  const std::string mode = argc > 2 ? argv[2] : "";
  const bool quick = mode == "--quick";
  g_smoke = mode == "--smoke";
  if (!mode.empty() && !quick && !g_smoke) {
    std::printf("usage: flexjit_cuda_bench OUT.json [--quick | --smoke]\n");
    return 2;
  }
  const std::string status = cuda_driver_status();
  if (!status.empty()) {
    std::printf("cuda bench: SKIPPED, no GPU (%s)\n", status.c_str());
    std::ofstream(json_path) << "{\"skipped\": \"" << json_escape(status) << "\"}\n";
    return 0;
  }
  cuda_use_primary_context();
  const CudaDeviceProps props = cuda_current_device_props();
  const CudaDeviceInfo dev = cuda_device_info(props);
  std::printf("cuda bench: %s, %s, %d SMs%s\n", props.name.c_str(), props.arch.c_str(), props.sm_count,
              g_smoke ? " (--smoke: tiny shapes, one call each; not a measurement)" : "");
  int bad_cases = 0;  // WRONG outputs and cases that failed: the exit status says so
  std::string json = "{\n  \"device\": \"" + json_escape(props.name) + "\", \"arch\": \"" + props.arch +
                     "\", \"sm_count\": " + std::to_string(props.sm_count);

  // ---- the copy ceiling ----
  const size_t copy_bytes = size_t(1) << (g_smoke ? 24 : 30);
  auto copy_mem = std::make_unique<CudaAllocations>();
  void* a = copy_mem->alloc(copy_bytes);
  void* b = copy_mem->alloc(copy_bytes);
  cuda_fill_u16(a, kOne, copy_bytes / 2);
  const double copy_ms = time_ms([&] { cuda_copy_device_to_device(b, a, copy_bytes); });
  const double copy_gbs = 2.0 * double(copy_bytes) / (copy_ms * 1e6);  // read + write
  copy_mem.reset();
  std::printf("  device-to-device copy: %.0f GB/s (bytes read + written per second, %zu MiB)\n", copy_gbs,
              copy_bytes >> 20);
  json += ",\n  \"copy_gbs\": " + std::to_string(copy_gbs);

  // ---- decode: Llama-3.1-8B heads ----
  const int64_t Hq = 32, Hkv = 8, D = 128;
  const std::vector<int64_t> plens = g_smoke ? std::vector<int64_t>{256}
                                     : quick ? std::vector<int64_t>{4096}
                                             : std::vector<int64_t>{4096, 8192, 16384};
  prewarm(dev, D, Hq, Hkv, plens);
  const std::vector<int64_t> batches = g_smoke ? std::vector<int64_t>{2}
                                       : quick ? std::vector<int64_t>{1, 16}
                                               : std::vector<int64_t>{1, 4, 16, 64};
  const std::vector<int64_t> lens = g_smoke ? std::vector<int64_t>{640}
                                    : quick ? std::vector<int64_t>{4096, 32768}
                                            : std::vector<int64_t>{4096, 16384, 65536, 131072};
  int64_t max_tokens = 0;
  for (int64_t B : batches)
    for (int64_t L : lens) max_tokens = std::max(max_tokens, B * L);
  const size_t kv_elems = size_t(max_tokens) * size_t(Hkv * D);
  auto kv_mem = std::make_unique<CudaAllocations>();
  void* kbuf = kv_mem->alloc(kv_elems * 2);
  void* vbuf = kv_mem->alloc(kv_elems * 2);
  cuda_fill_u16(kbuf, kOne, kv_elems);
  cuda_fill_u16(vbuf, kOne, kv_elems);
  json += ",\n  \"decode\": [";
  std::printf("  decode bf16 Hq %lld Hkv %lld D %lld (GB/s of K and V read; %% of the copy bandwidth)\n", (long long)Hq,
              (long long)Hkv, (long long)D);
  std::printf("    %-6s %-8s %-11s %9s %9s %7s  %-13s %s\n", "B", "KV", "layout", "ms", "GB/s", "copy%", "variant",
              "plan");
  bool first = true;
  for (int64_t B : batches)
    for (int64_t L : lens)
      for (bool paged : {false, true}) {
        const int64_t page = 16;
        CudaAllocations mem;  // this case's
        void* q = mem.alloc(size_t(B * Hq * D) * 2);
        void* out = mem.alloc(size_t(B * Hq * D) * 2);
        cuda_fill_u16(q, kOne, size_t(B * Hq * D));
        TensorView qv = contiguous_view(q, DType::BF16, {B, Hq, 1, D}), ov = contiguous_view(out, DType::BF16, {B, Hq, 1, D});
        TensorView kv_k, kv_v, table, seq;
        void* dtable = nullptr;
        void* dseq = nullptr;
        CudaDecodeKv kv;
        if (paged) {
          const int64_t pages = L / page, num_pages = B * pages;
          kv_k = contiguous_view(kbuf, DType::BF16, {num_pages, page, Hkv, D});
          kv_v = contiguous_view(vbuf, DType::BF16, {num_pages, page, Hkv, D});
          std::vector<int> host_table(static_cast<size_t>(B * pages));
          std::vector<int> host_seq(static_cast<size_t>(B), static_cast<int>(L));
          for (size_t i = 0; i < host_table.size(); ++i) host_table[i] = int((i * 7919) % host_table.size());
          dtable = mem.alloc(host_table.size() * 4);
          dseq = mem.alloc(host_seq.size() * 4);
          cuda_copy_to_device(dtable, host_table.data(), host_table.size() * 4);
          cuda_copy_to_device(dseq, host_seq.data(), host_seq.size() * 4);
          table = contiguous_view(dtable, DType::I32, {B, pages});
          seq = contiguous_view(dseq, DType::I32, {B});
          kv.block_table = &table;
          kv.seq_lens = &seq;
          kv.max_seq_len = L;
        } else {
          kv_k = contiguous_view(kbuf, DType::BF16, {B, Hkv, L, D});
          kv_v = contiguous_view(vbuf, DType::BF16, {B, Hkv, L, D});
        }
        kv.k = &kv_k;
        kv.v = &kv_v;
        // The cost model's plan, then what a GPU run should compare it with (the tuner cannot be
        // built on a GPU host without LLVM / JSON): BLOCK_N 64, and twice / half as many partitions.
        AttentionOptions opt;
        opt.enable_gqa = true;
        const ModSet none;
        std::vector<std::pair<std::string, AttentionOptions>> variants = {{"cost model", opt}};
        try {
          const CudaDecodePlan base = plan_cuda_decode(qv, kv, ov, nullptr, none, ModBindings{}, nullptr, opt, dev, nullptr);
          AttentionOptions wide = opt;
          wide.block_n = 64;
          variants.push_back({"BLOCK_N 64", wide});
          if (base.partition_size >= 2 * base.spec.block_n && base.partition_size / 2 >= 256) {
            AttentionOptions more = opt;
            more.partition_size = base.partition_size / 2 / base.spec.block_n * base.spec.block_n;
            variants.push_back({"partitions x2", more});
          }
          if (base.num_partitions > 1) {
            AttentionOptions fewer = opt;
            fewer.partition_size = base.partition_size * 2;
            variants.push_back({"partitions /2", fewer});
          }
        } catch (const std::exception&) {  // the cost model's run below reports it
        }
        for (const auto& [variant, vopt] : variants) {
          char line[512];
          try {
            CudaDecodePlan plan = plan_cuda_decode(qv, kv, ov, nullptr, none, ModBindings{}, nullptr, vopt, dev, nullptr);
            set_cuda_decode_workspace(plan, plan.workspace_bytes ? mem.alloc(plan.workspace_bytes) : nullptr);
            cuda_fill_u16(out, 0xffff, size_t(B * Hq * D));  // NaN: a variant that writes nothing shows
            const double ms = time_ms([&] { run_cuda_decode(plan, none, nullptr); });
            const double bytes = 2.0 * double(B * L * Hkv * D) * 2;
            const double gbs = bytes / (ms * 1e6);
            const bool ok = output_is_constant(out, size_t(B * Hq * D));
            bad_cases += ok ? 0 : 1;
            std::snprintf(line, sizeof line, "    %-6lld %-8lld %-11s %9.3f %9.0f %6.0f%%  %-13s %s%s", (long long)B,
                          (long long)L, paged ? "paged16" : "contiguous", ms, gbs, 100 * gbs / copy_gbs,
                          variant.c_str(), ok ? "" : "WRONG output  ", plan.describe().c_str());
            json += std::string(first ? "" : ",") + "\n    {\"B\": " + std::to_string(B) +
                    ", \"kv\": " + std::to_string(L) + ", \"paged\": " + (paged ? "true" : "false") +
                    ", \"variant\": \"" + variant + "\", \"block_n\": " + std::to_string(plan.spec.block_n) +
                    ", \"partition_size\": " + std::to_string(plan.partition_size) + ", \"ms\": " +
                    std::to_string(ms) + ", \"gbs\": " + std::to_string(gbs) + ", \"copy_fraction\": " +
                    std::to_string(gbs / copy_gbs) + ", \"partitions\": " + std::to_string(plan.num_partitions) +
                    ", \"ok\": " + (ok ? "true" : "false") + ", \"plan\": \"" + json_escape(plan.describe()) + "\"}";
            first = false;
          } catch (const std::exception& e) {
            ++bad_cases;
            std::snprintf(line, sizeof line, "    %-6lld %-8lld %-11s %-13s FAILED: %s", (long long)B, (long long)L,
                          paged ? "paged16" : "contiguous", variant.c_str(), e.what());
          }
          std::printf("%s\n", line);
          std::fflush(stdout);
        }
      }
  json += "\n  ]";
  kv_mem.reset();

  // ---- prefill: bf16 D 128, 128 heads ----
  json += ",\n  \"prefill\": [";
  std::printf("  prefill bf16 D 128, B x H = %d heads (TFLOP/s; causal counted as half)\n", g_smoke ? 2 : 128);
  std::printf("    %-7s %-7s %9s %9s  %s\n", "mod", "L", "ms", "TFLOP/s", "plan");
  first = true;
  for (int64_t L : plens)
    for (const std::string mod : {"causal", "alibi"}) {
      const int64_t B = g_smoke ? 1 : 8, H = g_smoke ? 2 : 16;
      const size_t elems = size_t(B * H * L * D);
      CudaAllocations mem;  // this case's
      void* q = mem.alloc(elems * 2);
      void* k = mem.alloc(elems * 2);
      void* v = mem.alloc(elems * 2);
      void* o = mem.alloc(elems * 2);
      for (void* p : {q, k, v}) cuda_fill_u16(p, kOne, elems);
      TensorView qv = contiguous_view(q, DType::BF16, {B, H, L, D}), kvv = contiguous_view(k, DType::BF16, {B, H, L, D}),
                 vv = contiguous_view(v, DType::BF16, {B, H, L, D}), ov = contiguous_view(o, DType::BF16, {B, H, L, D});
      ModBindings bind;
      std::vector<OwnedTensor> storage;
      const ModSet mods = bench_mods(mod, B, H, L, &bind, &storage);
      for (auto& [name, view] : bind.buffers) view = mem.upload(view);  // alibi's slopes, on the device
      FlexBlockMaskArgs mask{};
      const FlexBlockMaskArgs* mp = nullptr;
      if (mod == "causal") {
        // mask_mod q_idx >= kv_idx with a causal BlockMask of 128 x 128 blocks: q-block i has block
        // i partial and blocks 0 .. i-1 full.
        mask = cuda_causal_mask(L, 128, &mem);
        mp = &mask;
      }
      for (const Variant& var : prefill_variants(dev, D)) {
        const AttentionOptions opt = variant_options(var);
        char line[512];
        try {
          CudaPrefillPlan plan = plan_cuda_prefill(qv, kvv, vv, ov, nullptr, mods, bind, mp, opt, dev, nullptr);
          const double ms = time_ms([&] { run_cuda_prefill(plan, mods, nullptr); }, 5);
          const double flops = 4.0 * double(B * H) * double(L) * double(L) * double(D) * (mod == "causal" ? 0.5 : 1.0);
          const double tflops = flops / (ms * 1e9);
          const bool ok = output_is_constant(o, elems, 61);
          bad_cases += ok ? 0 : 1;
          std::snprintf(line, sizeof line, "    %-7s %-7lld %9.3f %9.1f  %s%s", mod.c_str(), (long long)L, ms, tflops,
                        ok ? "" : "WRONG output  ", plan.describe().c_str());
          json += std::string(first ? "" : ",") + "\n    {\"mod\": \"" + mod + "\", \"L\": " + std::to_string(L) +
                  ", \"B\": " + std::to_string(B) + ", \"H\": " + std::to_string(H) + ", \"engine\": \"" +
                  cuda_prefill_engine_name(plan.spec) + "\", \"block_m\": " +
                  std::to_string(plan.spec.block_m) + ", \"block_n\": " + std::to_string(plan.spec.block_n) +
                  ", \"ms\": " + std::to_string(ms) + ", \"tflops\": " + std::to_string(tflops) +
                  ", \"ok\": " + (ok ? "true" : "false") + "}";
          first = false;
        } catch (const std::exception& e) {
          ++bad_cases;
          std::snprintf(line, sizeof line, "    %-7s %-7lld FAILED: %s", mod.c_str(), (long long)L, e.what());
        }
        std::printf("%s\n", line);
        std::fflush(stdout);
      }
    }
  json += "\n  ]\n}\n";
  std::ofstream(json_path) << json;
  std::printf("cuda bench: wrote %s%s\n", json_path.c_str(),
              bad_cases ? (" (" + std::to_string(bad_cases) + " cases WRONG or FAILED)").c_str() : "");
  return bad_cases ? 1 : 0;
}

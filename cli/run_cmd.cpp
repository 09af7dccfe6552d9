// `flexjit run`: one attention call on .npy files. The flags spelled out in issue #2 are a
// public contract: add new ones, never rename these.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/mods_from_args.h"
#include "cli/npy.h"
#include "runtime/attention.h"
#include "runtime/block_mask.h"
#include "runtime/cuda_decode.h"
#include "runtime/cuda_driver.h"
#include "runtime/reference.h"
#include "runtime/varlen.h"

namespace flexjit::cli {

DType parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return DType::F32;
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "fp16" || s == "float16") return DType::F16;
  throw Error("--dtype " + s + " is not supported; use fp32, bf16 or fp16");
}

namespace {

std::string fmt_ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f ms", ms);
  return buf;
}

struct RunArgs {
  std::string q, k, v, out, lse_out, report;
  std::string k_cache, v_cache, block_table, seq_lens;  // paged KV (instead of --k / --v)
  ModArgs mods;
  std::string scale;
  bool enable_gqa = false;
  std::string dtype = "fp32";
  std::string device = "cpu";
  std::string block_size;
  std::vector<std::string> kernel_options;
  int threads = 0;
  bool check = false;
  // Varlen (FA2's packed layout): --varlen with --cu-seqlens-q / --cu-seqlens-k and its options.
  bool varlen = false;
  std::string cu_seqlens_q, cu_seqlens_k, alibi_slopes;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0;
};

int64_t parse_positive(const std::string& what, const std::string& s) {
  try {
    size_t used = 0;
    long long v = std::stoll(s, &used);
    if (used == s.size() && v > 0 && v <= (1 << 20)) return v;
  } catch (const std::logic_error&) {
  }
  throw Error(what + ": '" + s + "' is not a positive integer (<= 1048576)");
}

void parse_block_size(const std::string& s, int64_t* q, int64_t* kv) {
  auto x = s.find('x');
  if (x == std::string::npos) {
    *q = *kv = parse_positive("--block-size", s);
  } else {
    *q = parse_positive("--block-size", s.substr(0, x));
    *kv = parse_positive("--block-size", s.substr(x + 1));
  }
}

std::vector<float> to_f32(const TensorView& t) {
  std::vector<float> out(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[size_t(i)] = float(read_element_f64(t, i));
  return out;
}

// The paged inputs: the caches in the call's dtype, the tables as int32.
struct PagedInputs {
  OwnedTensor k_cache, v_cache, block_table, seq_lens;
  int64_t max_len = 0;
};

OwnedTensor load_int32(const std::string& path, const std::string& name, int rank) {
  OwnedTensor t = load_npy(path, name);
  if (t.view.rank != rank || (t.view.dtype != DType::I32 && t.view.dtype != DType::I64))
    throw Error("--" + name + " must hold a " + std::to_string(rank) + "-D int32 array, got " +
                dtype_name(t.view.dtype) + " " + t.view.shape_str());
  if (t.view.dtype == DType::I32) return t;
  OwnedTensor c = OwnedTensor::make(name, DType::I32, std::vector<int64_t>(t.view.sizes, t.view.sizes + rank));
  for (int64_t i = 0; i < t.view.numel(); ++i) {
    const double x = read_element_f64(t.view, i);
    if (x < -2147483648.0 || x > 2147483647.0) throw Error("--" + name + " holds " + std::to_string(int64_t(x)) + ", outside int32");
    c.data<int32_t>()[i] = int32_t(x);
  }
  return c;
}

PagedInputs load_paged(const RunArgs& a, DType dtype) {
  for (auto [f, flag] : {std::pair{&a.v_cache, "--v-cache"}, {&a.block_table, "--block-table"}, {&a.seq_lens, "--seq-lens"}})
    if (f->empty()) throw Error(std::string("--k-cache needs ") + flag + " too (paged KV: --k-cache, --v-cache, "
                                "--block-table, --seq-lens)");
  if (!a.k.empty() || !a.v.empty()) throw Error("pass either --k/--v (contiguous KV) or --k-cache/--v-cache (paged), not both");
  PagedInputs p;
  p.k_cache = convert(load_npy(a.k_cache, "k-cache"), dtype);
  p.v_cache = convert(load_npy(a.v_cache, "v-cache"), dtype);
  for (auto* t : {&p.k_cache, &p.v_cache})
    if (t->view.rank != 4)
      throw Error("--" + t->name + " must hold a 4-D array [num_pages, page_size, Hkv, D], got shape " + t->view.shape_str());
  p.block_table = load_int32(a.block_table, "block-table", 2);
  p.seq_lens = load_int32(a.seq_lens, "seq-lens", 1);
  for (int64_t b = 0; b < p.seq_lens.view.numel(); ++b) p.max_len = std::max<int64_t>(p.max_len, p.seq_lens.data<int32_t>()[b]);
  return p;
}

// q and the keys / values of a run: contiguous --k / --v, or a paged cache, in `dtype`.
struct CallInputs {
  OwnedTensor q, k, v;
  PagedInputs pg;
  bool paged = false;
  // The call's shape for the mods' example buffers: paged mods see absolute positions, so their
  // buffers span the longest sequence.
  ShapeInfo shape() const {
    return paged ? ShapeInfo{q.view.sizes[0], q.view.sizes[1], pg.k_cache.view.sizes[2], pg.max_len, pg.max_len}
                 : ShapeInfo{q.view.sizes[0], q.view.sizes[1], k.view.sizes[1], q.view.sizes[2], k.view.sizes[2]};
  }
};
CallInputs load_call_inputs(const RunArgs& a, DType dtype) {
  CallInputs in;
  in.paged = !a.k_cache.empty();
  if (!in.paged && (a.k.empty() || a.v.empty()))
    throw Error("give the keys and values: --k and --v (contiguous), or --k-cache, --v-cache, --block-table and --seq-lens (paged)");
  in.q = convert(load_npy(a.q, "q"), dtype);
  if (in.paged) {
    in.pg = load_paged(a, dtype);
  } else {
    in.k = convert(load_npy(a.k, "k"), dtype);
    in.v = convert(load_npy(a.v, "v"), dtype);
  }
  for (auto* t : in.paged ? std::vector<OwnedTensor*>{&in.q} : std::vector<OwnedTensor*>{&in.q, &in.k, &in.v})
    if (t->view.rank != 4)
      throw Error("--" + t->name + " must hold a 4-D array [B, H, L, D], got shape " + t->view.shape_str());
  return in;
}

// --check: after the outputs are written, a max abs error against the float64 reference above the
// dtype's tolerance fails the run.
void fail_above_check_tolerance(double max_err, DType dtype) {
  const double tol = dtype == DType::F32 ? 1e-4 : dtype == DType::F16 ? 5e-3 : 3e-2;
  if (max_err > tol)
    throw Error("--check failed: max abs error " + std::to_string(max_err) + " against the float64 reference "
                "exceeds " + std::to_string(tol) + " for " + dtype_name(dtype) + " (outputs were written)");
}

// What every run's --report holds about the call (the fields issue #2 spelled out, and later ones).
nlohmann::json report_json(const AttentionReport& rep, int64_t head_dim, int64_t head_dim_v) {
  nlohmann::json j;
  j["backend"] = rep.backend;
  if (!rep.target.empty()) j["target"] = rep.target;
  j["path"] = rep.path;
  j["paged"] = rep.paged;
  j["tuning"] = rep.tuning;
  j["partition_size"] = rep.partition_size;
  j["num_partitions"] = rep.num_partitions;
  j["merge_ms"] = rep.merge_ms;
  j["compile_ms"] = rep.compile_ms;
  j["load_ms"] = rep.load_ms;
  j["lookup_us"] = rep.lookup_us;
  j["cache"] = rep.cache;
  j["kernel_ms"] = rep.kernel_ms;
  j["dtype"] = rep.dtype;
  j["symbol"] = rep.symbol;
  j["key"] = rep.key;
  j["kernels"] = nlohmann::json::array();
  for (const KernelUse& k : rep.kernels)
    j["kernels"].push_back({{"role", k.role}, {"symbol", k.symbol}, {"key", k.key}, {"cache", k.cache},
                            {"compile_ms", k.compile_ms}, {"load_ms", k.load_ms}});
  j["knobs"] = {{"BLOCK_M", rep.block_m}, {"BLOCK_N", rep.block_n}, {"GQA_GROUP", rep.gqa_group}, {"PACK_GQA", rep.pack_gqa}, {"AMX", rep.engine == "amx"},
                {"ENGINE", rep.engine}, {"HEAD_DIM", head_dim}, {"HEAD_DIM_V", head_dim_v}};
  return j;
}

void print_kernels(const AttentionReport& rep) {
  for (const KernelUse& k : rep.kernels)
    std::printf("  %s kernel %s: cache %s%s\n", k.role.c_str(), k.symbol.c_str(), k.cache.c_str(),
                k.cache == "miss" ? (", compile " + fmt_ms(k.compile_ms)).c_str() : "");
}

// The scale, threads and --kernel-option knobs of a run.
AttentionOptions attention_options(const RunArgs& a) {
  AttentionOptions opt;
  opt.enable_gqa = a.enable_gqa;
  opt.num_threads = a.threads;
  if (!a.scale.empty()) {
    try {
      opt.scale = std::stod(a.scale);
    } catch (const std::logic_error&) {
      throw Error("--scale '" + a.scale + "' is not a number");
    }
  }
  for (const auto& ko : a.kernel_options) {
    auto [name, value] = split_assignment(ko, "--kernel-option");
    if (name == "BLOCK_M") opt.block_m = int(parse_positive("--kernel-option BLOCK_M", value));
    else if (name == "BLOCK_N") opt.block_n = int(parse_positive("--kernel-option BLOCK_N", value));
    else if (name == "USE_AMX") {
      if (value != "0" && value != "1") throw Error("--kernel-option USE_AMX must be 0 or 1, got '" + value + "'");
      opt.use_amx = value == "1" ? 1 : 0;
    } else if (name == "USE_DPBF16") {
      if (value != "0" && value != "1") throw Error("--kernel-option USE_DPBF16 must be 0 or 1, got '" + value + "'");
      opt.use_dpbf16 = value == "1" ? 1 : 0;
    } else if (name == "USE_WGMMA") {
      if (value != "0" && value != "1" && value != "2")
        throw Error("--kernel-option USE_WGMMA must be 0 (mma.sync), 1 (wgmma) or 2 (wgmma, pipelined), got '" + value +
                    "'");
      opt.use_wgmma = value[0] - '0';
    } else if (name == "PARTITION_SIZE") {
      opt.partition_size = parse_positive("--kernel-option PARTITION_SIZE", value);
    } else if (name == "FORCE_USE_FLEX_ATTENTION") {
      if (value != "0" && value != "1")
        throw Error("--kernel-option FORCE_USE_FLEX_ATTENTION must be 0 or 1, got '" + value + "'");
      opt.force_prefill = value == "1";
    } else {
      throw Error("unknown --kernel-option " + name +
                  "; known: BLOCK_M, BLOCK_N, USE_AMX, USE_DPBF16, PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION, "
                  "USE_WGMMA (CUDA)");
    }
  }

  return opt;
}

// `flexjit run --varlen`: FlashAttention-2's flash_attn_varlen_func on packed .npy inputs.
void run_varlen(const RunArgs& a) {
  if (a.cu_seqlens_q.empty() || a.cu_seqlens_k.empty())
    throw Error("--varlen needs --cu-seqlens-q and --cu-seqlens-k (int32 [batch + 1] .npy files)");
  if (a.k.empty() || a.v.empty() || !a.k_cache.empty())
    throw Error("--varlen takes packed --k [total_k, Hkv, D] and --v [total_k, Hkv, Dv] (no paged cache)");
  if (!a.block_size.empty())
    throw Error("--block-size does not apply to --varlen: its tiles visit only the blocks of each sequence's band");
  const DType dtype = parse_dtype(a.dtype);
  OwnedTensor q = convert(load_npy(a.q, "q"), dtype), k = convert(load_npy(a.k, "k"), dtype),
              v = convert(load_npy(a.v, "v"), dtype);
  for (auto* t : {&q, &k, &v})
    if (t->view.rank != 3)
      throw Error("--" + t->name + " must hold a 3-D array [total, H, D] with --varlen, got shape " + t->view.shape_str());
  OwnedTensor cu_q = load_int32(a.cu_seqlens_q, "cu-seqlens-q", 1), cu_k = load_int32(a.cu_seqlens_k, "cu-seqlens-k", 1);
  // max_seqlen from the tables (the runtime checks the tables themselves).
  auto longest = [](OwnedTensor& cu) {
    int64_t m = 0;
    for (int64_t i = 1; i < cu.view.numel(); ++i) m = std::max<int64_t>(m, cu.data<int32_t>()[i] - cu.data<int32_t>()[i - 1]);
    return m;
  };
  const int64_t max_q = longest(cu_q), max_k = longest(cu_k), batch = std::max<int64_t>(1, cu_q.view.numel() - 1);
  const int64_t total_q = q.view.sizes[0], Hq = q.view.sizes[1], Hkv = k.view.sizes[1], Dv = v.view.sizes[2];
  // Registered mods' example buffers span the longest sequence (mods see in-sequence positions).
  ResolvedMods rm = resolve_mods(a.mods, ShapeInfo{batch, Hq, Hkv, std::max<int64_t>(1, max_q), std::max<int64_t>(1, max_k)});
  AttentionOptions opt = attention_options(a);
  if (opt.partition_size || opt.force_prefill)
    throw Error("--kernel-option PARTITION_SIZE and FORCE_USE_FLEX_ATTENTION do not apply to --varlen");
  VarlenOptions vo;
  vo.scale = opt.scale;
  vo.causal = a.causal;
  vo.window_left = a.window_left;
  vo.window_right = a.window_right;
  vo.softcap = a.softcap;
  OwnedTensor slopes;
  if (!a.alibi_slopes.empty()) {
    slopes = convert(load_npy(a.alibi_slopes, "alibi-slopes"), DType::F32);
    vo.alibi_slopes = &slopes.view;
  }
  OwnedTensor out = OwnedTensor::make("out", dtype, {total_q, Hq, Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {Hq, total_q});
  const bool want_lse = !a.lse_out.empty() || a.check;
  AttentionReport rep;
  varlen_attention(q.view, k.view, v.view, cu_q.view, cu_k.view, max_q, max_k, out.view, want_lse ? &lse.view : nullptr,
                   rm.mods, rm.bind, vo, opt, &rep);
  OutputFiles files;  // all outputs land together or not at all
  files.add_npy_f32("--out", a.out, to_f32(out.view), {total_q, Hq, Dv});
  if (!a.lse_out.empty()) files.add_npy_f32("--lse-out", a.lse_out, to_f32(lse.view), {Hq, total_q});
  double max_err = -1;
  if (a.check) {  // every row against the float64 reference of FA2's semantics
    const std::vector<int32_t> cq(cu_q.data<int32_t>(), cu_q.data<int32_t>() + cu_q.view.numel()),
        ck(cu_k.data<int32_t>(), cu_k.data<int32_t>() + cu_k.view.numel());
    RefResult ref = reference_varlen_attention(q.view, k.view, v.view, cq, ck, rm.mods, rm.bind, vo);
    const std::vector<double> got = to_doubles(out.view);
    max_err = 0;
    for (size_t i = 0; i < got.size(); ++i) max_err = std::max(max_err, std::fabs(got[i] - ref.out[i]));
  }
  std::string opts = a.causal ? "causal" : "";
  if (a.window_left >= 0 || a.window_right >= 0)
    opts += (opts.empty() ? "" : ", ") + std::string("window (") + std::to_string(a.window_left) + ", " +
            std::to_string(a.window_right) + ")";
  if (a.softcap > 0) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "softcap %g", a.softcap);
    opts += (opts.empty() ? "" : ", ") + std::string(buf);
  }
  if (!a.alibi_slopes.empty()) opts += (opts.empty() ? "" : ", ") + std::string("alibi ") + slopes.view.shape_str();
  std::printf("flexjit run --varlen: %s%s%s, q %s k %s v %s (%lld sequences, up to %lld queries / %lld keys) %s -> %s\n",
              rm.describe.c_str(), opts.empty() ? "" : "; ", opts.c_str(), q.view.shape_str().c_str(),
              k.view.shape_str().c_str(), v.view.shape_str().c_str(), (long long)(cu_q.view.numel() - 1),
              (long long)max_q, (long long)max_k, rep.dtype.c_str(), a.out.c_str());
  print_kernels(rep);
  std::printf("  compile %.1f ms (wall), run %.2f ms\n", rep.compile_ms, rep.kernel_ms);
  std::printf("  varlen: BLOCK_M x BLOCK_N = %dx%d (%s), engine %s\n", rep.block_m, rep.block_n, rep.tuning.c_str(),
              rep.engine.c_str());
  if (a.check) std::printf("  check vs float64 reference (every row): max abs error %.3g\n", max_err);
  if (!a.report.empty()) {
    nlohmann::json j = report_json(rep, q.view.sizes[2], Dv);
    j["shape"] = {{"batch", cu_q.view.numel() - 1}, {"Hq", Hq}, {"Hkv", Hkv}, {"total_q", total_q},
                  {"total_k", k.view.sizes[0]}, {"max_seqlen_q", max_q}, {"max_seqlen_k", max_k}};
    j["varlen"] = {{"causal", a.causal}, {"window_left", a.window_left}, {"window_right", a.window_right},
                   {"softcap", a.softcap}, {"alibi", !a.alibi_slopes.empty()}};
    j["mods"] = rm.describe;
    if (a.check) j["check_max_abs_error"] = max_err;
    files.add_text("--report", a.report, j.dump(2) + "\n");
  }
  files.commit();
  if (a.check) fail_above_check_tolerance(max_err, dtype);
}

// A host BlockMask's index arrays on the device, as the CUDA kernels read them.
FlexBlockMaskArgs device_mask(const runtime::BlockMask& m, CudaAllocations& mem) {
  FlexBlockMaskArgs a = runtime::kernel_args(m);
  auto put = [&](const int* host, size_t n) -> const int* {
    if (!host || n == 0) return host;
    void* d = mem.alloc(n * 4);
    cuda_copy_to_device(d, host, n * 4);
    return static_cast<const int*>(d);
  };
  const size_t rows = size_t(a.B * a.H * a.q_blocks);
  a.kv_num_blocks = put(a.kv_num_blocks, rows);
  a.kv_indices = put(a.kv_indices, rows * size_t(a.kv_indices_stride));
  a.full_kv_num_blocks = put(a.full_kv_num_blocks, rows);
  a.full_kv_indices = put(a.full_kv_indices, rows * size_t(a.full_kv_indices_stride));
  return a;
}

// `flexjit run --device cuda`: the same call on the GPU (runtime/cuda_prefill, runtime/cuda_decode):
// inputs copied to the device, a BlockMask built on the host and copied, the first call compiles
// (or finds) the kernel, a second one is timed. Prefill for Lq > 16, decode otherwise and for
// paged caches (FORCE_USE_FLEX_ATTENTION=1: prefill).
void run_cuda(const RunArgs& a) {
  const std::string status = cuda_driver_status();
  if (!status.empty())
    throw Error("--device cuda: " + status + ". CUDA kernels can still be compiled here for a GPU elsewhere: "
                "flexjit cache warm --device cuda --arch sm_90");
  if (a.varlen) throw Error("--varlen runs on CPU only so far; drop --device cuda");
  const DType dtype = parse_dtype(a.dtype);
  CallInputs in = load_call_inputs(a, dtype);
  const bool paged = in.paged;
  OwnedTensor &q = in.q, &k = in.k, &v = in.v;
  PagedInputs& pg = in.pg;
  const ShapeInfo shape = in.shape();
  ResolvedMods rm = resolve_mods(a.mods, shape);
  AttentionOptions opt = attention_options(a);
  if (paged && !a.block_size.empty())
    throw Error("--block-size applies to contiguous KV; a paged call builds its mask at absolute positions itself");
  const int64_t B = q.view.sizes[0], Hq = q.view.sizes[1], Lq = q.view.sizes[2], D = q.view.sizes[3];
  const int64_t Dv = paged ? pg.v_cache.view.sizes[3] : v.view.sizes[3];
  const bool decode = paged || (Lq <= 16 && !opt.force_prefill);
  if (paged && opt.force_prefill) throw Error("FORCE_USE_FLEX_ATTENTION=1: a paged cache has no prefill kernel");
  if (!decode && dtype == DType::F32)
    throw Error("--device cuda: the CUDA prefill kernel computes in bf16 or fp16 (fp32 accumulation); pass --dtype "
                "bf16 or --dtype fp16 (fp32 runs on CUDA for decoding, Lq <= 16)");

  cuda_use_primary_context();
  const CudaDeviceProps props = cuda_current_device_props();
  const CudaDeviceInfo dev = cuda_device_info(props);
  CudaAllocations mem;  // freed on every exit path
  ModBindings dev_bind = rm.bind;
  for (auto& [name, view] : dev_bind.buffers) {
    OwnedTensor c = OwnedTensor::make(name, view.dtype, std::vector<int64_t>(view.sizes, view.sizes + view.rank));
    for (int64_t i = 0; i < view.numel(); ++i) {  // logical element i of a possibly strided view
      int64_t off = 0, rest = i;
      for (int d = view.rank - 1; d >= 0; --d) off += (rest % view.sizes[d]) * view.strides[d], rest /= view.sizes[d];
      write_element_f64(c.view, i, read_element_f64(view, off));
    }
    view = mem.upload(c.view);
  }
  // The mask on the host (decode: one q-block holding the rows), then its arrays on the device.
  runtime::BlockMask mask;
  FlexBlockMaskArgs dmask{};
  const bool have_mask = rm.mods.has_mask_mod();
  if (have_mask) {
    int64_t qbs = 128, kvbs = 128;
    if (!a.block_size.empty()) parse_block_size(a.block_size, &qbs, &kvbs);
    if (paged) {
      std::vector<int64_t> lens;
      for (int64_t b = 0; b < B; ++b) lens.push_back(pg.seq_lens.data<int32_t>()[b]);
      mask = runtime::create_paged_block_mask(rm.mods, rm.bind, B, Hq, Lq, lens, kvbs);
    } else {
      mask = runtime::create_block_mask(rm.mods, rm.bind, B, Hq, Lq, shape.Lkv, decode ? std::max<int64_t>(qbs, Lq) : qbs,
                                        kvbs);
    }
    dmask = device_mask(mask, mem);
  }
  TensorView dq = mem.upload(q.view);
  TensorView dk = mem.upload(paged ? pg.k_cache.view : k.view), dv = mem.upload(paged ? pg.v_cache.view : v.view);
  OwnedTensor out = OwnedTensor::make("out", dtype, {B, Hq, Lq, Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {B, Hq, Lq});
  TensorView dout = mem.upload(out.view), dlse = mem.upload(lse.view);
  int* dflag = static_cast<int*>(mem.alloc(4));
  const int zero = 0;
  cuda_copy_to_device(dflag, &zero, 4);

  std::string describe, tuning;
  int64_t partition_size = 0, num_partitions = 0;
  CudaRunInfo info;
  double kernel_ms = 0;
  auto timed = [&](const std::function<void()>& call) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    cuda_synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  if (decode) {
    CudaDecodeKv kv;
    kv.k = &dk;
    kv.v = &dv;
    TensorView dtable, dseq;
    if (paged) {
      dtable = mem.upload(pg.block_table.view);
      dseq = mem.upload(pg.seq_lens.view);
      kv.block_table = &dtable;
      kv.seq_lens = &dseq;
      kv.max_seq_len = pg.max_len;
    }
    CudaDecodePlan plan = plan_cuda_decode(dq, kv, dout, &dlse, rm.mods, dev_bind, have_mask ? &dmask : nullptr, opt,
                                           dev, dflag);
    set_cuda_decode_workspace(plan, plan.workspace_bytes ? mem.alloc(plan.workspace_bytes) : nullptr);
    timed([&] { info = run_cuda_decode(plan, rm.mods, nullptr); });
    kernel_ms = timed([&] { run_cuda_decode(plan, rm.mods, nullptr); });
    describe = plan.describe();
    tuning = plan.split;
    partition_size = plan.partition_size;
    num_partitions = plan.num_partitions;
  } else {
    CudaPrefillPlan plan = plan_cuda_prefill(dq, dk, dv, dout, &dlse, rm.mods, dev_bind, have_mask ? &dmask : nullptr,
                                             opt, dev, dflag);
    timed([&] { info = run_cuda_prefill(plan, rm.mods, nullptr); });
    kernel_ms = timed([&] { run_cuda_prefill(plan, rm.mods, nullptr); });
    describe = plan.describe();
    tuning = plan.knobs;
  }
  int flag = 0;
  cuda_copy_to_host(&flag, dflag, 4);
  cuda_copy_to_host(out.view.data, dout.data, size_t(out.view.numel()) * dtype_size(dtype));
  cuda_copy_to_host(lse.view.data, dlse.data, size_t(lse.view.numel()) * 4);
  if (flag & 1) throw Error("--device cuda: a mod indexed a buffer out of range (outputs not written)");
  if (flag & 2) throw Error("--device cuda: a block-table entry or sequence length is out of range (outputs not written)");

  OutputFiles files;
  files.add_npy_f32("--out", a.out, to_f32(out.view), {B, Hq, Lq, Dv});
  if (!a.lse_out.empty()) files.add_npy_f32("--lse-out", a.lse_out, to_f32(lse.view), {B, Hq, Lq});
  double max_err = -1;
  if (a.check) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < Lq; i += std::max<int64_t>(1, Lq / 64)) rows.push_back(i);
    if (rows.back() != Lq - 1) rows.push_back(Lq - 1);
    const double scale = opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D));
    RefResult ref = paged ? reference_paged_attention(q.view, pg.k_cache.view, pg.v_cache.view, pg.block_table.view,
                                                      pg.seq_lens.view, rm.mods, rm.bind, scale, false, rows)
                          : reference_attention(q.view, k.view, v.view, rm.mods, rm.bind, scale, false, rows);
    max_err = max_abs_error(out.view, ref, rows);
  }
  std::printf("flexjit run: %s, q %s on cuda (%s, %s, %d SMs) %s -> %s\n", rm.describe.c_str(),
              q.view.shape_str().c_str(), props.name.c_str(), props.arch.c_str(), props.sm_count, dtype_name(dtype),
              a.out.c_str());
  std::printf("  backend cuda: %s\n  kernel %s: cache %s%s, run %.3f ms\n", describe.c_str(), info.symbol.c_str(),
              info.cache.c_str(), info.cache == "miss" ? (", compile " + fmt_ms(info.compile_ms)).c_str() : "",
              kernel_ms);
  if (a.check) std::printf("  check vs float64 reference (sampled rows): max abs error %.3g\n", max_err);
  if (!a.report.empty()) {
    nlohmann::json j;
    j["backend"] = "cuda";
    j["arch"] = props.arch;
    j["device"] = props.name;
    j["sm_count"] = props.sm_count;
    j["tuning"] = tuning;  // decode: where PARTITION_SIZE came from; prefill: engine and blocks
    if (decode) j["partition_size"] = partition_size, j["num_partitions"] = num_partitions;
    j["path"] = decode ? "decode" : "prefill";
    j["paged"] = paged;
    j["plan"] = describe;
    j["symbol"] = info.symbol;
    j["cache"] = info.cache;
    j["compile_ms"] = info.compile_ms;
    j["kernel_ms"] = kernel_ms;
    j["dtype"] = dtype_name(dtype);
    j["shape"] = {{"B", B}, {"Hq", Hq}, {"Lq", Lq}, {"D", D}, {"Dv", Dv}, {"Lkv", shape.Lkv}};
    j["mods"] = rm.describe;
    if (a.check) j["check_max_abs_error"] = max_err;
    files.add_text("--report", a.report, j.dump(2) + "\n");
  }
  files.commit();
  if (a.check) fail_above_check_tolerance(max_err, dtype);
}

void run(const RunArgs& a) {
  if (a.device == "cuda") return run_cuda(a);
  if (a.device != "cpu")
    throw Error("--device " + a.device + " is unknown; use cpu or cuda");
  if (a.varlen) return run_varlen(a);
  if (!a.cu_seqlens_q.empty() || !a.cu_seqlens_k.empty() || a.causal || a.window_left != -1 ||
      a.window_right != -1 || a.softcap != 0 || !a.alibi_slopes.empty())
    throw Error("--cu-seqlens-q/-k, --causal, --window-left/-right, --softcap and --alibi-slopes are FlashAttention "
                "varlen options: add --varlen (for padded [B, H, L, D] inputs use --mask-mod causal, "
                "--score-mod softcap / alibi)");
  DType dtype = parse_dtype(a.dtype);
  CallInputs in = load_call_inputs(a, dtype);
  const bool paged = in.paged;
  OwnedTensor &q = in.q, &k = in.k, &v = in.v;
  PagedInputs& pg = in.pg;
  const ShapeInfo shape = in.shape();
  ResolvedMods rm = resolve_mods(a.mods, shape);

  AttentionOptions opt = attention_options(a);
  runtime::BlockMask mask;
  runtime::BlockMaskBuildStats mstats;
  bool have_mask = false;
  if (paged && !a.block_size.empty())
    throw Error("--block-size applies to contiguous KV; a paged call builds its mask at absolute positions itself");
  if (rm.mods.has_mask_mod() && !paged) {
    int64_t qbs = 128, kvbs = 128;
    if (!a.block_size.empty()) parse_block_size(a.block_size, &qbs, &kvbs);
    mask = runtime::create_block_mask(rm.mods, rm.bind, shape.B, shape.Hq, shape.Lq, shape.Lkv, qbs, kvbs, &mstats);
    have_mask = true;
  }

  const int64_t B = q.view.sizes[0], Hq = q.view.sizes[1], Lq = q.view.sizes[2],
                Dv = paged ? pg.v_cache.view.sizes[3] : v.view.sizes[3];
  OwnedTensor out = OwnedTensor::make("out", dtype, {B, Hq, Lq, Dv});
  OwnedTensor lse = OwnedTensor::make("lse", DType::F32, {B, Hq, Lq});
  AttentionReport rep;
  TensorView* lse_view = a.lse_out.empty() && !a.check ? nullptr : &lse.view;
  if (paged)
    paged_flex_attention(q.view, pg.k_cache.view, pg.v_cache.view, pg.block_table.view, pg.seq_lens.view, out.view,
                         lse_view, rm.mods, rm.bind, opt, &rep);
  else
    flex_attention(q.view, k.view, v.view, out.view, lse_view, rm.mods, rm.bind, have_mask ? &mask : nullptr, opt,
                   &rep);
  const int64_t Hkv = paged ? pg.k_cache.view.sizes[2] : k.view.sizes[1];
  const int64_t Lkv = paged ? pg.max_len : k.view.sizes[2];
  OutputFiles files;  // all outputs land together or not at all
  files.add_npy_f32("--out", a.out, to_f32(out.view), {B, Hq, Lq, Dv});
  if (!a.lse_out.empty()) files.add_npy_f32("--lse-out", a.lse_out, to_f32(lse.view), {B, Hq, Lq});

  double max_err = -1;
  if (a.check) {  // spot-check up to 64 rows per head against the float64 reference
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < Lq; i += std::max<int64_t>(1, Lq / 64)) rows.push_back(i);
    if (rows.back() != Lq - 1) rows.push_back(Lq - 1);
    double scale = opt.scale ? *opt.scale : 1.0 / std::sqrt(double(q.view.sizes[3]));
    RefResult ref = paged ? reference_paged_attention(q.view, pg.k_cache.view, pg.v_cache.view, pg.block_table.view,
                                                      pg.seq_lens.view, rm.mods, rm.bind, scale, false, rows)
                          : reference_attention(q.view, k.view, v.view, rm.mods, rm.bind, scale, false, rows);
    max_err = max_abs_error(out.view, ref, rows);
  }

  if (paged)
    std::printf("flexjit run: %s, q %s k_cache %s v_cache %s (paged, %lld sequences up to %lld keys) %s -> %s\n",
                rm.describe.c_str(), q.view.shape_str().c_str(), pg.k_cache.view.shape_str().c_str(),
                pg.v_cache.view.shape_str().c_str(), (long long)B, (long long)Lkv, rep.dtype.c_str(), a.out.c_str());
  else
    std::printf("flexjit run: %s, q %s k %s v %s %s -> %s\n", rm.describe.c_str(), q.view.shape_str().c_str(),
                k.view.shape_str().c_str(), v.view.shape_str().c_str(), rep.dtype.c_str(), a.out.c_str());
  print_kernels(rep);
  std::printf("  compile %.1f ms (wall), run %.2f ms%s\n", rep.compile_ms, rep.kernel_ms,
              have_mask ? (", " + mask.describe()).c_str() : "");
  if (rep.path == "decode")
    std::printf("  decode: PARTITION_SIZE=%lld (%lld partitions%s), BLOCK_N=%d, %d query rows per item (%s)\n",
                (long long)rep.partition_size, (long long)rep.num_partitions,
                rep.num_partitions > 1 ? (", merged in " + fmt_ms(rep.merge_ms)).c_str() : "", rep.block_n,
                rep.block_m, rep.tuning.c_str());
  else
    std::printf("  prefill: BLOCK_M x BLOCK_N = %dx%d (%s)\n", rep.block_m, rep.block_n, rep.tuning.c_str());
  if (a.check) std::printf("  check vs float64 reference (sampled rows): max abs error %.3g\n", max_err);

  if (!a.report.empty()) {
    nlohmann::json j = report_json(rep, q.view.sizes[3], Dv);
    if (rep.path == "decode") j["knobs"]["PARTITION_SIZE"] = rep.partition_size;
    j["shape"] = {{"B", B}, {"Hq", Hq}, {"Hkv", Hkv}, {"Lq", Lq}, {"Lkv", Lkv}};
    if (paged)
      j["shape"]["page_size"] = pg.k_cache.view.sizes[1], j["shape"]["num_pages"] = pg.k_cache.view.sizes[0];
    j["mods"] = rm.describe;
    if (have_mask || (paged && !rep.block_mask.empty())) j["block_mask_describe"] = rep.block_mask;
    if (have_mask) {
      j["block_mask"] = {{"q_block_size", mask.q_block_size}, {"kv_block_size", mask.kv_block_size},
                         {"partial_blocks", mask.partial_blocks()}, {"full_blocks", mask.full_blocks()},
                         {"density", mask.density()}, {"bytes", mask.bytes()}, {"build_ms", mstats.ms},
                         {"decided_by_interval", mstats.decided_by_interval}, {"evaluated", mstats.evaluated}};
    }
    if (a.check) j["check_max_abs_error"] = max_err;
    files.add_text("--report", a.report, j.dump(2) + "\n");
  }
  files.commit();
  if (a.check) fail_above_check_tolerance(max_err, dtype);
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto a = std::make_shared<RunArgs>();
  auto* cmd = app.add_subcommand("run", "Run one flex_attention call on .npy inputs");
  cmd->add_option("--q", a->q, "queries [B, Hq, Lq, D] (.npy, float32/float16/float64)")->required();
  cmd->add_option("--k", a->k, "keys [Bkv, Hkv, Lkv, D] (or a paged cache: --k-cache ...)");
  cmd->add_option("--v", a->v, "values [Bkv, Hkv, Lkv, Dv]");
  cmd->add_option("--k-cache", a->k_cache, "paged keys [num_pages, page_size, Hkv, D] (with --v-cache, --block-table, "
                                           "--seq-lens; queries at positions seq_len - Lq ..)");
  cmd->add_option("--v-cache", a->v_cache, "paged values [num_pages, page_size, Hkv, Dv]");
  cmd->add_option("--block-table", a->block_table, "int32 [B, max_pages]: page of each sequence's key block");
  cmd->add_option("--seq-lens", a->seq_lens, "int32 [B]: keys of each sequence, its Lq new tokens included");
  cmd->add_option("--out", a->out, "output .npy (float32 [B, Hq, Lq, Dv])")->required();
  cmd->add_option("--lse-out", a->lse_out, "log-sum-exp output .npy (float32 [B, Hq, Lq], natural log)");
  cmd->add_option("--score-mod", a->mods.score_mod, "a registered score_mod name or an expression over "
                                                    "score, b, h, q_idx, kv_idx, buffers and params");
  cmd->add_option("--mask-mod", a->mods.mask_mod, "a registered mask_mod name or a bool expression");
  cmd->add_option("--buffer", a->mods.buffer_specs, "NAME=FILE.npy: a tensor the mods read (repeatable)");
  cmd->add_option("--param", a->mods.param_specs, "NAME=VALUE: a runtime scalar (repeatable; no recompile)");
  cmd->add_option("--scale", a->scale, "score scale (default 1/sqrt(D))");
  cmd->add_flag("--enable-gqa", a->enable_gqa, "allow Hq to be a multiple of Hkv");
  cmd->add_option("--dtype", a->dtype, "compute dtype: fp32 | bf16 | fp16");
  cmd->add_option("--device", a->device, "cpu (default) or cuda (bf16 / fp16 on the GPU; without one, a clear error)");
  cmd->add_option("--block-size", a->block_size, "BlockMask block size: N or QxKV (default 128)");
  cmd->add_option("--kernel-option", a->kernel_options, "NAME=VALUE kernel knob: BLOCK_M, BLOCK_N, USE_AMX (0/1), "
                                                          "USE_DPBF16 (0/1), PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION (0/1), "
                                                          "USE_WGMMA (0/1/2, --device cuda on sm_90)");
  cmd->add_option("--report", a->report, "write a JSON report of what ran");
  cmd->add_option("--threads", a->threads, "worker threads (default: all cores)");
  cmd->add_flag("--check", a->check, "spot-check the result against a float64 reference");
  cmd->add_flag("--varlen", a->varlen, "FlashAttention-2 varlen: packed --q [total_q, Hq, D], --k/--v [total_k, Hkv, "
                                       "D/Dv] split by --cu-seqlens-q/-k; --out [total_q, Hq, Dv], --lse-out [Hq, total_q]");
  cmd->add_option("--cu-seqlens-q", a->cu_seqlens_q, "varlen: int32 [batch + 1] query offsets of the sequences");
  cmd->add_option("--cu-seqlens-k", a->cu_seqlens_k, "varlen: int32 [batch + 1] key offsets of the sequences");
  cmd->add_flag("--causal", a->causal, "varlen: causal, aligned bottom-right");
  cmd->add_option("--window-left", a->window_left, "varlen: keys a query sees before its diagonal (-1: unlimited)");
  cmd->add_option("--window-right", a->window_right, "varlen: keys a query sees after its diagonal (-1: unlimited)");
  cmd->add_option("--alibi-slopes", a->alibi_slopes, "varlen: ALiBi slopes .npy, [Hq] or [batch, Hq]");
  cmd->add_option("--softcap", a->softcap, "varlen: cap scaled scores at softcap * tanh(s / softcap) (0: off)");
  cmd->callback([a] { run(*a); });
}

}  // namespace flexjit::cli

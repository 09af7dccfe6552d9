#include "runtime/torch/cuda_attention.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "runtime/cuda_decode.h"
#ifndef FLEXJIT_TORCH_CUDA_ONLY
#include "runtime/block_mask.h"
#endif
#include "runtime/cuda_driver.h"
#include "runtime/cuda_prefill.h"
#include "runtime/torch/op_common.h"
#include "score_mods/registry.h"

namespace flexjit {

DType dtype_of(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    case at::kDouble: return DType::F64;
    case at::kInt: return DType::I32;
    case at::kLong: return DType::I64;
    case at::kBool: return DType::Bool;
    default: break;
  }
  throw Error(name + " has dtype " + std::string(c10::toString(t.scalar_type())) +
              "; flexjit takes float32, bfloat16, float16 (q/k/v) and float/int32/int64 buffers");
}

namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The checks that need no data: one CUDA device, torch with CUDA, a usable driver.
void check_devices(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}})
    if (!t->defined()) throw Error(std::string("flex_attention: ") + name + " is an undefined tensor");
  if (k.device() != q.device() || v.device() != q.device())
    throw Error("flex_attention: q, k and v must be on one device; got q on " + q.device().str() + ", k on " +
                k.device().str() + ", v on " + v.device().str() + ". Move them with .to(q.device)");
  if (!q.is_cuda())
    throw Error("flex_attention: the CUDA kernel got q, k and v on " + q.device().str() +
                " (another tensor argument on CUDA selected it); put q, k, v, the mods' buffers and the block "
                "mask on one device");
  if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA))
    throw Error("flex_attention: q is on " + q.device().str() +
                " but this process's torch has no CUDA support loaded (libtorch_cuda)");
  const std::string why = cuda_driver_status();
  if (!why.empty())
    throw Error("flex_attention: q is on " + q.device().str() + " but flexjit cannot use the CUDA driver: " + why);
}

// What the planner needs of a device, asked once per device (its context must be current).
CudaDeviceInfo device_info(int index) {
  static std::mutex mu;
  static std::map<int, CudaDeviceInfo> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(index);
  if (it != known.end()) return it->second;
  const CudaDeviceInfo d = cuda_device_info(cuda_current_device_props());
  known.emplace(index, d);
  return d;
}

// q / k / v as the kernel reads them (runtime/cuda_prefill.cpp, check_rows): last dim contiguous,
// rows 16-byte aligned. A tensor that is not gets a contiguous copy (fresh allocations are
// aligned); clone, not contiguous(), because a contiguous view at an odd offset stays misaligned.
at::Tensor kernel_layout(const at::Tensor& t) {
  if (t.dim() != 4) return t;  // the planner names the rank problem
  bool ok = (t.size(3) <= 1 || t.stride(3) == 1) && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  const int64_t per16 = 16 / static_cast<int64_t>(t.element_size());  // elements per 16 bytes
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % per16 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The CUDA kernels' options: the shared parse, with the CPU matmul engines refused.
AttentionOptions cuda_options(const FlexOptions& o) {
  AttentionOptions opt = kernel_options_of(o);
  if (opt.use_amx == 1 || opt.use_dpbf16 == 1)
    throw Error(std::string("flex_attention: kernel option ") + (opt.use_amx == 1 ? "USE_AMX" : "USE_DPBF16") +
                "=1 asks for a CPU matmul engine, but q is on CUDA (tensor cores, mma.sync); drop the option");
  return opt;
}

FlexBlockMaskArgs mask_args(const TorchBlockMaskTensors& t) {
  FlexBlockMaskArgs a{};
  a.kv_num_blocks = t.kv_num_blocks.data_ptr<int32_t>();
  a.kv_indices = t.kv_indices.data_ptr<int32_t>();
  if (t.full_kv_num_blocks.defined()) {
    a.full_kv_num_blocks = t.full_kv_num_blocks.data_ptr<int32_t>();
    a.full_kv_indices = t.full_kv_indices.data_ptr<int32_t>();
  }
  a.B = t.kv_num_blocks.size(0);
  a.H = t.kv_num_blocks.size(1);
  a.q_blocks = t.kv_num_blocks.size(2);
  a.kv_blocks = t.kv_indices.size(3);
  a.q_block_size = t.q_block_size;
  a.kv_block_size = t.kv_block_size;
  // PyTorch's layout: every index row is KVB wide (contiguous, so the row stride is KVB).
  a.kv_indices_stride = t.kv_indices.size(3);
  a.full_kv_indices_stride = t.full_kv_indices.defined() ? t.full_kv_indices.size(3) : 0;
  return a;
}

// The kernel trusts the lists: a bad count or index would read out of bounds, a block listed
// twice would enter the softmax twice. Host tensors only (int32, contiguous).
void check_mask_rows(const TorchBlockMaskTensors& t) {
  const int64_t B = t.kv_num_blocks.size(0), H = t.kv_num_blocks.size(1), QB = t.kv_num_blocks.size(2),
                KVB = t.kv_indices.size(3), rows = B * H * QB;
  const bool full = t.full_kv_num_blocks.defined();
  auto where = [&](int64_t r) {
    return "row (b=" + std::to_string(r / (H * QB)) + ", h=" + std::to_string(r / QB % H) +
           ", q_block=" + std::to_string(r % QB) + ")";
  };
  std::vector<int64_t> seen(KVB, -1);
  for (int64_t r = 0; r < rows; ++r)
    for (int pass = 0; pass < (full ? 2 : 1); ++pass) {
      const int32_t n = (pass ? t.full_kv_num_blocks : t.kv_num_blocks).data_ptr<int32_t>()[r];
      const int32_t* row = (pass ? t.full_kv_indices : t.kv_indices).data_ptr<int32_t>() + r * KVB;
      const char* name = pass ? "full_kv_indices" : "kv_indices";
      if (n < 0 || n > KVB)
        throw Error(std::string("block_mask: ") + (pass ? "full_kv_num_blocks " : "kv_num_blocks ") + where(r) +
                    " is " + std::to_string(n) + "; it must be in 0.." + std::to_string(KVB));
      for (int32_t j = 0; j < n; ++j) {
        if (row[j] < 0 || row[j] >= KVB)
          throw Error(std::string("block_mask: ") + name + " " + where(r) + " lists block " +
                      std::to_string(row[j]) + "; indices must be in 0.." + std::to_string(KVB - 1));
        if (seen[row[j]] == r)
          throw Error("block_mask: " + where(r) + " lists KV block " + std::to_string(row[j]) +
                      " twice (across kv_indices and full_kv_indices); each block may appear once per row");
        seen[row[j]] = r;
      }
    }
}

// What a report needs of either plan.
struct CudaPlanSummary {
  jit::KernelSpec spec;
  std::string path, split;
  int64_t partition_size = 0, num_partitions = 1;
  bool pack_gqa = false;
};
CudaPlanSummary summary_of(const CudaPrefillPlan& p) {
  CudaPlanSummary s;
  s.spec = p.spec;
  s.path = "prefill";
  s.split = p.knobs;  // "default", "user" or "tuned" (the report's tuning)
  return s;
}
CudaPlanSummary summary_of(const CudaDecodePlan& p) {
  CudaPlanSummary s;
  s.spec = p.spec;
  s.path = "decode";
  s.split = p.split;
  s.partition_size = p.partition_size;
  s.num_partitions = p.num_partitions;
  s.pack_gqa = p.pack_gqa;
  return s;
}

void fill_report(AttentionReport* out, const CudaPlanSummary& plan, const CudaRunInfo& info, const CudaDeviceInfo& dev,
                 double host_us, bool user_knobs) {
  AttentionReport& rep = *out;
  rep = AttentionReport{};
  rep.backend = "cuda";
  rep.target = dev.arch;
  rep.path = plan.path;
  rep.tuning = user_knobs || plan.split == "user" ? "user" : plan.split == "tuned" ? "tuned" : "default";
  rep.partition_size = plan.partition_size;
  rep.num_partitions = plan.num_partitions;
  rep.pack_gqa = plan.pack_gqa;
  rep.cache = info.cache;
  rep.compile_ms = info.compile_ms;
  // Host time of the call (planning, kernel lookup and load, the launches); the kernels run
  // asynchronously, so kernel_ms stays 0: time them with CUDA events.
  rep.lookup_us = host_us - info.compile_ms * 1000.0;
  rep.block_m = plan.spec.block_m;
  rep.block_n = plan.spec.block_n;
  rep.gqa_group = plan.spec.gqa_group;
  rep.engine = cuda_prefill_engine_name(plan.spec);  // mma / wgmma / wgmma2 (decode: mma)
  rep.dtype = dtype_name(plan.spec.dtype);
  rep.symbol = info.symbol;
  KernelUse use;
  use.role = "attention";
  use.cache = info.cache;
  use.compile_ms = info.compile_ms;
  use.symbol = info.symbol;
  rep.kernels.push_back(use);
}

bool check_requested() {
  static const bool on = [] {
    const char* e = std::getenv("FLEXJIT_CUDA_CHECK");
    return e && std::string(e) == "1";
  }();
  return on;
}

}  // namespace

AttentionOptions kernel_options_of(const FlexOptions& o) {
  AttentionOptions opt;
  opt.scale = o.scale;
  opt.enable_gqa = o.enable_gqa;
  for (const auto& [n, val] : o.kernel_options) {
    if (n == "BLOCK_M") opt.block_m = int(val);
    else if (n == "BLOCK_N") opt.block_n = int(val);
    else if (n == "USE_AMX") {
      if (val != 0 && val != 1) throw Error("kernel option USE_AMX must be 0 or 1, got " + std::to_string(val));
      opt.use_amx = int(val);
    } else if (n == "USE_DPBF16") {
      if (val != 0 && val != 1) throw Error("kernel option USE_DPBF16 must be 0 or 1, got " + std::to_string(val));
      opt.use_dpbf16 = int(val);
    } else if (n == "USE_WGMMA") {
      if (val < 0 || val > 2)
        throw Error("kernel option USE_WGMMA must be 0 (mma.sync), 1 (wgmma) or 2 (wgmma, pipelined), got " +
                    std::to_string(val));
      opt.use_wgmma = int(val);
    } else if (n == "PARTITION_SIZE") {
      if (val < 0)
        throw Error("kernel option PARTITION_SIZE must be >= 0 (keys per decode partition; 0 = tuned), got " +
                    std::to_string(val));
      opt.partition_size = val;
    } else if (n == "FORCE_USE_FLEX_ATTENTION") {
      if (val != 0 && val != 1)
        throw Error("kernel option FORCE_USE_FLEX_ATTENTION must be 0 or 1, got " + std::to_string(val));
      opt.force_prefill = val == 1;
    } else {
      throw Error("unknown kernel option '" + n +
                  "'; known: BLOCK_M, BLOCK_N, USE_AMX, USE_DPBF16, PARTITION_SIZE, FORCE_USE_FLEX_ATTENTION, "
                  "USE_WGMMA (CUDA)");
    }
  }
  return opt;
}

TensorView cuda_view_of(const at::Tensor& t, const std::string& name) {
  if (!t.defined()) throw Error(name + " is an undefined tensor");
  if (!t.is_cuda()) throw Error(name + " is on " + t.device().str() + "; a CUDA view needs a CUDA tensor");
  if (t.dim() > 4) throw Error(name + " has " + std::to_string(t.dim()) + " dims; at most 4 are supported");
  TensorView v;
  v.data = t.data_ptr();
  // Bool tensors (a mod's masks) are passed as int32 by the callers, as on the CPU.
  if (t.scalar_type() == at::kBool)
    throw Error(name + " has dtype Bool; a CUDA view takes float32, bfloat16, float16, int32 or int64 (convert with "
                ".to(torch.int32))");
  v.dtype = dtype_of(t, name);
  v.rank = int(t.dim());
  for (int i = 0; i < v.rank; ++i) {
    v.sizes[i] = t.size(i);
    v.strides[i] = t.stride(i);
  }
  return v;
}

TensorView copy_view_to_device(const TensorView& host, c10::Device device, const std::string& name,
                               std::vector<at::Tensor>* keep) {
  int64_t extent = 1;  // elements from data to one past the last element the view reaches
  for (int i = 0; i < host.rank; ++i) {
    if (host.sizes[i] == 0) extent = 0;
    if (host.strides[i] < 0)
      throw Error(name + " has a negative stride; pass a tensor with non-negative strides");
    if (extent) extent += (host.sizes[i] - 1) * host.strides[i];
  }
  TensorView d = host;
  if (extent == 0) return d;
  const int64_t bytes = extent * dtype_size(host.dtype);
  at::Tensor h = at::from_blob(host.data, {bytes}, at::TensorOptions().dtype(at::kByte));
  at::Tensor dev = h.to(device, at::kByte, /*non_blocking=*/false, /*copy=*/true);  // host memory may go away
  keep->push_back(dev);
  d.data = dev.data_ptr();
  return d;
}

TorchBlockMaskTensors cuda_block_mask(const TorchBlockMaskTensors& in, const at::Tensor& q, int64_t Lkv) {
  const int64_t qbs = in.q_block_size, kvbs = in.kv_block_size, Lq = q.size(2);
  if (qbs < 1 || kvbs < 1)
    throw Error("block_mask: BLOCK_SIZE must be positive, got (" + std::to_string(qbs) + ", " +
                std::to_string(kvbs) + ")");
  const bool full = in.full_kv_num_blocks.defined() || in.full_kv_indices.defined();
  if (full && !(in.full_kv_num_blocks.defined() && in.full_kv_indices.defined()))
    throw Error("block_mask: full_kv_num_blocks and full_kv_indices must be given together (or both left out)");
  TorchBlockMaskTensors t = in;
  std::vector<std::pair<at::Tensor*, const char*>> all{{&t.kv_num_blocks, "kv_num_blocks"},
                                                       {&t.kv_indices, "kv_indices"}};
  if (full) {
    all.push_back({&t.full_kv_num_blocks, "full_kv_num_blocks"});
    all.push_back({&t.full_kv_indices, "full_kv_indices"});
  }
  bool on_host = true;
  for (auto [p, name] : all) {
    if (!p->defined()) throw Error(std::string("block_mask: ") + name + " is missing");
    if (p->scalar_type() != at::kInt && p->scalar_type() != at::kLong)
      throw Error(std::string("block_mask: ") + name + " has dtype " + c10::toString(p->scalar_type()) +
                  "; block indices must be int32 (or int64)");
    const int64_t rank = std::string(name).find("indices") != std::string::npos ? 4 : 3;
    if (p->dim() != rank)
      throw Error(std::string("block_mask: ") + name + " must be " + std::to_string(rank) + "-D " +
                  (rank == 3 ? "[B, H, QB]" : "[B, H, QB, KVB]") + ", got shape " + shape_of(*p));
    if (p->is_cuda() && p->device() != q.device())
      throw Error(std::string("block_mask: ") + name + " is on " + p->device().str() + " but q is on " +
                  q.device().str() + "; move the BlockMask with .to(q.device)");
    if (!p->is_cuda() && !p->device().is_cpu())
      throw Error(std::string("block_mask: ") + name + " is on " + p->device().str() +
                  "; pass it on q's device or the CPU");
    on_host = on_host && p->device().is_cpu();
  }
  const at::Tensor& num = t.kv_num_blocks;
  const at::Tensor& idx = t.kv_indices;
  if (idx.size(0) != num.size(0) || idx.size(1) != num.size(1) || idx.size(2) != num.size(2))
    throw Error("block_mask: kv_indices " + shape_of(idx) + " does not start with kv_num_blocks' shape " +
                shape_of(num));
  if (full && (!t.full_kv_num_blocks.sizes().equals(num.sizes()) || !t.full_kv_indices.sizes().equals(idx.sizes())))
    throw Error("block_mask: full_kv_num_blocks " + shape_of(t.full_kv_num_blocks) + " / full_kv_indices " +
                shape_of(t.full_kv_indices) + " must have the shapes of kv_num_blocks " + shape_of(num) +
                " / kv_indices " + shape_of(idx));
  if (num.size(2) != ceil_div(Lq, qbs) || idx.size(3) != ceil_div(Lkv, kvbs))
    throw Error("block_mask: it has " + std::to_string(num.size(2)) + "x" + std::to_string(idx.size(3)) +
                " blocks of " + std::to_string(qbs) + "x" + std::to_string(kvbs) + " but the call has Lq=" +
                std::to_string(Lq) + ", Lkv=" + std::to_string(Lkv) + ", which needs " +
                std::to_string(ceil_div(Lq, qbs)) + "x" + std::to_string(ceil_div(Lkv, kvbs)) +
                "; create the BlockMask for these lengths (and this BLOCK_SIZE)");
  // A broadcast B or H (expanded, stride 0) becomes a dim of 1: the kernel broadcasts it itself,
  // and nothing [B, H, ...]-sized is materialised.
  for (int d = 0; d < 2; ++d) {
    bool broadcast = true;
    for (auto [p, name] : all) broadcast = broadcast && (p->size(d) == 1 || p->stride(d) == 0);
    if (broadcast)
      for (auto [p, name] : all) *p = p->narrow(d, 0, 1);
  }
  for (auto [p, name] : all) *p = p->to(at::kInt).contiguous();
  if (on_host) {
    check_mask_rows(t);
    for (auto [p, name] : all) *p = p->to(q.device());
  }
  return t;
}

FlexResult cuda_flex_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ModSet& mods,
                               const ModBindings& bind, const TorchBlockMaskTensors* mask, const FlexOptions& o) {
  check_devices(q, k, v);
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
    throw Error("flex_attention: q, k, v must be 4-D [B, H, L, D]; got " + shape_of(q) + ", " + shape_of(k) + ", " +
                shape_of(v));
  const auto t0 = std::chrono::steady_clock::now();
  c10::DeviceGuard guard(q.device());
  const int index = q.device().index();
  // The driver calls below use the current context: make it this device's primary context (the
  // one torch allocates in), on whatever thread this call runs.
  cuda_use_device_context(index);
  const CudaDeviceInfo dev = device_info(index);

  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  FlexResult r;
  r.out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  if (o.return_lse) r.lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // The mods' out-of-range flag, zeroed on the stream for every call. It is read only with
  // FLEXJIT_CUDA_CHECK=1: reading it means waiting for the kernel, which would serialise every
  // call with the host and break CUDA-graph capture.
  at::Tensor error_flag = at::zeros({1}, q.options().dtype(at::kInt));
  const TensorView qv = cuda_view_of(qc, "q"), kv = cuda_view_of(kc, "k"), vv = cuda_view_of(vc, "v"),
                   out = cuda_view_of(r.out, "out");
  TensorView lse;
  if (o.return_lse) lse = cuda_view_of(r.lse, "lse");
  FlexBlockMaskArgs margs{};
  if (mask) margs = mask_args(*mask);

  const AttentionOptions opt = cuda_options(o);
  // torch's current stream of this device (c10::Stream::native_handle: the cudaStream_t), so the
  // kernel is ordered with the caller's other work on it. Tensors this call allocated may be freed
  // when it returns: torch's caching allocator reuses their memory only for work enqueued later on
  // the same stream, which runs after the kernel.
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q.device()).native_handle();
  // A few query rows (Lq <= 16) take the flash-decoding kernel, as on CPU, unless
  // FORCE_USE_FLEX_ATTENTION or a BlockMask whose q-blocks do not hold the rows says otherwise.
  const bool decode = q.size(2) <= 16 && !opt.force_prefill && (!mask || margs.q_block_size >= q.size(2));
  CudaPlanSummary plan;
  CudaRunInfo info;
  if (decode) {
    CudaDecodeKv dkv;
    dkv.k = &kv;
    dkv.v = &vv;
    CudaDecodePlan dp = plan_cuda_decode(qv, dkv, out, o.return_lse ? &lse : nullptr, mods, bind,
                                         mask ? &margs : nullptr, opt, dev, error_flag.data_ptr<int32_t>());
    // The partitions' workspace from torch's caching allocator (capture-safe, freed after the call
    // on this stream's order).
    at::Tensor ws = at::empty({int64_t(dp.workspace_bytes)}, q.options().dtype(at::kByte));
    set_cuda_decode_workspace(dp, dp.workspace_bytes ? ws.data_ptr() : nullptr);
    info = run_cuda_decode(dp, mods, stream);
    plan = summary_of(dp);
  } else {
    CudaPrefillPlan pp = plan_cuda_prefill(qv, kv, vv, out, o.return_lse ? &lse : nullptr, mods, bind,
                                           mask ? &margs : nullptr, opt, dev, error_flag.data_ptr<int32_t>());
    info = run_cuda_prefill(pp, mods, stream);
    plan = summary_of(pp);
  }
  const double host_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();

  if (check_requested()) {
    const int32_t flag = error_flag.item<int32_t>();
    if (flag & 1)
      throw Error("flex_attention: a mod indexed one of its buffers out of range on " + q.device().str() +
                  " (caught by FLEXJIT_CUDA_CHECK=1); check the buffers' shapes against the b, h, q_idx and kv_idx "
                  "the mods index them with");
    if (flag & 2)
      throw Error("flex_attention: the BlockMask on " + q.device().str() + " has a count or block index out of range "
                  "(caught by FLEXJIT_CUDA_CHECK=1; those entries were skipped); rebuild it for this call's lengths");
  }

  if (o.report) {
    AttentionReport& rep = *o.report;
    fill_report(&rep, plan, info, dev, host_us,
                o.kernel_options.count("BLOCK_M") || o.kernel_options.count("BLOCK_N") ||
                    o.kernel_options.count("PARTITION_SIZE"));
    if (mask)
      rep.block_mask = "BlockMask B=" + std::to_string(margs.B) + " H=" + std::to_string(margs.H) +
                       " blocks " + std::to_string(margs.q_blocks) + "x" + std::to_string(margs.kv_blocks) + " of " +
                       std::to_string(margs.q_block_size) + "x" + std::to_string(margs.kv_block_size) + " (on " +
                       q.device().str() + ")";
  }
  return r;
}

FlexResult cuda_paged_flex_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_table, const at::Tensor& seq_lens, const ModSet& mods,
                                     const ModBindings& bind, const FlexOptions& o) {
  check_devices(q, k_cache, v_cache);
  if (q.dim() != 4 || k_cache.dim() != 4 || v_cache.dim() != 4)
    throw Error("paged_flex_attention: q must be 4-D [B, Hq, Lq, D] and k_cache, v_cache 4-D [num_pages, page_size, "
                "Hkv, D]; got " + shape_of(q) + ", " + shape_of(k_cache) + ", " + shape_of(v_cache));
  for (auto [t, name, rank] : {std::tuple{&block_table, "block_table", 2}, {&seq_lens, "seq_lens", 1}}) {
    if (!t->defined() || t->scalar_type() != at::kInt || t->dim() != rank)
      throw Error(std::string("paged_flex_attention: ") + name + " must be an int32 " + std::to_string(rank) +
                  "-D tensor, got " + (t->defined() ? std::string(c10::toString(t->scalar_type())) + " " + shape_of(*t)
                                                    : std::string("nothing")) + "; convert it once (and keep it int32)");
    if (t->is_cuda() && t->device() != q.device())
      throw Error(std::string("paged_flex_attention: ") + name + " is on " + t->device().str() + " but q is on " +
                  q.device().str());
    if (!t->is_cuda() && !t->device().is_cpu())
      throw Error(std::string("paged_flex_attention: ") + name + " is on " + t->device().str() +
                  "; pass it on q's device or the CPU");
  }
  const auto t0 = std::chrono::steady_clock::now();
  c10::DeviceGuard guard(q.device());
  const int index = q.device().index();
  cuda_use_device_context(index);
  const CudaDeviceInfo dev = device_info(index);
  // The grid is sized by the longest sequence. seq_lens on the CPU is read here (cheap) and copied;
  // on the device it is not read (that would synchronise the stream): the block table's capacity
  // (max_pages * page_size) bounds it instead, and partitions past a sequence's end cost an empty CTA.
  int64_t max_len = block_table.size(1) * k_cache.size(1);
  if (seq_lens.device().is_cpu() && seq_lens.numel() > 0) {
    const at::Tensor lens = seq_lens.contiguous();
    const int32_t* p = lens.data_ptr<int32_t>();
    int32_t m = 0;
    for (int64_t i = 0; i < lens.numel(); ++i) {
      if (p[i] < 0 || p[i] > max_len)
        throw Error("paged_flex_attention: seq_lens[" + std::to_string(i) + "] is " + std::to_string(p[i]) +
                    "; it must be in 0.." + std::to_string(max_len) + " (block_table's " +
                    std::to_string(block_table.size(1)) + " pages of " + std::to_string(k_cache.size(1)) + " keys)");
      if (p[i] > 0 && p[i] < q.size(2))
        throw Error("paged_flex_attention: seq_lens[" + std::to_string(i) + "] is " + std::to_string(p[i]) +
                    " but the call has Lq=" + std::to_string(q.size(2)) + " new tokens; a sequence holds at least "
                    "its queries (or 0 for an unused slot)");
      m = std::max(m, p[i]);
    }
    max_len = m;
  }
  const at::Tensor table = block_table.to(q.device()).contiguous(), lens = seq_lens.to(q.device()).contiguous();
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k_cache), vc = kernel_layout(v_cache);
  FlexResult r;
  r.out = at::empty({q.size(0), q.size(1), q.size(2), v_cache.size(3)}, q.options());
  if (o.return_lse) r.lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  at::Tensor error_flag = at::zeros({1}, q.options().dtype(at::kInt));
  const TensorView qv = cuda_view_of(qc, "q"), kv = cuda_view_of(kc, "k_cache"), vv = cuda_view_of(vc, "v_cache"),
                   out = cuda_view_of(r.out, "out"), tv = cuda_view_of(table, "block_table"),
                   sv = cuda_view_of(lens, "seq_lens");
  TensorView lse;
  if (o.return_lse) lse = cuda_view_of(r.lse, "lse");
  AttentionOptions opt = cuda_options(o);
  if (opt.force_prefill)
    throw Error("paged_flex_attention: FORCE_USE_FLEX_ATTENTION=1: a paged cache has no prefill kernel");
  opt.enable_gqa = true;  // a paged cache's KV heads are its own; GQA is implied by Hq / Hkv
  CudaDecodeKv dkv;
  dkv.k = &kv;
  dkv.v = &vv;
  dkv.block_table = &tv;
  dkv.seq_lens = &sv;
  dkv.max_seq_len = max_len;
  // A BlockMask over absolute positions, as the CPU path builds per call, where it can be built
  // here without reading the device: seq_lens on the CPU and mods that read no tensors (a causal or
  // sliding-window mask_mod); its arrays are copied to the device, and key blocks it empties (a
  // window's) are skipped. Otherwise the mask_mod is evaluated on every key block (correct).
  FlexBlockMaskArgs margs{};
  const FlexBlockMaskArgs* mp = nullptr;
#ifndef FLEXJIT_TORCH_CUDA_ONLY  // the builder JIT-compiles on the CPU: the full build only
  runtime::BlockMask host_mask;
  std::vector<at::Tensor> mask_arrays;
  if (mods.has_mask_mod() && mods.buffers.empty() && seq_lens.device().is_cpu()) {
    std::vector<int64_t> host_lens;
    const at::Tensor l = seq_lens.contiguous();
    for (int64_t i = 0; i < l.numel(); ++i) host_lens.push_back(l.data_ptr<int32_t>()[i]);
    host_mask = runtime::create_paged_block_mask(mods, bind, q.size(0), q.size(1), q.size(2), host_lens, 128);
    margs = runtime::kernel_args(host_mask);
    auto put = [&](const int* host, int64_t n) -> const int* {
      if (!host || n == 0) return host;
      at::Tensor d = at::from_blob(const_cast<int*>(host), {n}, at::TensorOptions().dtype(at::kInt)).to(q.device());
      mask_arrays.push_back(d);
      return d.data_ptr<int32_t>();
    };
    const int64_t rows = margs.B * margs.H * margs.q_blocks;
    margs.kv_num_blocks = put(margs.kv_num_blocks, rows);
    margs.kv_indices = put(margs.kv_indices, rows * margs.kv_indices_stride);
    margs.full_kv_num_blocks = put(margs.full_kv_num_blocks, rows);
    margs.full_kv_indices = put(margs.full_kv_indices, rows * margs.full_kv_indices_stride);
    mp = &margs;
  }
#endif
  CudaDecodePlan dp = plan_cuda_decode(qv, dkv, out, o.return_lse ? &lse : nullptr, mods, bind, mp, opt, dev,
                                       error_flag.data_ptr<int32_t>());
  at::Tensor ws = at::empty({int64_t(dp.workspace_bytes)}, q.options().dtype(at::kByte));
  set_cuda_decode_workspace(dp, dp.workspace_bytes ? ws.data_ptr() : nullptr);
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q.device()).native_handle();
  const CudaRunInfo info = run_cuda_decode(dp, mods, stream);
  const double host_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  if (check_requested()) {
    const int32_t flag = error_flag.item<int32_t>();
    if (flag & 1)
      throw Error("paged_flex_attention: a mod indexed one of its buffers out of range on " + q.device().str() +
                  " (caught by FLEXJIT_CUDA_CHECK=1)");
    if (flag & 2)
      throw Error("paged_flex_attention: a block_table entry or seq_lens value is out of range on " +
                  q.device().str() + " (caught by FLEXJIT_CUDA_CHECK=1): pages must be in 0..num_pages-1 and "
                  "0 < seq_lens[b] < Lq is not allowed");
  }
  if (o.report) {
    fill_report(o.report, summary_of(dp), info, dev, host_us,
                o.kernel_options.count("BLOCK_N") || o.kernel_options.count("PARTITION_SIZE"));
    o.report->paged = true;
  }
  return r;
}

// ---- the op's CUDA kernel ----
namespace ops {
namespace {

// The buffers the caller gave, as views on q's device (bool as int32, as on the CPU); the
// tensors they point into go to *keep.
std::map<std::string, TensorView> device_buffers(const ModArgs& a, const at::Tensor& q, std::vector<at::Tensor>* keep) {
  std::map<std::string, TensorView> views;
  for (const auto& [n, t] : a.buffers) {
    if (!t.defined()) throw Error("buffer '" + n + "' is an undefined tensor");
    if (t.device() != q.device())
      throw Error("buffer '" + n + "' is on " + t.device().str() + " but query is on " + q.device().str() +
                  "; a CUDA call reads a mod's tensors on the device: move it with .to(query.device)");
    at::Tensor c = t.scalar_type() == at::kBool ? t.to(at::kInt) : t;
    views.emplace(n, cuda_view_of(c, "buffer '" + n + "'"));
    keep->push_back(c);
  }
  return views;
}

// One mod of a CUDA call from text or a registered name, bound to device views: the buffers the
// caller gave, else (registered mods) the tensors it was registered with or the example buffers
// it makes for the call's shape (ALiBi's slopes), copied to the device.
TracedMod device_mod(const std::string& text, ModKind kind, const ModArgs& a,
                     const std::map<std::string, TensorView>& views, const ShapeInfo& shape, c10::Device device,
                     std::vector<at::Tensor>* keep) {
  if (text.empty()) return {};
  if (!has_mod(text)) {
    std::vector<OwnedTensor> owned;
    for (const auto& [n, v] : views) owned.push_back(OwnedTensor{n, nullptr, v});
    try {
      return parse_mod(text, kind, owned, std::vector<std::pair<std::string, double>>(a.params.begin(), a.params.end()));
    } catch (const ParseError&) {
      // A lone unknown word was most likely meant as a mod name: list the registered ones.
      const bool word = std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isalnum(c) || c == '_'; });
      if (word && !std::isdigit(static_cast<unsigned char>(text[0]))) find_mod(text);
      throw;
    }
  }
  const RegisteredMod& m = find_mod(text);
  if (m.kind != kind)
    throw Error("'" + text + "' is a " + (m.kind == ModKind::Score ? "score_mod" : "mask_mod") + ", not a " +
                (kind == ModKind::Score ? "score_mod" : "mask_mod"));
  TracedMod t = m.mod;
  for (auto& [n, v] : t.bindings.params)
    if (a.params.count(n)) v = a.params.at(n);
  std::vector<OwnedTensor> made;
  ModBindings b;
  b.params = t.bindings.params;
  for (const auto& d : t.buffers) {
    if (auto it = views.find(d.name); it != views.end()) {
      b.buffers.push_back({d.name, it->second});
      continue;
    }
    const TensorView* host = t.bindings.find_buffer(d.name);
    if (!host && m.make_buffers) {
      if (made.empty()) made = m.make_buffers(shape);
      for (const auto& o : made)
        if (o.name == d.name) host = &o.view;
    }
    if (host) b.buffers.push_back({d.name, copy_view_to_device(*host, device, "buffer '" + d.name + "'", keep)});
    // else unbound: plan_cuda_prefill (BoundMods) names the missing buffer
  }
  t.bindings = b;
  return t;
}

// The op's mod arguments bound on query's device: the buffers given (on that device), registered
// mods' own or example buffers (for `shape`) copied there; *keep holds the tensors the views
// point into.
std::pair<ModSet, ModBindings> op_mods(const std::string& score_mod_text, const std::string& mask_mod_text,
                                       const Tensors& buffers, const Names& buffer_names, const Names& param_names,
                                       at::ArrayRef<double> param_values, const at::Tensor& query,
                                       const ShapeInfo& shape, std::vector<at::Tensor>* keep) {
  ModArgs args = collect(buffers, buffer_names, param_names, param_values);
  const std::map<std::string, TensorView> views = device_buffers(args, query, keep);
  const TracedMod sm = device_mod(score_mod_text, ModKind::Score, args, views, shape, query.device(), keep),
                  mm = device_mod(mask_mod_text, ModKind::Mask, args, views, shape, query.device(), keep);
  check_all_used(args, {&sm, &mm});
  return combine(sm.expr ? &sm : nullptr, mm.expr ? &mm : nullptr);
}

// The options both op kernels take (kernel options left at 0 / unset are not passed on).
FlexOptions op_options(std::optional<double> scale, bool enable_gqa, bool return_lse, int64_t BLOCK_M,
                       int64_t BLOCK_N, int64_t PARTITION_SIZE) {
  FlexOptions opt;
  opt.scale = scale;
  opt.enable_gqa = enable_gqa;
  opt.return_lse = return_lse;
  if (BLOCK_M) opt.kernel_options["BLOCK_M"] = BLOCK_M;
  if (BLOCK_N) opt.kernel_options["BLOCK_N"] = BLOCK_N;
  if (PARTITION_SIZE) opt.kernel_options["PARTITION_SIZE"] = PARTITION_SIZE;
  return opt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flex_attention_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::string& score_mod_text,
    const std::string& mask_mod_text, const Tensors& buffers, const Names& buffer_names, const Names& param_names,
    at::ArrayRef<double> param_values, std::optional<double> scale, bool enable_gqa, bool return_lse,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks, const std::optional<at::Tensor>& full_kv_indices,
    int64_t q_block_size, int64_t kv_block_size, int64_t BLOCK_M, int64_t BLOCK_N, int64_t USE_AMX,
    int64_t PARTITION_SIZE, bool FORCE_USE_FLEX_ATTENTION, int64_t USE_DPBF16, int64_t USE_WGMMA) {
  return surface_errors("flexjit.flex_attention", [&] {
    for (auto [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&value, "value"}})
      if (t->dim() != 4)
        throw Error(std::string(name) + " must be 4-D [B, H, L, D], got " + std::to_string(t->dim()) + "-D");
    // The dispatcher picks this kernel when any tensor argument is on CUDA: check q, k, v first.
    check_devices(query, key, value);
    std::vector<at::Tensor> keep;
    const ShapeInfo shape{query.size(0), query.size(1), key.size(1), query.size(2), key.size(2)};
    auto [mods, bind] = op_mods(score_mod_text, mask_mod_text, buffers, buffer_names, param_names, param_values,
                                query, shape, &keep);
    FlexOptions opt = op_options(scale, enable_gqa, return_lse, BLOCK_M, BLOCK_N, PARTITION_SIZE);
    if (USE_AMX >= 0) opt.kernel_options["USE_AMX"] = USE_AMX;
    if (USE_DPBF16 >= 0) opt.kernel_options["USE_DPBF16"] = USE_DPBF16;
    if (USE_WGMMA >= 0) opt.kernel_options["USE_WGMMA"] = USE_WGMMA;
    if (FORCE_USE_FLEX_ATTENTION) opt.kernel_options["FORCE_USE_FLEX_ATTENTION"] = 1;

    // PyTorch's BlockMask tensors when given. A mask_mod without them runs with no block mask: the
    // kernel visits every KV block and evaluates the mask_mod on all of them (correct, but nothing
    // is skipped; the CPU kernel builds a BlockMask for such a call). Build one once with
    // flexjit.create_block_mask(..., device=query.device) and pass it in.
    std::optional<TorchBlockMaskTensors> mask;
    if (kv_num_blocks || kv_indices || full_kv_num_blocks || full_kv_indices) {
      if (!kv_num_blocks || !kv_indices)
        throw Error("a block mask needs kv_num_blocks and kv_indices (full_kv_* are optional)");
      TorchBlockMaskTensors t{*kv_num_blocks,
                              *kv_indices,
                              full_kv_num_blocks.value_or(at::Tensor()),
                              full_kv_indices.value_or(at::Tensor()),
                              q_block_size,
                              kv_block_size};
      mask = cuda_block_mask(t, query, key.size(2));
    }
    FlexResult r = cuda_flex_attention(query, key, value, mods, bind, mask ? &*mask : nullptr, opt);
    at::Tensor lse = r.lse.defined() ? r.lse : at::empty({0}, query.options().dtype(at::kFloat));
    return std::make_tuple(r.out, lse);
  });
}

std::tuple<at::Tensor, at::Tensor> paged_flex_attention_cuda(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const std::string& score_mod_text, const std::string& mask_mod_text,
    const Tensors& buffers, const Names& buffer_names, const Names& param_names, at::ArrayRef<double> param_values,
    std::optional<double> scale, bool enable_gqa, bool return_lse, int64_t BLOCK_M, int64_t BLOCK_N,
    int64_t PARTITION_SIZE, int64_t USE_AMX) {
  return surface_errors("flexjit.paged_flex_attention", [&] {
    if (query.dim() != 4 || k_cache.dim() != 4 || v_cache.dim() != 4)
      throw Error("query must be 4-D [B, Hq, Lq, D] and k_cache, v_cache 4-D [num_pages, page_size, Hkv, D]");
    check_devices(query, k_cache, v_cache);
    std::vector<at::Tensor> keep;
    // Registered mods' example buffers are indexed by absolute positions: sized for what the
    // block table can hold (the longest sequence is not read back from the device).
    const int64_t cap = block_table.dim() == 2 ? std::max<int64_t>(1, block_table.size(1) * k_cache.size(1)) : 1;
    const ShapeInfo shape{query.size(0), query.size(1), k_cache.size(2), cap, cap};
    auto [mods, bind] = op_mods(score_mod_text, mask_mod_text, buffers, buffer_names, param_names, param_values,
                                query, shape, &keep);
    FlexOptions opt = op_options(scale, enable_gqa, return_lse, BLOCK_M, BLOCK_N, PARTITION_SIZE);
    if (USE_AMX >= 0) opt.kernel_options["USE_AMX"] = USE_AMX;  // refused on CUDA with the reason
    FlexResult r = cuda_paged_flex_attention(query, k_cache, v_cache, block_table, seq_lens, mods, bind, opt);
    at::Tensor lse = r.lse.defined() ? r.lse : at::empty({0}, query.options().dtype(at::kFloat));
    return std::make_tuple(r.out, lse);
  });
}

}  // namespace ops
}  // namespace flexjit

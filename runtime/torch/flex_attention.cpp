#include "runtime/torch/flex_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "jit/executor.h"
#include "runtime/backward.h"
#include "runtime/merge.h"
#include "runtime/torch/block_mask_interop.h"
#include "runtime/torch/cuda_attention.h"

namespace flexjit {
namespace {

// A mod's tensors may be on the CPU or a CUDA device (flex_attention runs on either); the CPU
// paths check with require_host_mod, the CUDA branch with device_bindings.
TensorView any_view_of(const at::Tensor& t, const std::string& name) {
  return t.defined() && t.is_cuda() ? cuda_view_of(t, name) : view_of(t, name);
}

// The CPU kernels read a mod's tensors on the host: refuse device tensors with the fix.
void require_host_mod(const ModRef& m, const char* fn) {
  for (const at::Tensor& t : m.keep_alive)
    if (t.defined() && !t.device().is_cpu())
      throw Error(std::string(fn) + ": a tensor of the " + (m.kind == ModKind::Score ? "score_mod" : "mask_mod") +
                  " is on " + t.device().str() + " but this call runs on the CPU; make the mod with CPU tensors " +
                  "(or, for flex_attention, put q, k and v on " + t.device().str() + ")");
}

ModRef make_mod(const std::string& text_or_name, ModKind kind, const std::map<std::string, at::Tensor>& buffers,
                const std::map<std::string, double>& params) {
  ModRef r;
  r.kind = kind;
  std::vector<OwnedTensor> views;
  for (const auto& [n, t] : buffers) {
    at::Tensor c = t.dtype() == at::kBool ? t.to(at::kInt) : t;
    OwnedTensor o;
    o.name = n;
    o.view = any_view_of(c, "buffer '" + n + "'");
    views.push_back(o);
    r.keep_alive.push_back(c);
  }
  std::vector<std::pair<std::string, double>> plist(params.begin(), params.end());
  if (has_mod(text_or_name)) {
    const RegisteredMod& m = find_mod(text_or_name);
    if (m.kind != kind)
      throw Error("'" + text_or_name + "' is a " + (m.kind == ModKind::Score ? "score_mod" : "mask_mod") +
                  ", not a " + (kind == ModKind::Score ? "score_mod" : "mask_mod"));
    r.registered_name = text_or_name;
    r.traced = m.mod;
    for (auto& [n, v] : r.traced.bindings.params)
      if (params.count(n)) v = params.at(n);
    // Keep what the mod was registered with (a traced mod's captured tensors); tensors given
    // here replace those of the same name.
    for (const auto& o : views) {
      bool replaced = false;
      for (auto& [n, v] : r.traced.bindings.buffers)
        if (n == o.name) v = o.view, replaced = true;
      if (!replaced) r.traced.bindings.buffers.push_back({o.name, o.view});
    }
    return r;
  }
  r.traced = parse_mod(text_or_name, kind, views, plist);
  return r;
}

// Binds a registered mod's missing buffers with examples made for this call's shape.
void complete_bindings(const ModRef& m, const ShapeInfo& shape, TracedMod* t, std::vector<OwnedTensor>* storage) {
  *t = m.traced;
  if (m.registered_name.empty()) return;
  const RegisteredMod& reg = find_mod(m.registered_name);
  if (!reg.make_buffers) return;
  for (const auto& d : t->buffers) {
    bool bound = false;
    for (const auto& [n, v] : t->bindings.buffers) bound |= n == d.name;
    if (bound) continue;
    for (auto& o : reg.make_buffers(shape))
      if (o.name == d.name) {
        storage->push_back(o);
        t->bindings.buffers.push_back({o.name, o.view});
      }
  }
}

// A call's score_mod and mask_mod as one ModSet with bindings, registered mods' missing buffers
// made for `shape` (kept alive in `storage`). `fn` names the call in the error for a mod passed
// in the other's place.
struct CallMods {
  std::vector<OwnedTensor> storage;
  ModSet mods;
  ModBindings bind;
};
CallMods call_mods(const char* fn, const ModRef& score_mod, const ModRef& mask_mod, const ShapeInfo& shape) {
  if (!score_mod.empty() && score_mod.kind != ModKind::Score)
    throw Error(std::string(fn) + ": score_mod is a mask_mod; pass it as mask_mod");
  if (!mask_mod.empty() && mask_mod.kind != ModKind::Mask)
    throw Error(std::string(fn) + ": mask_mod is a score_mod; pass it as score_mod");
  require_host_mod(score_mod, fn);
  require_host_mod(mask_mod, fn);
  CallMods c;
  TracedMod sm, mm;
  if (!score_mod.empty()) complete_bindings(score_mod, shape, &sm, &c.storage);
  if (!mask_mod.empty()) complete_bindings(mask_mod, shape, &mm, &c.storage);
  std::tie(c.mods, c.bind) = combine(score_mod.empty() ? nullptr : &sm, mask_mod.empty() ? nullptr : &mm);
  return c;
}

// Python code makes int64 index tensors by default; the kernels read int32 tables as they are
// (no per-call conversion), so say how to convert instead of the runtime's bare dtype error.
// `advice` qualifies "convert it" (e.g. " once").
void require_int32_tables(const char* fn, std::initializer_list<std::pair<const at::Tensor*, const char*>> tables,
                          const char* advice) {
  for (auto [t, name] : tables)
    if (t->defined() && t->scalar_type() == at::kLong)
      throw Error(std::string(fn) + ": " + name + " has dtype int64; it must be int32: convert it" + advice +
                  " with " + name + ".to(torch.int32) (C++: .to(at::kInt))");
}

// Torch's intra-op pool as the runtime's and the JIT's parallel_for: one item per chunk.
void torch_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, n, 1, body);
}

// Where a call's JIT compiles run their side-by-side parts (jit/executor.h): torch's intra-op
// threads, like the kernel. Right after a torch op those threads are still spinning (libgomp's
// default wait policy), and a compile thread of our own then shares a core with one of them: a
// new mod's first call lost ~10 ms of ~45 ms of compile that way on 2 cores. Without two torch
// threads, or inside a parallel region (where at::parallel_for runs serially), the compile keeps
// threads of its own.
const jit::Executor* compile_executor() {
  static const jit::Executor pool = torch_parallel_for;
  return at::get_num_threads() >= 2 && !at::in_parallel_region() ? &pool : nullptr;
}

// The runtime's options from the torch layer's: threading and the kernel options by name.
AttentionOptions attention_options(const FlexOptions& o) {
  AttentionOptions opt = kernel_options_of(o);
  if (opt.use_wgmma >= 1)
    throw Error("flex_attention: kernel option USE_WGMMA=" + std::to_string(opt.use_wgmma) + " asks for the CUDA wgmma engine (Hopper GPUs), but q is on "
                "the CPU; drop the option or move the tensors to an sm_90 GPU");
  // The kernel runs on torch's intra-op pool (at::parallel_for: torch.set_num_threads applies, and
  // no second pool competes with it), unless the caller asks for a thread count of its own (TBB).
  if (o.num_threads > 0) {
    opt.num_threads = o.num_threads;
  } else {
    opt.num_threads = at::get_num_threads();  // what the planner splits decode work for (and its tuning bucket)
    opt.parallel_for = torch_parallel_for;
  }
  return opt;
}

// A mod's buffers for a CUDA call on `device`: views already on it stay; tensors the caller gave on
// another device are refused (with the fix), except when `copy_host` (a TorchBlockMask's mask_mod,
// whose buffers the CPU builder needed on the host); memory flexjit owns on the host (a
// registered mod's example buffers for the call's shape, a traced registered mod's captures) is
// copied to the device for this call.
void device_bindings(const ModRef& m, TracedMod* t, c10::Device device, bool copy_host,
                     std::vector<at::Tensor>* keep) {
  for (auto& [name, view] : t->bindings.buffers) {
    const at::Tensor* owner = nullptr;  // the caller's tensor this view points into, if any
    for (const at::Tensor& k : m.keep_alive) {
      if (!k.defined() || k.nbytes() == 0) continue;
      const auto* p = static_cast<const char*>(k.data_ptr());
      const auto* d = static_cast<const char*>(view.data);
      if (d >= p && d < p + k.nbytes()) owner = &k;
    }
    if (owner && owner->device() == device) continue;
    const std::string what = std::string(m.kind == ModKind::Score ? "score_mod" : "mask_mod") + " buffer '" + name + "'";
    if (owner && (owner->is_cuda() || !copy_host))
      throw Error("flex_attention: the " + what + " is on " + owner->device().str() + " but q is on " +
                  device.str() + "; make the mod with the tensor on " + device.str() + " (t.to(q.device()))");
    view = copy_view_to_device(view, device, what, keep);
  }
}

// flex_attention's CUDA branch: the mods bound on q's device, the TorchBlockMask (host arrays,
// built by the CPU builder) copied there, then the CUDA prefill kernel (cuda_attention.h).
FlexResult flex_attention_on_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const ModRef& score_mod, const TorchBlockMask* block_mask, const FlexOptions& o) {
  if (!q.defined() || !k.defined() || !v.defined() || !q.is_cuda() || k.device() != q.device() ||
      v.device() != q.device())
    throw Error("flex_attention: q, k and v must be on one device; got q on " +
                (q.defined() ? q.device().str() : "nothing") + ", k on " + (k.defined() ? k.device().str() : "nothing") +
                ", v on " + (v.defined() ? v.device().str() : "nothing") + ". Move them with .to(q.device())");
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
    throw Error("flex_attention: q, k, v must be 4-D [B, H, L, D]");
  if (!score_mod.empty() && score_mod.kind != ModKind::Score)
    throw Error("flex_attention: score_mod is a mask_mod; pass it in a BlockMask (create_block_mask)");
  ShapeInfo shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2)};
  std::vector<OwnedTensor> storage;
  std::vector<at::Tensor> keep;
  TracedMod sm, mm;
  const bool has_score = !score_mod.empty(), has_mask = block_mask && !block_mask->mask_mod.empty();
  if (has_score) {
    complete_bindings(score_mod, shape, &sm, &storage);
    device_bindings(score_mod, &sm, q.device(), false, &keep);
  }
  if (has_mask) {
    mm = block_mask->mask_mod.traced;
    device_bindings(block_mask->mask_mod, &mm, q.device(), true, &keep);
  }
  auto [mods, bind] = combine(has_score ? &sm : nullptr, has_mask ? &mm : nullptr);
  std::optional<TorchBlockMaskTensors> mask;
  if (block_mask) mask = cuda_block_mask(to_torch_block_mask(block_mask->mask), q, k.size(2));
  return cuda_flex_attention(q, k, v, mods, bind, mask ? &*mask : nullptr, o);
}

// paged_flex_attention's CUDA branch: the mods bound on q's device (registered mods' example
// buffers sized by the block table's capacity: positions are absolute), then the CUDA decode kernel.
FlexResult paged_flex_attention_on_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& block_table, const at::Tensor& seq_lens,
                                        const ModRef& score_mod, const ModRef& mask_mod, const FlexOptions& o) {
  if (q.dim() != 4 || k_cache.dim() != 4 || v_cache.dim() != 4 || block_table.dim() != 2)
    throw Error("paged_flex_attention: q must be 4-D [B, Hq, Lq, D], k_cache / v_cache 4-D [num_pages, page_size, "
                "Hkv, D] and block_table 2-D [B, max_pages]");
  if (!score_mod.empty() && score_mod.kind != ModKind::Score)
    throw Error("paged_flex_attention: score_mod is a mask_mod; pass it as mask_mod");
  if (!mask_mod.empty() && mask_mod.kind != ModKind::Mask)
    throw Error("paged_flex_attention: mask_mod is a score_mod; pass it as score_mod");
  const int64_t cap = std::max<int64_t>(1, block_table.size(1) * k_cache.size(1));
  ShapeInfo shape{q.size(0), q.size(1), k_cache.size(2), cap, cap};
  std::vector<OwnedTensor> storage;
  std::vector<at::Tensor> keep;
  TracedMod sm, mm;
  if (!score_mod.empty()) {
    complete_bindings(score_mod, shape, &sm, &storage);
    device_bindings(score_mod, &sm, q.device(), false, &keep);
  }
  if (!mask_mod.empty()) {
    complete_bindings(mask_mod, shape, &mm, &storage);
    device_bindings(mask_mod, &mm, q.device(), false, &keep);
  }
  auto [mods, bind] = combine(score_mod.empty() ? nullptr : &sm, mask_mod.empty() ? nullptr : &mm);
  return cuda_paged_flex_attention(q, k_cache, v_cache, block_table, seq_lens, mods, bind, o);
}

}  // namespace

TensorView view_of(const at::Tensor& t, const std::string& name) {
  if (!t.defined()) throw Error(name + " is an undefined tensor");
  if (!t.device().is_cpu())
    throw Error(name + " is on " + t.device().str() + "; this flexjit function runs on the CPU (of the attention "
                "calls only flex_attention's and paged_flex_attention's forwards have CUDA kernels): move it with .cpu()");
  if (t.dim() > 4) throw Error(name + " has " + std::to_string(t.dim()) + " dims; at most 4 are supported");
  TensorView v;
  v.data = t.data_ptr();
  v.dtype = dtype_of(t, name);
  v.rank = int(t.dim());
  for (int i = 0; i < v.rank; ++i) {
    v.sizes[i] = t.size(i);
    v.strides[i] = t.stride(i);
  }
  return v;
}

ModRef score_mod(const std::string& s, const std::map<std::string, at::Tensor>& b,
                 const std::map<std::string, double>& p) {
  return make_mod(s, ModKind::Score, b, p);
}

ModRef mask_mod(const std::string& s, const std::map<std::string, at::Tensor>& b,
                const std::map<std::string, double>& p) {
  return make_mod(s, ModKind::Mask, b, p);
}

ModRef from_traced(TracedMod t, ModKind kind, std::vector<at::Tensor> keep_alive) {
  ModRef r;
  r.kind = kind;
  r.traced = std::move(t);
  r.keep_alive = std::move(keep_alive);
  return r;
}

BufferSym capture_tensor(const std::string& name, const at::Tensor& t) {
  return capture(name, any_view_of(t, "captured tensor '" + name + "'"));
}

TorchBlockMask create_block_mask(const ModRef& m, int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t qbs,
                                 int64_t kvbs) {
  if (m.empty() || m.kind != ModKind::Mask) throw Error("create_block_mask needs a mask_mod");
  require_host_mod(m, "create_block_mask (the builder runs on the CPU)");
  std::vector<OwnedTensor> storage;
  TracedMod t;
  complete_bindings(m, ShapeInfo{B, H, H, Lq, Lkv}, &t, &storage);
  auto [mods, bind] = combine(nullptr, &t);
  TorchBlockMask r;
  jit::ScopedExecutor compile_pool(compile_executor());
  r.mask = runtime::create_block_mask(mods, bind, B, H, Lq, Lkv, qbs, kvbs);
  r.mask_mod = m;
  r.mask_mod.traced = t;
  for (auto& o : storage) {  // keep example buffers alive with the mask
    at::Tensor keep = at::empty({int64_t(o.bytes->size())}, at::kByte);
    std::memcpy(keep.data_ptr(), o.bytes->data(), o.bytes->size());
    for (auto& [n, v] : r.mask_mod.traced.bindings.buffers)
      if (n == o.name) v.data = keep.data_ptr();
    r.mask_mod.keep_alive.push_back(keep);
  }
  return r;
}

FlexResult flex_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ModRef& score_mod,
                          const TorchBlockMask* block_mask, const FlexOptions& o) {
  if ((q.defined() && q.is_cuda()) || (k.defined() && k.is_cuda()) || (v.defined() && v.is_cuda()))
    return flex_attention_on_cuda(q, k, v, score_mod, block_mask, o);
  require_host_mod(score_mod, "flex_attention");
  if (block_mask) require_host_mod(block_mask->mask_mod, "flex_attention");
  TensorView qv = view_of(q, "q"), kv = view_of(k, "k"), vv = view_of(v, "v");
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
    throw Error("flex_attention: q, k, v must be 4-D [B, H, L, D]; got " + qv.shape_str() + ", " + kv.shape_str() +
                ", " + vv.shape_str());
  FlexResult r;
  r.out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  if (o.return_lse) r.lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  TensorView out = view_of(r.out, "out"), lse;
  if (o.return_lse) lse = view_of(r.lse, "lse");

  ShapeInfo shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2)};
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  bool has_score = !score_mod.empty(), has_mask = block_mask && !block_mask->mask_mod.empty();
  if (has_score) complete_bindings(score_mod, shape, &sm, &storage);
  if (has_mask) mm = block_mask->mask_mod.traced;
  auto [mods, bind] = combine(has_score ? &sm : nullptr, has_mask ? &mm : nullptr);

  jit::ScopedExecutor compile_pool(compile_executor());
  AttentionOptions opt = attention_options(o);
  flexjit::flex_attention(qv, kv, vv, out, o.return_lse ? &lse : nullptr, mods, bind,
                          block_mask ? &block_mask->mask : nullptr, opt, o.report);
  return r;
}

FlexGrads flex_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  const ModRef& score_mod, const TorchBlockMask* block_mask, const FlexOptions& o,
                                  const std::vector<std::string>& grad_buffers, const at::Tensor& dlse) {
  require_host_mod(score_mod, "flex_attention_backward");
  if (block_mask) require_host_mod(block_mask->mask_mod, "flex_attention_backward");
  TensorView qv = view_of(q, "q"), kv = view_of(k, "k"), vv = view_of(v, "v");
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
    throw Error("flex_attention_backward: q, k, v must be 4-D [B, H, L, D]; got " + qv.shape_str() + ", " +
                kv.shape_str() + ", " + vv.shape_str());
  // dout comes from autograd in out's dtype, but any float dtype is accepted.
  const at::Tensor g = dout.scalar_type() == q.scalar_type() ? dout : dout.to(q.scalar_type());
  TensorView ov = view_of(out, "out"), gv = view_of(g, "dout"), lv = view_of(lse, "lse");
  ShapeInfo shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2)};
  std::vector<OwnedTensor> storage;
  TracedMod sm, mm;
  const bool has_score = !score_mod.empty(), has_mask = block_mask && !block_mask->mask_mod.empty();
  if (has_score) complete_bindings(score_mod, shape, &sm, &storage);
  if (has_mask) mm = block_mask->mask_mod.traced;
  auto [mods, bind] = combine(has_score ? &sm : nullptr, has_mask ? &mm : nullptr);

  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, f32);
  at::Tensor dk = at::empty({k.size(0), k.size(1), k.size(2), k.size(3)}, f32);
  at::Tensor dv = at::empty({v.size(0), v.size(1), v.size(2), v.size(3)}, f32);
  std::vector<BufferGrad> bg;
  std::vector<std::pair<std::string, at::Tensor>> buf_grads;
  for (const std::string& n : grad_buffers) {
    const TensorView* bound = bind.find_buffer(n);
    if (!bound)
      throw Error("flex_attention_backward: a gradient was asked for buffer '" + n + "', which no mod reads");
    at::Tensor t = at::empty(std::vector<int64_t>(bound->sizes, bound->sizes + bound->rank), f32);
    buf_grads.emplace_back(n, t);
    bg.push_back({n, view_of(t, "the gradient of '" + n + "'")});
  }
  const at::Tensor dl = dlse.defined() ? dlse.to(at::kFloat) : dlse;
  TensorView dlv;
  if (dl.defined()) dlv = view_of(dl, "dlse");
  jit::ScopedExecutor compile_pool(compile_executor());
  flexjit::flex_attention_backward(qv, kv, vv, ov, gv, lv, view_of(dq, "dq"), view_of(dk, "dk"), view_of(dv, "dv"),
                                   mods, bind, bg, block_mask ? &block_mask->mask : nullptr, attention_options(o),
                                   o.report, dl.defined() ? &dlv : nullptr);
  FlexGrads r;
  r.dq = dq.to(q.scalar_type());
  r.dk = dk.to(k.scalar_type());
  r.dv = dv.to(v.scalar_type());
  for (auto& [n, t] : buf_grads) {
    DType dt = DType::F32;
    for (const auto& d : mods.buffers)
      if (d.name == n) dt = d.dtype;
    r.buffers[n] = dt == DType::F64 ? t.to(at::kDouble) : dt == DType::BF16 ? t.to(at::kBFloat16)
                   : dt == DType::F16 ? t.to(at::kHalf) : t;
  }
  return r;
}

FlexResult paged_flex_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& seq_lens, const ModRef& score_mod,
                                const ModRef& mask_mod, const FlexOptions& o) {
  if ((q.defined() && q.is_cuda()) || (k_cache.defined() && k_cache.is_cuda()) || (v_cache.defined() && v_cache.is_cuda()))
    return paged_flex_attention_on_cuda(q, k_cache, v_cache, block_table, seq_lens, score_mod, mask_mod, o);
  TensorView qv = view_of(q, "q"), kv = view_of(k_cache, "k_cache"), vv = view_of(v_cache, "v_cache");
  if (q.dim() != 4 || k_cache.dim() != 4 || v_cache.dim() != 4)
    throw Error("paged_flex_attention: q must be 4-D [B, Hq, Lq, D] and k_cache, v_cache 4-D [num_pages, "
                "page_size, Hkv, D]; got " + qv.shape_str() + ", " + kv.shape_str() + ", " + vv.shape_str());
  require_int32_tables("paged_flex_attention", {{&block_table, "block_table"}, {&seq_lens, "seq_lens"}},
                       " once (and keep it int32)");
  TensorView table = view_of(block_table, "block_table"), lens = view_of(seq_lens, "seq_lens");

  FlexResult r;
  r.out = at::empty({q.size(0), q.size(1), q.size(2), v_cache.size(3)}, q.options());
  if (o.return_lse) r.lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  TensorView out = view_of(r.out, "out"), lse;
  if (o.return_lse) lse = view_of(r.lse, "lse");

  // Registered mods index their example buffers by absolute position, up to the longest
  // sequence. Only read seq_lens when its shape is right, and cap it at what the tables can
  // hold: the runtime reports bad tables, and an absurd length must not allocate buffers first.
  int64_t max_len = 1;
  if (seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt && seq_lens.numel() > 0) {
    max_len = std::max<int64_t>(1, seq_lens.max().item<int32_t>());
    if (block_table.dim() == 2) max_len = std::min(max_len, std::max<int64_t>(1, block_table.size(1) * k_cache.size(1)));
  }
  const CallMods cm = call_mods("paged_flex_attention", score_mod, mask_mod,
                                ShapeInfo{q.size(0), q.size(1), k_cache.size(2), max_len, max_len});

  jit::ScopedExecutor compile_pool(compile_executor());
  flexjit::paged_flex_attention(qv, kv, vv, table, lens, out, o.return_lse ? &lse : nullptr, cm.mods, cm.bind,
                                attention_options(o), o.report);
  return r;
}

VarlenResult flash_attn_varlen_func(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
                                    std::optional<double> softmax_scale, bool causal,
                                    std::pair<int64_t, int64_t> window_size, double softcap,
                                    const std::optional<at::Tensor>& alibi_slopes, bool deterministic,
                                    bool return_attn_probs, const ModRef& score_mod, const ModRef& mask_mod,
                                    const FlexOptions& o) {
  (void)deterministic;  // the CPU kernel is deterministic either way
  if (dropout_p != 0.0)
    throw Error("flash_attn_varlen_func: dropout_p must be 0 (flexjit runs inference: no dropout), got " +
                std::to_string(dropout_p));
  TensorView qv = view_of(q, "q"), kv = view_of(k, "k"), vv = view_of(v, "v");
  if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3)
    throw Error("flash_attn_varlen_func: q, k, v must be 3-D [total, H, D] (packed sequences); got " +
                qv.shape_str() + ", " + kv.shape_str() + ", " + vv.shape_str());
  require_int32_tables("flash_attn_varlen_func", {{&cu_seqlens_q, "cu_seqlens_q"}, {&cu_seqlens_k, "cu_seqlens_k"}},
                       "");
  TensorView cq = view_of(cu_seqlens_q, "cu_seqlens_q"), ck = view_of(cu_seqlens_k, "cu_seqlens_k");
  VarlenOptions vo;
  vo.scale = softmax_scale ? softmax_scale : o.scale;
  vo.causal = causal;
  vo.window_left = window_size.first;
  vo.window_right = window_size.second;
  vo.softcap = softcap;
  TensorView slopes;
  if (alibi_slopes && alibi_slopes->defined()) {
    slopes = view_of(*alibi_slopes, "alibi_slopes");
    vo.alibi_slopes = &slopes;
  }
  const bool want_lse = return_attn_probs || o.return_lse;
  VarlenResult r;
  r.out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  if (want_lse) r.softmax_lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  TensorView out = view_of(r.out, "out"), lse;
  if (want_lse) lse = view_of(r.softmax_lse, "softmax_lse");

  // Registered mods' example buffers are indexed by in-sequence positions, up to the longest.
  const CallMods cm = call_mods("flash_attn_varlen_func", score_mod, mask_mod,
                                ShapeInfo{std::max<int64_t>(1, cu_seqlens_q.numel() - 1), q.size(1), k.size(1),
                                          std::max<int64_t>(1, max_seqlen_q), std::max<int64_t>(1, max_seqlen_k)});
  jit::ScopedExecutor compile_pool(compile_executor());
  AttentionOptions opt = attention_options(o);
  if (opt.partition_size || opt.force_prefill)
    throw Error("flash_attn_varlen_func: kernel options PARTITION_SIZE and FORCE_USE_FLEX_ATTENTION are for "
                "flex_attention's decode kernel; varlen takes BLOCK_M, BLOCK_N, USE_AMX, USE_DPBF16");
  flexjit::varlen_attention(qv, kv, vv, cq, ck, max_seqlen_q, max_seqlen_k, out, want_lse ? &lse : nullptr,
                            cm.mods, cm.bind, vo, opt, o.report);
  return r;
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                          const at::Tensor& out_b, const at::Tensor& lse_b) {
  TensorView oa = view_of(out_a, "out_a"), la = view_of(lse_a, "lse_a"), ob = view_of(out_b, "out_b"),
             lb = view_of(lse_b, "lse_b");
  // Allocated from out_a / lse_a's shapes; the runtime checks that everything else matches them.
  at::Tensor out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options().dtype(at::kFloat));
  flexjit::merge_attention_states(oa, la, ob, lb, view_of(out, "out"), view_of(lse, "lse"));
  return {out, lse};
}

}  // namespace flexjit

#include "runtime/torch/flex_attention.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace flexjit {
namespace {

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

ModRef make_mod(const std::string& text_or_name, ModKind kind, const std::map<std::string, at::Tensor>& buffers,
                const std::map<std::string, double>& params) {
  ModRef r;
  r.kind = kind;
  std::vector<OwnedTensor> views;
  for (const auto& [n, t] : buffers) {
    at::Tensor c = t.dtype() == at::kBool ? t.to(at::kInt) : t;
    OwnedTensor o;
    o.name = n;
    o.view = view_of(c, "buffer '" + n + "'");
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

}  // namespace

TensorView view_of(const at::Tensor& t, const std::string& name) {
  if (!t.defined()) throw Error(name + " is an undefined tensor");
  if (!t.device().is_cpu())
    throw Error(name + " is on " + t.device().str() + "; this build of flexjit runs on CPU only: move it with .cpu()");
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
  return capture(name, view_of(t, "captured tensor '" + name + "'"));
}

TorchBlockMask create_block_mask(const ModRef& m, int64_t B, int64_t H, int64_t Lq, int64_t Lkv, int64_t qbs,
                                 int64_t kvbs) {
  if (m.empty() || m.kind != ModKind::Mask) throw Error("create_block_mask needs a mask_mod");
  std::vector<OwnedTensor> storage;
  TracedMod t;
  complete_bindings(m, ShapeInfo{B, H, H, Lq, Lkv}, &t, &storage);
  auto [mods, bind] = combine(nullptr, &t);
  TorchBlockMask r;
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

  AttentionOptions opt;
  opt.scale = o.scale;
  opt.enable_gqa = o.enable_gqa;
  // The kernel runs on torch's intra-op pool (at::parallel_for: torch.set_num_threads applies, and
  // no second pool competes with it), unless the caller asks for a thread count of its own (TBB).
  if (o.num_threads > 0) {
    opt.num_threads = o.num_threads;
  } else {
    opt.parallel_for = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
      at::parallel_for(0, n, 1, body);
    };
  }
  for (const auto& [n, val] : o.kernel_options) {
    if (n == "BLOCK_M") opt.block_m = int(val);
    else if (n == "BLOCK_N") opt.block_n = int(val);
    else if (n == "USE_AMX") {
      if (val != 0 && val != 1) throw Error("kernel option USE_AMX must be 0 or 1, got " + std::to_string(val));
      opt.use_amx = int(val);
    } else throw Error("unknown kernel option '" + n + "'; known: BLOCK_M, BLOCK_N, USE_AMX");
  }
  flexjit::flex_attention(qv, kv, vv, out, o.return_lse ? &lse : nullptr, mods, bind,
                          block_mask ? &block_mask->mask : nullptr, opt, o.report);
  return r;
}

}  // namespace flexjit

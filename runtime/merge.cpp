#include "runtime/merge.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace flexjit {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error("merge_attention_states: " + msg); }

// Checks run on every call: the message (string building, shape printing) is made only on failure.
#define REQUIRE(cond, msg) \
  do {                      \
    if (!(cond)) fail(msg);  \
  } while (0)

uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (x != x) return 0x7fc0;  // a NaN must not round into an infinity's pattern
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Element i of a row of any float dtype, as float.
float load_f32(const TensorView& t, int64_t offset) {
  switch (t.dtype) {
    case DType::F32: return static_cast<const float*>(t.data)[offset];
    case DType::F16: return float(static_cast<const _Float16*>(t.data)[offset]);
    case DType::BF16: {
      uint32_t u = uint32_t(static_cast<const uint16_t*>(t.data)[offset]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    default: return float(read_element_f64(t, offset));
  }
}

}  // namespace

void merge_states_row(int64_t n, const float* outs, int64_t out_stride, const float* lses, int64_t lse_stride,
                      int64_t dv, float* out, float* lse) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, lses[i * lse_stride]);
  if (m == -std::numeric_limits<float>::infinity()) {  // no state kept a key (also: NaN-free)
    for (int64_t d = 0; d < dv; ++d) out[d] = 0.0f;
    *lse = m;
    return;
  }
  // Weights relative to the largest state: e^(lse_i - m) in (0, 1], so nothing overflows; a
  // -inf state gets weight 0 and is skipped, so its (possibly undefined) out is never read.
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(double(lses[i * lse_stride]) - m);
  for (int64_t d = 0; d < dv; ++d) out[d] = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float l = lses[i * lse_stride];
    if (l == -std::numeric_limits<float>::infinity()) continue;
    const float w = float(std::exp(double(l) - m) / total);
    const float* o = outs + i * out_stride;
    for (int64_t d = 0; d < dv; ++d) out[d] += w * o[d];
  }
  *lse = float(double(m) + std::log(total));
}

void store_row_f32(DType dtype, void* dst, int64_t stride, const float* src, int64_t n) {
  switch (dtype) {
    case DType::F32:
      for (int64_t i = 0; i < n; ++i) static_cast<float*>(dst)[i * stride] = src[i];
      return;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) static_cast<_Float16*>(dst)[i * stride] = _Float16(src[i]);
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i * stride] = to_bf16(src[i]);
      return;
    default: break;
  }
  internal_error(__FILE__, __LINE__, std::string("store_row_f32 of a float dtype, got ") + dtype_name(dtype));
}

void merge_attention_states(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                            const TensorView& lse_b, const TensorView& out, const TensorView& lse) {
  REQUIRE(out_a.rank >= 2 && out_a.rank <= 4, "out_a must have 2 to 4 dims [..., L, Dv], got " + out_a.shape_str());
  for (auto [t, name] : {std::pair{&out_b, "out_b"}, {&out, "out"}}) {
    REQUIRE(t->rank == out_a.rank, std::string(name) + " must have out_a's shape " + out_a.shape_str() + ", got " +
                                       t->shape_str());
    for (int i = 0; i < out_a.rank; ++i)
      REQUIRE(t->sizes[i] == out_a.sizes[i], std::string(name) + " must have out_a's shape " + out_a.shape_str() +
                                                 ", got " + t->shape_str());
  }
  REQUIRE(dtype_is_float(out_a.dtype) && out_a.dtype != DType::F64,
          std::string("out_a must be fp32, bf16 or fp16, got ") + dtype_name(out_a.dtype));
  REQUIRE(out_b.dtype == out_a.dtype && out.dtype == out_a.dtype,
          std::string("out_a, out_b and out must share a dtype, got ") + dtype_name(out_a.dtype) + ", " +
              dtype_name(out_b.dtype) + ", " + dtype_name(out.dtype));
  const int lr = out_a.rank - 1;
  for (auto [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}, {&lse, "lse"}}) {
    bool ok = t->rank == lr && t->dtype == DType::F32;
    for (int i = 0; ok && i < lr; ++i) ok = t->sizes[i] == out_a.sizes[i];
    std::string want = "[";
    for (int i = 0; i < lr; ++i) want += (i ? ", " : "") + std::to_string(out_a.sizes[i]);
    REQUIRE(ok, std::string(name) + " must be fp32 " + want + "] (out_a's leading dims), got " +
                    dtype_name(t->dtype) + " " + t->shape_str());
  }
  for (const TensorView* t : {&out_a, &out_b, &out, &lse_a, &lse_b, &lse})
    REQUIRE(t->data != nullptr || t->numel() == 0, "a tensor has no data");

  const int64_t dv = out_a.sizes[lr];
  int64_t rows = 1;
  for (int i = 0; i < lr; ++i) rows *= out_a.sizes[i];
  std::vector<float> states(static_cast<size_t>(2 * dv)), merged(static_cast<size_t>(dv));
  // Row r's offset in a tensor from its own strides over the leading dims.
  auto offset = [&](const TensorView& t, int64_t r) {
    int64_t off = 0;
    for (int i = lr - 1; i >= 0; --i) {
      off += (r % out_a.sizes[i]) * t.strides[i];
      r /= out_a.sizes[i];
    }
    return off;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t oa = offset(out_a, r), ob = offset(out_b, r);
    for (int64_t d = 0; d < dv; ++d) {
      states[size_t(d)] = load_f32(out_a, oa + d * out_a.strides[lr]);
      states[size_t(dv + d)] = load_f32(out_b, ob + d * out_b.strides[lr]);
    }
    const float lses[2] = {static_cast<const float*>(lse_a.data)[offset(lse_a, r)],
                           static_cast<const float*>(lse_b.data)[offset(lse_b, r)]};
    float l = 0;
    merge_states_row(2, states.data(), dv, lses, 1, dv, merged.data(), &l);
    store_row_f32(out.dtype, static_cast<char*>(out.data) + offset(out, r) * dtype_size(out.dtype),
                  out.strides[lr], merged.data(), dv);
    static_cast<float*>(lse.data)[offset(lse, r)] = l;
  }
}

}  // namespace flexjit

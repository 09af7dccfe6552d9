#include "jit/types.h"

#include <cmath>
#include <cstring>
#include <sstream>

namespace flexjit {

const char* engine_name(PrefillEngine e) {
  switch (e) {
    case PrefillEngine::Fma:
      return "fma";
    case PrefillEngine::Amx:
      return "amx";
    case PrefillEngine::Dpbf16:
      return "dpbf16";
    case PrefillEngine::Wgmma:
      return "wgmma";
  }
  return "?";
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "fp32";
    case DType::F16: return "fp16";
    case DType::BF16: return "bf16";
    case DType::F64: return "fp64";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::Bool: return "bool";
  }
  return "?";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::F64: case DType::I64: return 8;
    case DType::Bool: return 1;
  }
  return 0;
}

bool dtype_is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= sizes[i];
  return n;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < rank; ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

TensorView contiguous_view(void* data, DType dtype, std::initializer_list<int64_t> sizes) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.rank = static_cast<int>(sizes.size());
  FLEXJIT_CHECK(v.rank <= 4, "contiguous_view: rank <= 4");
  int i = 0;
  for (int64_t s : sizes) v.sizes[i++] = s;
  int64_t stride = 1;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.sizes[d];
  }
  return v;
}

double read_element_f64(const TensorView& t, int64_t offset) {
  const char* p = static_cast<const char*>(t.data) + offset * dtype_size(t.dtype);
  switch (t.dtype) {
    case DType::F32: { float x; std::memcpy(&x, p, 4); return x; }
    case DType::F64: { double x; std::memcpy(&x, p, 8); return x; }
    case DType::BF16: {
      uint16_t bits; std::memcpy(&bits, p, 2);
      uint32_t w = uint32_t(bits) << 16; float x; std::memcpy(&x, &w, 4); return x;
    }
    case DType::F16: {
      uint16_t h; std::memcpy(&h, p, 2);
      int sign = (h >> 15) & 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
      double v = e == 0 ? std::ldexp(m, -24)
               : e == 31 ? (m ? NAN : INFINITY)
               : std::ldexp(m + 1024, e - 25);
      return sign ? -v : v;
    }
    case DType::I32: { int32_t x; std::memcpy(&x, p, 4); return x; }
    case DType::I64: { int64_t x; std::memcpy(&x, p, 8); return double(x); }
    case DType::Bool: return *p != 0;
  }
  return 0;
}

void write_element_f64(const TensorView& t, int64_t offset, double v) {
  char* p = static_cast<char*>(t.data) + offset * dtype_size(t.dtype);
  float f = float(v);
  switch (t.dtype) {
    case DType::F32: std::memcpy(p, &f, 4); return;
    case DType::F64: std::memcpy(p, &v, 8); return;
    case DType::BF16: {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x400000u;  // keep a NaN a NaN (quiet bit)
      else u += 0x7fffu + ((u >> 16) & 1u);                  // round to nearest even
      uint16_t h = uint16_t(u >> 16);
      std::memcpy(p, &h, 2);
      return;
    }
    case DType::F16: { _Float16 h = static_cast<_Float16>(f); std::memcpy(p, &h, 2); return; }
    case DType::I32: { int32_t x = int32_t(v); std::memcpy(p, &x, 4); return; }
    case DType::I64: { int64_t x = int64_t(v); std::memcpy(p, &x, 8); return; }
    case DType::Bool: *p = v != 0; return;
  }
}

void internal_error(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << "flexjit internal error (" << file << ":" << line << "): invariant violated: " << what
     << ". This is a bug in flexjit; please report it with the call that triggered it.";
  throw std::logic_error(os.str());
}

}  // namespace flexjit

// Plain value types shared by every stage: element dtypes, strided views of user memory, and
// the user-facing error type. No torch, no LLVM, no CUDA here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace flexjit {

enum class DType : uint8_t { F32, F16, BF16, F64, I32, I64, Bool };

const char* dtype_name(DType t);      // "fp32", "fp16", "bf16", "fp64", "int32", "int64", "bool"
int dtype_size(DType t);              // bytes per element
bool dtype_is_float(DType t);

// The CPU prefill kernel's matmul engine, templates/cpu/prefill_<name>.h: AVX-512 FMAs on fp32
// (every dtype), AMX tiles (bf16; fp16 as bf16 hi + lo halves), or AVX512-BF16 vdpbf16ps (bf16,
// hosts without AMX).
// Fma, Amx, Dpbf16: the CPU prefill kernel's; Wgmma: the CUDA prefill kernel's sm_90a engine (its
// default, mma.sync, is spelled Fma in a CUDA KernelSpec).
enum class PrefillEngine : uint8_t { Fma, Amx, Dpbf16, Wgmma };
const char* engine_name(PrefillEngine e);  // "fma", "amx", "dpbf16", "wgmma"

// A strided view of memory owned by someone else (a tensor, an npy buffer).
// Strides are in elements, not bytes. Rank <= 4.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  int rank = 0;
  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};

  int64_t numel() const;
  std::string shape_str() const;  // "[2, 8, 128, 64]"
};

// Reads element `offset` (in elements) of any dtype as a double (int64 exact below 2^53).
double read_element_f64(const TensorView& t, int64_t offset);
// Stores `v` at element `offset`: floats round through fp32 (bf16 to nearest even, NaN kept a
// NaN), ints truncate. The one place host code narrows to a kernel dtype.
void write_element_f64(const TensorView& t, int64_t offset, double v);

// Makes a contiguous (row-major) view.
TensorView contiguous_view(void* data, DType dtype, std::initializer_list<int64_t> sizes);

// A user problem (bad mod, bad shape, compile failure, ...): the message says what was being
// done, what was wrong and how to fix it. Internal invariant failures use FLEXJIT_CHECK.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void internal_error(const char* file, int line, const std::string& what);

}  // namespace flexjit

#define FLEXJIT_CHECK(cond, what)                                          \
  do {                                                                     \
    if (!(cond)) ::flexjit::internal_error(__FILE__, __LINE__, (what));    \
  } while (0)

// The CUDA-only build's op library (cmake/cuda_only.cmake, FLEXJIT_CPU_BACKEND=OFF with torch):
// torch.ops.flexjit.* with the schemas of the full build (op_schema.h) but only flex_attention's and
// paged_flex_attention's CUDA kernels (cuda_attention.cpp) and Meta kernels, so it needs no LLVM, TBB or CPU runtime. The
// other ops are defined without kernels: calling them raises torch's "could not run ... with
// arguments from the ... backend". Not compiled in the full build, whose ops.cpp registers the
// same CUDA kernel beside the CPU ones.
#include <torch/library.h>

#include <string>

#include "jit/cache.h"
#include "runtime/torch/op_common.h"
#include "runtime/torch/op_schema.h"

namespace flexjit {
namespace {

std::string prebuilt_kernel_dir() { return jit::KernelCache::global().prebuilt_dir(); }

}  // namespace
}  // namespace flexjit

TORCH_LIBRARY(flexjit, m) { flexjit::define_flexjit_ops(m); }

TORCH_LIBRARY_IMPL(flexjit, CUDA, m) {
  m.impl("flex_attention", &flexjit::ops::flex_attention_cuda);
  m.impl("paged_flex_attention", &flexjit::ops::paged_flex_attention_cuda);
}

TORCH_LIBRARY_IMPL(flexjit, Meta, m) {
  m.impl("flex_attention", &flexjit::ops::flex_attention_meta);
  m.impl("paged_flex_attention", &flexjit::ops::paged_flex_attention_meta);
}

TORCH_LIBRARY_IMPL(flexjit, CompositeExplicitAutograd, m) {
  m.impl("prebuilt_kernel_dir", &flexjit::prebuilt_kernel_dir);
}

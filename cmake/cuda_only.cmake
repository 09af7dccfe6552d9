# FLEXJIT_CPU_BACKEND=OFF: the LLVM-free CUDA core, for a GPU host that has CUDA, CMake and a
# compiler but no LLVM, TBB, GoogleTest, nlohmann-json or CLI11. It builds the IR and parser,
# the CUDA codegen, template instantiation, the content-hashed cache, NVRTC (dlopen), the CUDA
# driver probe and launch planning, the built-in mods, and `flexjit_cuda_selftest`, which
# compiles CUDA kernels through the whole pipeline (and says whether a GPU is there).
# Included from the top-level CMakeLists.txt after the targets both configurations share (the
# embedded templates, flexjit_ir, flexjit_nvrtc) and before any CPU-backend dependency.
message(STATUS "flexjit: CUDA-only core (FLEXJIT_CPU_BACKEND=OFF): no LLVM, TBB or CLI")

add_library(flexjit_cuda_core STATIC
            jit/codegen.cpp jit/instantiate.cpp jit/cache.cpp jit/sha256.cpp jit/pipeline_cuda.cpp
            runtime/bound_mods.cpp runtime/cuda_driver.cpp runtime/cuda_prefill.cpp runtime/cuda_decode.cpp runtime/reference.cpp
            score_mods/registry.cpp score_mods/builtin.cpp ${FLEXJIT_EMBED_CPP})
target_link_libraries(flexjit_cuda_core PUBLIC flexjit_nvrtc Threads::Threads PRIVATE ${CMAKE_DL_LIBS})
target_compile_definitions(flexjit_cuda_core PRIVATE FLEXJIT_NO_CPU_BACKEND=1
                           FLEXJIT_VERSION="${PROJECT_VERSION}")

add_executable(flexjit_cuda_selftest tools/cuda_selftest.cpp)
target_link_libraries(flexjit_cuda_selftest PRIVATE flexjit_cuda_core)
# The kernels' own GPU benchmark (copy ceiling, decode GB/s, prefill TFLOP/s); skips without a GPU.
add_executable(flexjit_cuda_bench tools/cuda_bench.cpp)
target_link_libraries(flexjit_cuda_bench PRIVATE flexjit_cuda_core)

# ---- optional: the torch op library, CUDA kernel only (FLEXJIT_WITH_TORCH, torch importable) ----
# torch.ops.flexjit.* with the full build's schemas (runtime/torch/op_schema.h) and flex_attention's
# and paged_flex_attention's CUDA and Meta kernels (runtime/torch/cuda_attention.cpp,
# ops_cuda_only.cpp) on top of the core
# above: no LLVM, TBB or CPU runtime. Links torch_cpu and c10 only (torch's CUDA libraries are
# already loaded in any process that has CUDA tensors; the kernels run through the driver API).
if(FLEXJIT_WITH_TORCH)
  execute_process(COMMAND python3 -c "import torch;print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE FLEXJIT_TORCH_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _torch_rc ERROR_QUIET)
  if(_torch_rc EQUAL 0)
    list(APPEND CMAKE_PREFIX_PATH ${FLEXJIT_TORCH_PREFIX})
  endif()
  find_package(Torch QUIET)
  if(Torch_FOUND)
    message(STATUS "flexjit: CUDA-only torch op library (CUDA kernels) against ${Torch_DIR}")
    add_library(flexjit_torch_ops SHARED runtime/torch/ops_cuda_only.cpp runtime/torch/cuda_attention.cpp)
    target_link_libraries(flexjit_torch_ops PRIVATE flexjit_cuda_core torch_cpu c10)
    # No CPU runtime here: cuda_attention.cpp leaves out what needs it (host-built paged masks).
    target_compile_definitions(flexjit_torch_ops PRIVATE FLEXJIT_TORCH_CUDA_ONLY=1)
    target_include_directories(flexjit_torch_ops SYSTEM PRIVATE ${TORCH_INCLUDE_DIRS})
    target_compile_features(flexjit_torch_ops PRIVATE cxx_std_20)  # libtorch 2.9+ headers
    target_link_options(flexjit_torch_ops PRIVATE LINKER:--exclude-libs,ALL LINKER:--no-undefined)
    set_target_properties(flexjit_torch_ops PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
  else()
    message(STATUS "flexjit: torch not found: the CUDA-only build has no torch op library "
                   "(pip install torch, or -DFLEXJIT_WITH_TORCH=OFF to silence this)")
  endif()
endif()

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

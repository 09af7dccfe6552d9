# FLEXJIT_CPU_BACKEND=OFF: the LLVM-free CUDA core, for a GPU host that has CUDA, CMake and a
# compiler but no LLVM, TBB, GoogleTest, nlohmann-json or CLI11. It builds the IR and parser,
# the CUDA codegen, template instantiation, the content-hashed cache, NVRTC (dlopen), the CUDA
# driver probe and launch planning, the built-in mods, and `flexjit_cuda_selftest`, which
# compiles CUDA kernels through the whole pipeline (and says whether a GPU is there).
# Included from the top-level CMakeLists.txt before any CPU-backend dependency is looked for.
find_package(Threads REQUIRED)
message(STATUS "flexjit: CUDA-only core (FLEXJIT_CPU_BACKEND=OFF): no LLVM, TBB or CLI")

file(GLOB FLEXJIT_TEMPLATE_FILES CONFIGURE_DEPENDS
     ${CMAKE_SOURCE_DIR}/templates/*.h ${CMAKE_SOURCE_DIR}/templates/cpu/*.h
     ${CMAKE_SOURCE_DIR}/templates/cuda/*.cuh)
set(FLEXJIT_EMBED_CPP ${CMAKE_BINARY_DIR}/generated/templates_embedded.cpp)
add_custom_command(
  OUTPUT ${FLEXJIT_EMBED_CPP}
  COMMAND ${CMAKE_COMMAND} -DOUT=${FLEXJIT_EMBED_CPP} -DROOT=${CMAKE_SOURCE_DIR}
          -P ${CMAKE_SOURCE_DIR}/cmake/embed_templates.cmake
  DEPENDS ${FLEXJIT_TEMPLATE_FILES} ${CMAKE_SOURCE_DIR}/cmake/embed_templates.cmake
  COMMENT "Embedding kernel templates")

add_library(flexjit_ir STATIC jit/types.cpp jit/ir.cpp jit/mods.cpp jit/trace.cpp jit/parser.cpp
            jit/interval.cpp)
target_include_directories(flexjit_ir PUBLIC ${CMAKE_SOURCE_DIR})

add_library(flexjit_nvrtc STATIC jit/nvrtc.cpp)
target_link_libraries(flexjit_nvrtc PUBLIC flexjit_ir PRIVATE ${CMAKE_DL_LIBS})

add_library(flexjit_cuda_core STATIC
            jit/codegen.cpp jit/instantiate.cpp jit/cache.cpp jit/sha256.cpp jit/pipeline_cuda.cpp
            runtime/bound_mods.cpp runtime/cuda_driver.cpp runtime/cuda_prefill.cpp runtime/reference.cpp
            score_mods/registry.cpp score_mods/builtin.cpp ${FLEXJIT_EMBED_CPP})
target_link_libraries(flexjit_cuda_core PUBLIC flexjit_nvrtc Threads::Threads PRIVATE ${CMAKE_DL_LIBS})
target_compile_definitions(flexjit_cuda_core PRIVATE FLEXJIT_NO_CPU_BACKEND=1
                           FLEXJIT_VERSION="${PROJECT_VERSION}")

add_executable(flexjit_cuda_selftest tools/cuda_selftest.cpp)
target_link_libraries(flexjit_cuda_selftest PRIVATE flexjit_cuda_core)

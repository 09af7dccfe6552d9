// NVRTC's C ABI (nvrtc.h): the entry points flexjit calls, declared here so that no CUDA header is
// needed, and bound from a loaded libnvrtc by name. Two users: jit/nvrtc.cpp, and the emulated CUDA
// device's NVRTC shim (tests/support/emulated_cuda_device.cpp), which forwards to the real library.
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <string>
#include <type_traits>

namespace flexjit::jit::nvrtc_abi {

using Result = int;  // 0 = NVRTC_SUCCESS
using Program = struct NvrtcProgramOpaque*;

struct Functions {
  Result (*version)(int*, int*) = nullptr;
  Result (*num_archs)(int*) = nullptr;
  Result (*archs)(int*) = nullptr;
  Result (*create)(Program*, const char*, const char*, int, const char* const*, const char* const*) = nullptr;
  Result (*compile)(Program, int, const char* const*) = nullptr;
  Result (*log_size)(Program, size_t*) = nullptr;
  Result (*log)(Program, char*) = nullptr;
  Result (*ptx_size)(Program, size_t*) = nullptr;
  Result (*ptx)(Program, char*) = nullptr;
  Result (*cubin_size)(Program, size_t*) = nullptr;
  Result (*cubin)(Program, char*) = nullptr;
  Result (*destroy)(Program*) = nullptr;
  const char* (*error_string)(Result) = nullptr;
};

// Binds every entry point from the dlopen handle h; returns the names it did not find,
// comma-separated ("" when all were found).
inline std::string bind(void* h, Functions* f) {
  std::string missing;
  auto sym = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
    if (!fn) missing += std::string(missing.empty() ? "" : ", ") + name;
  };
  sym(f->version, "nvrtcVersion");
  sym(f->num_archs, "nvrtcGetNumSupportedArchs");
  sym(f->archs, "nvrtcGetSupportedArchs");
  sym(f->create, "nvrtcCreateProgram");
  sym(f->compile, "nvrtcCompileProgram");
  sym(f->log_size, "nvrtcGetProgramLogSize");
  sym(f->log, "nvrtcGetProgramLog");
  sym(f->ptx_size, "nvrtcGetPTXSize");
  sym(f->ptx, "nvrtcGetPTX");
  sym(f->cubin_size, "nvrtcGetCUBINSize");
  sym(f->cubin, "nvrtcGetCUBIN");
  sym(f->destroy, "nvrtcDestroyProgram");
  sym(f->error_string, "nvrtcGetErrorString");
  return missing;
}

}  // namespace flexjit::jit::nvrtc_abi

#include "runtime/cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "jit/types.h"

namespace flexjit {
namespace {

// The driver API's C ABI (cuda.h), declared here: no CUDA header is needed to build flexjit.
using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
using CUdeviceptr = unsigned long long;

struct Driver {
  std::string status;  // "" = usable
  int devices = 0;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*primary_retain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_get_device)(CUdevice*) = nullptr;
  CUresult (*ctx_synchronize)() = nullptr;
  CUresult (*device_attribute)(int*, int, CUdevice) = nullptr;
  CUresult (*device_name)(char*, int, CUdevice) = nullptr;
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*func_set_attribute)(CUfunction, int, int) = nullptr;
  CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                     void**, void**) = nullptr;
  CUresult (*mem_alloc)(CUdeviceptr*, size_t) = nullptr;
  CUresult (*mem_free)(CUdeviceptr) = nullptr;
  CUresult (*memcpy_htod)(CUdeviceptr, const void*, size_t) = nullptr;
  CUresult (*memcpy_dtoh)(void*, CUdeviceptr, size_t) = nullptr;
  CUresult (*memcpy_dtod)(CUdeviceptr, CUdeviceptr, size_t) = nullptr;
  CUresult (*memset_d16)(CUdeviceptr, unsigned short, size_t) = nullptr;
  CUresult (*error_name)(CUresult, const char**) = nullptr;
};

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    // FLEXJIT_CUDA_DRIVER: another library with the driver API's C ABI, e.g. the emulated CUDA
    // device of the tests (build/tests/libflexjit_emulated_cuda.so), which runs kernels on the CPU.
    const char* env = std::getenv("FLEXJIT_CUDA_DRIVER");
    const std::string lib = env && *env ? env : "libcuda.so.1";
    void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      out.status = "no CUDA driver: " + lib + " could not be loaded (" + (e ? e : "?") + ")" +
                   (env && *env ? "; FLEXJIT_CUDA_DRIVER names it" : "; install the NVIDIA driver on a machine with a GPU");
      return out;
    }
    using InitFn = int (*)(unsigned);
    using CountFn = int (*)(int*);
    using NameFn = int (*)(int, const char**);
    auto init = reinterpret_cast<InitFn>(dlsym(h, "cuInit"));
    auto count = reinterpret_cast<CountFn>(dlsym(h, "cuDeviceGetCount"));
    auto err_name = reinterpret_cast<NameFn>(dlsym(h, "cuGetErrorName"));
    if (!init || !count) {
      out.status = "the loaded " + lib + " lacks cuInit / cuDeviceGetCount";
      return out;
    }
    int rc = init(0);
    if (rc != 0) {
      const char* name = nullptr;
      if (err_name) err_name(rc, &name);
      out.status = "cuInit failed: " + std::string(name ? name : "CUDA error") + " (" + std::to_string(rc) + ")";
      if (rc == 34) out.status += ": this libcuda.so.1 is the toolkit's stub, not a driver (no GPU here)";
      if (rc == 100) out.status += ": no CUDA device";
      return out;
    }
    if (count(&out.devices) != 0 || out.devices <= 0) {
      out.devices = 0;
      out.status = "no CUDA device";
      return out;
    }
    bool ok = true;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      if (!fn) {
        ok = false;
        out.status += std::string(out.status.empty() ? "the CUDA driver lacks " : ", ") + name;
      }
    };
    sym(out.device_get, "cuDeviceGet");
    sym(out.primary_retain, "cuDevicePrimaryCtxRetain");
    sym(out.ctx_set_current, "cuCtxSetCurrent");
    sym(out.ctx_get_current, "cuCtxGetCurrent");
    sym(out.ctx_get_device, "cuCtxGetDevice");
    sym(out.ctx_synchronize, "cuCtxSynchronize");
    sym(out.device_attribute, "cuDeviceGetAttribute");
    sym(out.device_name, "cuDeviceGetName");
    sym(out.module_load_data, "cuModuleLoadData");
    sym(out.module_get_function, "cuModuleGetFunction");
    sym(out.func_set_attribute, "cuFuncSetAttribute");
    sym(out.launch, "cuLaunchKernel");
    sym(out.mem_alloc, "cuMemAlloc_v2");
    sym(out.mem_free, "cuMemFree_v2");
    sym(out.memcpy_htod, "cuMemcpyHtoD_v2");
    sym(out.memcpy_dtoh, "cuMemcpyDtoH_v2");
    sym(out.memcpy_dtod, "cuMemcpyDtoD_v2");
    sym(out.memset_d16, "cuMemsetD16_v2");
    out.error_name = err_name;
    if (!ok) out.devices = 0;
    return out;
  }();
  return d;
}

const Driver& need() {
  const Driver& d = driver();
  if (!d.status.empty()) throw Error("flexjit: CUDA is not usable here: " + d.status);
  return d;
}

void check(CUresult rc, const char* what) {
  if (rc == 0) return;
  const char* name = nullptr;
  if (driver().error_name) driver().error_name(rc, &name);
  throw Error(std::string("flexjit: ") + what + " failed: " + (name ? name : "CUDA error") + " (" +
              std::to_string(rc) + ")");
}

}  // namespace

std::string cuda_driver_status() { return driver().status; }
int cuda_device_count() { return driver().devices; }

void cuda_use_primary_context() {
  const Driver& d = need();
  CUcontext current = nullptr;
  check(d.ctx_get_current(&current), "cuCtxGetCurrent");
  if (current) return;
  CUdevice dev = 0;
  check(d.device_get(&dev, 0), "cuDeviceGet");
  CUcontext ctx = nullptr;
  check(d.primary_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check(d.ctx_set_current(ctx), "cuCtxSetCurrent");
}

void cuda_use_device_context(int index) {
  const Driver& d = need();
  if (index < 0 || index >= d.devices)
    throw Error("flexjit: CUDA device " + std::to_string(index) + " does not exist; the driver sees " +
                std::to_string(d.devices) + " device(s)");
  CUdevice dev = 0;
  check(d.device_get(&dev, index), "cuDeviceGet");
  CUcontext current = nullptr;
  check(d.ctx_get_current(&current), "cuCtxGetCurrent");
  if (current) {
    CUdevice current_dev = -1;
    check(d.ctx_get_device(&current_dev), "cuCtxGetDevice");
    if (current_dev == dev) return;  // torch's (or the caller's) context of this device
  }
  // Retained once and never released: the primary context lives as long as the process (torch
  // retains the same one; releasing ours would not destroy it while torch holds it anyway).
  static std::mutex mu;
  static std::map<int, CUcontext> retained;
  CUcontext ctx = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = retained.find(index);
    if (it == retained.end()) {
      check(d.primary_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
      retained.emplace(index, ctx);
    } else {
      ctx = it->second;
    }
  }
  check(d.ctx_set_current(ctx), "cuCtxSetCurrent");
}

CudaDeviceProps cuda_current_device_props() {
  const Driver& d = need();
  CUdevice dev = 0;
  check(d.ctx_get_device(&dev), "cuCtxGetDevice (no current CUDA context?)");
  int major = 0, minor = 0;
  CudaDeviceProps p;
  check(d.device_attribute(&major, 75, dev), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
  check(d.device_attribute(&minor, 76, dev), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
  check(d.device_attribute(&p.max_smem_optin, 97, dev), "cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)");
  check(d.device_attribute(&p.sm_count, 16, dev), "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)");
  p.arch = "sm_" + std::to_string(major) + std::to_string(minor);
  char name[256] = {0};
  check(d.device_name(name, sizeof(name) - 1, dev), "cuDeviceGetName");
  p.name = name;
  return p;
}

void* cuda_load_function(const std::string& key, const std::string& cubin, const std::string& ptx,
                         const std::string& symbol, int smem_bytes) {
  const Driver& d = need();
  static std::mutex mu;
  // One module per (binary, context); a binary may hold several entries (decode: the partition
  // kernel and its merge), each looked up once.
  static std::map<std::pair<std::string, CUcontext>, CUmodule> modules;
  static std::map<std::pair<std::string, CUcontext>, CUfunction> loaded;
  CUcontext ctx = nullptr;
  check(d.ctx_get_current(&ctx), "cuCtxGetCurrent");
  if (!ctx) throw Error("flexjit: no current CUDA context on this thread (torch makes one; else call cuda_use_primary_context)");
  std::lock_guard<std::mutex> lock(mu);
  auto it = loaded.find({key + "/" + symbol, ctx});
  if (it != loaded.end()) return it->second;
  CUmodule mod = nullptr;
  auto mit = modules.find({key, ctx});
  if (mit != modules.end()) {
    mod = mit->second;
  } else {
    CUresult rc = d.module_load_data(&mod, cubin.c_str());
    if (rc != 0) {  // e.g. a GPU newer than the CUBIN's arch: the driver JIT-compiles the PTX
      const std::string ptx0 = ptx;  // NUL-terminated copy
      check(d.module_load_data(&mod, ptx0.c_str()), ("cuModuleLoadData (CUBIN and PTX of " + symbol + ")").c_str());
    }
    modules.emplace(std::make_pair(key, ctx), mod);
  }
  CUfunction fn = nullptr;
  check(d.module_get_function(&fn, mod, symbol.c_str()), ("cuModuleGetFunction(" + symbol + ")").c_str());
  check(d.func_set_attribute(fn, 8 /* MAX_DYNAMIC_SHARED_SIZE_BYTES */, smem_bytes),
        "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
  loaded.emplace(std::make_pair(key + "/" + symbol, ctx), fn);
  return fn;
}

void cuda_launch(void* fn, const unsigned grid[3], unsigned threads, int smem_bytes, void* stream, void* params) {
  const Driver& d = need();
  void* args[] = {params};
  check(d.launch(static_cast<CUfunction>(fn), grid[0], grid[1], grid[2], threads, 1, 1,
                 static_cast<unsigned>(smem_bytes), static_cast<CUstream>(stream), args, nullptr),
        "cuLaunchKernel");
}

void* cuda_alloc(size_t bytes) {
  CUdeviceptr p = 0;
  check(need().mem_alloc(&p, bytes ? bytes : 1), "cuMemAlloc");
  return reinterpret_cast<void*>(p);
}
void cuda_free(void* p) {
  if (p) check(need().mem_free(reinterpret_cast<CUdeviceptr>(p)), "cuMemFree");
}
void cuda_copy_to_device(void* dst, const void* src, size_t bytes) {
  check(need().memcpy_htod(reinterpret_cast<CUdeviceptr>(dst), src, bytes), "cuMemcpyHtoD");
}
void cuda_copy_to_host(void* dst, const void* src, size_t bytes) {
  check(need().memcpy_dtoh(dst, reinterpret_cast<CUdeviceptr>(src), bytes), "cuMemcpyDtoH");
}
CudaAllocations::~CudaAllocations() {
  for (void* p : blocks_) try {
      cuda_free(p);
    } catch (const std::exception&) {
    }
}
void* CudaAllocations::alloc(size_t bytes) {
  blocks_.push_back(cuda_alloc(bytes));
  return blocks_.back();
}
TensorView CudaAllocations::upload(const TensorView& host) {
  TensorView d = host;
  const size_t bytes = size_t(host.numel()) * size_t(dtype_size(host.dtype));
  d.data = alloc(bytes);
  cuda_copy_to_device(d.data, host.data, bytes);
  return d;
}

void cuda_copy_device_to_device(void* dst, const void* src, size_t bytes) {
  check(need().memcpy_dtod(reinterpret_cast<CUdeviceptr>(dst), reinterpret_cast<CUdeviceptr>(src), bytes),
        "cuMemcpyDtoD");
}
void cuda_fill_u16(void* dst, unsigned short value, size_t count) {
  check(need().memset_d16(reinterpret_cast<CUdeviceptr>(dst), value, count), "cuMemsetD16");
}
void cuda_synchronize() { check(need().ctx_synchronize(), "cuCtxSynchronize (an earlier kernel launch may have failed)"); }

}  // namespace flexjit

#include "runtime/cuda_driver.h"

#include <dlfcn.h>

namespace flexjit {
namespace {

struct Driver {
  std::string status;  // "" = usable
  int devices = 0;
};

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      out.status = std::string("no CUDA driver: libcuda.so.1 could not be loaded (") + (e ? e : "?") +
                   "); install the NVIDIA driver on a machine with a GPU";
      return out;
    }
    using InitFn = int (*)(unsigned);
    using CountFn = int (*)(int*);
    using NameFn = int (*)(int, const char**);
    auto init = reinterpret_cast<InitFn>(dlsym(h, "cuInit"));
    auto count = reinterpret_cast<CountFn>(dlsym(h, "cuDeviceGetCount"));
    auto err_name = reinterpret_cast<NameFn>(dlsym(h, "cuGetErrorName"));
    if (!init || !count) {
      out.status = "the loaded libcuda.so.1 lacks cuInit / cuDeviceGetCount";
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
    }
    return out;
  }();
  return d;
}

}  // namespace

std::string cuda_driver_status() { return driver().status; }
int cuda_device_count() { return driver().devices; }

}  // namespace flexjit

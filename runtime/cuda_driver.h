// The CUDA driver (libcuda.so.1), loaded on first use with dlopen: flexjit never links it, so a
// machine without a driver builds and runs every CPU path and answers --device cuda with a clear
// error. No CUDA header is needed: the few entry points are declared with their C ABI.
#pragma once

#include <string>
#include <vector>

#include "jit/types.h"

namespace flexjit {

// "" when a CUDA driver is loaded, initialises and sees at least one device; otherwise what is
// missing, in words ("no CUDA driver: libcuda.so.1 could not be loaded (...)", "cuInit failed:
// CUDA_ERROR_STUB_LIBRARY (34) ...", "no CUDA device"). Never throws; probed once per process.
std::string cuda_driver_status();

// Devices the driver sees (0 when cuda_driver_status() is not "").
int cuda_device_count();

// ---- launching (needs a GPU; every call throws flexjit::Error with cuda_driver_status() or the
// failing driver call's name and error otherwise). Written against the driver API's C ABI; first
// exercised by tools/cuda_selftest on a GPU host. ----

// Makes device 0's primary context current on this thread (what torch does for its own calls);
// for callers without a framework (the CLI, the self-test).
void cuda_use_primary_context();

// Makes device `index`'s primary context current on this thread unless a context of that device
// already is. torch (runtime API) leaves the primary context of its current device current on
// the threads it has used CUDA on; this makes a call on device N safe on any thread (and never
// leaves device 0's context in place for a device-N call). Each primary context is retained once
// per process. Throws flexjit::Error for an index the driver does not have.
void cuda_use_device_context(int index);

struct CudaDeviceProps {
  std::string name;         // "NVIDIA H200"
  std::string arch;         // "sm_90"
  int max_smem_optin = 0;   // bytes a block may opt in to
  int sm_count = 0;
};
// The current context's device.
CudaDeviceProps cuda_current_device_props();

// The kernel `symbol` of a compiled binary, loaded once per (key, context): the CUBIN, or the PTX
// when the driver rejects the CUBIN (a newer GPU). Opts the function in to `smem_bytes` of dynamic
// shared memory. Thread-safe.
void* cuda_load_function(const std::string& key, const std::string& cubin, const std::string& ptx,
                         const std::string& symbol, int smem_bytes);

// Enqueues fn<<<grid, threads, smem, stream>>>(*params): one by-value parameter of params_size
// bytes. stream null = the context's default stream. Asynchronous.
void cuda_launch(void* fn, const unsigned grid[3], unsigned threads, int smem_bytes, void* stream,
                 void* params);

// Plain device memory, for the CLI, the self-test, the bench and the tuner (torch owns memory in
// the torch layer).
void* cuda_alloc(size_t bytes);
void cuda_free(void* p);
void cuda_copy_to_device(void* dst, const void* src, size_t bytes);
void cuda_copy_to_host(void* dst, const void* src, size_t bytes);
void cuda_copy_device_to_device(void* dst, const void* src, size_t bytes);  // on the default stream
void cuda_fill_u16(void* dst, unsigned short value, size_t count);          // count 16-bit elements
void cuda_synchronize();  // the current context; throws the error of an earlier launch

// Device allocations freed together when this goes (errors while freeing are swallowed: it is a
// destructor, often on an error path).
class CudaAllocations {
 public:
  CudaAllocations() = default;
  CudaAllocations(const CudaAllocations&) = delete;
  CudaAllocations& operator=(const CudaAllocations&) = delete;
  ~CudaAllocations();
  void* alloc(size_t bytes);
  // A device copy of a contiguous host view, with its sizes and strides.
  TensorView upload(const TensorView& host);

 private:
  std::vector<void*> blocks_;
};

}  // namespace flexjit

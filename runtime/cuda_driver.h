// The CUDA driver (libcuda.so.1), loaded on first use with dlopen: flexjit never links it, so a
// machine without a driver builds and runs every CPU path and answers --device cuda with a clear
// error. No CUDA header is needed: the few entry points are declared with their C ABI.
#pragma once

#include <string>

namespace flexjit {

// "" when a CUDA driver is loaded, initialises and sees at least one device; otherwise what is
// missing, in words ("no CUDA driver: libcuda.so.1 could not be loaded (...)", "cuInit failed:
// CUDA_ERROR_STUB_LIBRARY (34) ...", "no CUDA device"). Never throws; probed once per process.
std::string cuda_driver_status();

// Devices the driver sees (0 when cuda_driver_status() is not "").
int cuda_device_count();

}  // namespace flexjit

// Shared by the CUDA compile tests: without NVRTC on the machine they skip, saying why.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "jit/nvrtc.h"

#define SKIP_WITHOUT_NVRTC()                                                          \
  do {                                                                                \
    std::string why_;                                                                 \
    if (!::flexjit::jit::nvrtc_available(&why_)) GTEST_SKIP() << "no NVRTC on this machine: " << why_; \
  } while (0)

// For the numerics binaries that ctest also runs at each FLEXJIT_CPU_TARGET (numerics@<target>,
// backward@<target>): a target this host cannot run skips the whole binary visibly, exit 77
// (ctest's SKIP_RETURN_CODE) with the reason, instead of every case failing on the same compile
// error. Include it in one translation unit of the test binary.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "jit/compile.h"

namespace flexjit::testing {

class CpuTargetCheck : public ::testing::Environment {
 public:
  void SetUp() override {
    std::printf("compile target: %s\n", jit::cpu_target_name().c_str());
    if (!jit::cpu_target_error().empty()) {
      std::printf("SKIPPED: %s\n", jit::cpu_target_error().c_str());
      std::fflush(stdout);
      std::_Exit(77);
    }
  }
};
inline ::testing::Environment* const kCpuTargetCheck = ::testing::AddGlobalTestEnvironment(new CpuTargetCheck);

}  // namespace flexjit::testing

// SHA-256 (FIPS 180-4) of a byte string, as 64 lower-case hex digits: the content hash behind
// every cache key and manifest checksum. Self-contained so that the LLVM-free (CUDA-only) build
// hashes exactly like the full one; checked against the standard test vectors.
#pragma once

#include <string>

namespace flexjit::jit {

std::string sha256_hex(const std::string& data);

}  // namespace flexjit::jit

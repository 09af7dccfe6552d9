// Reading and writing NumPy .npy files (format versions 1-3), for the CLI.
// Supported element types: <f4 <f2 <f8 <i4 <i8 |b1 and big-endian forms are rejected; C or
// Fortran order. Bad files give a flexjit::Error naming the file and the problem.
#pragma once

#include <string>
#include <vector>

#include "score_mods/registry.h"

namespace flexjit::cli {

// Loads `path` into a contiguous OwnedTensor named `name` (Fortran-order files are copied to C
// order). Rank 0..4.
OwnedTensor load_npy(const std::string& path, const std::string& name);

// The outputs of one command, written all-or-nothing: each file goes to a temporary name
// first; commit() renames them into place only when every one was written. Destroying an
// uncommitted set removes its temporaries, so a failing command leaves nothing behind.
class OutputFiles {
 public:
  OutputFiles() = default;
  OutputFiles(const OutputFiles&) = delete;
  OutputFiles& operator=(const OutputFiles&) = delete;
  ~OutputFiles();
  // `flag` names the option the path came from, for error messages ("--out").
  void add_npy_f32(const std::string& flag, const std::string& path, const std::vector<float>& data,
                   const std::vector<int64_t>& shape);
  void add_text(const std::string& flag, const std::string& path, const std::string& text);
  void commit();

 private:
  void add_bytes(const std::string& flag, const std::string& path, const std::string& bytes);
  std::vector<std::pair<std::string, std::string>> pending_;  // (temporary, final)
};

// Converts any float view (fp32/fp16/bf16/fp64) to a contiguous tensor of `dtype` (fp32/bf16/fp16).
OwnedTensor convert(const OwnedTensor& t, DType dtype);

}  // namespace flexjit::cli

// Turning command-line mod arguments (a registered name or expression text, --buffer files,
// --param values) into a ModSet with bindings.
#pragma once

#include <string>
#include <vector>

#include "score_mods/registry.h"

namespace flexjit::cli {

struct ModArgs {
  std::string score_mod;                 // "" = none; a registered name or expression text
  std::string mask_mod;                  // "" = none
  std::vector<std::string> buffer_specs; // NAME=FILE.npy
  std::vector<std::string> param_specs;  // NAME=VALUE
};

struct ResolvedMods {
  ModSet mods;
  ModBindings bind;
  std::vector<OwnedTensor> storage;  // keeps buffer data alive
  std::string describe;              // "score_mod=alibi (score + ...), mask_mod=causal (...)"
};

// `shape` sizes the example buffers of built-in mods whose buffers were not given as files.
ResolvedMods resolve_mods(const ModArgs& a, const ShapeInfo& shape);

// A --dtype value (fp32 / bf16 / fp16, or float32 / bfloat16 / float16); throws an Error naming it
// otherwise. Defined in run_cmd.cpp; `cache warm` takes the same values.
DType parse_dtype(const std::string& s);

// Splits "NAME=VALUE"; throws an Error naming `flag` when malformed.
std::pair<std::string, std::string> split_assignment(const std::string& s, const std::string& flag);

}  // namespace flexjit::cli

// CPU compilation: one C++17 translation unit (text) -> an ELF object file, in process, with the
// Clang 19 libraries; and loading object files into one process-wide ORC LLJIT.
//
// No LLVM or Clang header appears here: every version-sensitive call lives in compile.cpp.
#pragma once

#include <string>
#include <vector>

namespace flexjit::jit {

struct CompileResult {
  std::string object;      // ELF relocatable object file bytes
  std::string log;         // Clang's warnings (empty when clean)
  double frontend_ms = 0;  // parse + Sema + IR generation
  double optimize_ms = 0;  // the LLVM O3 module pipeline
  double codegen_ms = 0;   // instruction selection ... object emission
  int parts = 1;           // translation-unit parts compiled side by side (see below)
  bool prefix_pch = false; // the text's prefix came from its precompiled header (see kPrefixEnd)
};

// Compiles one C++17 translation unit given as text (it includes no system headers) for the
// target CPU (the host, or FLEXJIT_CPU_TARGET). `source_name` is used in diagnostics (e.g. the
// dump path). On a compile error throws flexjit::Error whose message contains the Clang diagnostics (with line:col) and `source_name`.
// Thread-safe: concurrent calls compile independently.
//
// Split compilation: a source containing the line `#define FLEXJIT_PARTS N` (N in 2..8) is
// compiled N times side by side, on threads, as if with -DFLEXJIT_PART=1 .. N (each part
// defines its share of the functions, extern "C" where the others call them), and `object` is
// then a GNU ar archive of the N objects (part1.o ...), which load_object accepts like an
// object. The stage times are then the slowest part's. Compiled without FLEXJIT_PART, the same
// text must be one whole kernel.
CompileResult compile_cpp_to_object(const std::string& source, const std::string& source_name);

// Precompiled prefix: a source whose text up to and including the line kPrefixEnd does not depend
// on FLEXJIT_PART or on anything after it (a mods kernel: the ABI, cpu/common.h and the codegen
// helpers, the same for every mod set) has that prefix parsed once per process into an in-memory
// precompiled header (Clang's PrecompiledPreamble) that every later compile of a source with the
// same prefix, and every part of it, starts from: a new mod's compile skips ~7 ms of parsing per
// part. Line numbers in diagnostics stay those of the whole text. FLEXJIT_PCH=0 turns it off; a
// prefix that fails to precompile is compiled in full as before.
inline constexpr char kPrefixEnd[] = "// ---- end of the precompiled prefix ----\n";

// Compile-only cross compilation: the same frontend flags, O3 pipeline and code generation for a
// non-x86 target, e.g. {"aarch64-linux-gnu", "neoverse-v1", {"-msve-vector-bits=256"}}: what a
// fleet's Arm hosts would run. The object (or split archive) is returned, never loaded: this
// process cannot execute it. The CPU's features come from -mcpu as Clang's driver derives them.
// Throws flexjit::Error for an unknown triple or CPU, an x86 triple (use FLEXJIT_CPU_TARGET), or
// a source that does not compile for the target.
struct CrossTarget {
  std::string triple;                    // LLVM triple: "aarch64-linux-gnu"
  std::string cpu;                       // -mcpu: "neoverse-n1" (NEON), "neoverse-v1" (SVE), "generic"
  std::vector<std::string> extra_flags;  // more driver flags, e.g. "-msve-vector-bits=256"
};
CompileResult cross_compile_cpp_to_object(const std::string& source, const std::string& source_name,
                                          const CrossTarget& target);

// Identity of the compiler, flags and target CPU (name + sorted feature list) as one string: part
// of every cache key. Computed once per process.
const std::string& compiler_identity();

// The CPU kernels are compiled for: the host, or the environment's FLEXJIT_CPU_TARGET
// ("<cpu>[,+feature|-feature...]": an LLVM x86 CPU name such as x86-64-v3 or znver4, or "host",
// then features to add or remove; read once per process). It is part of compiler_identity(),
// hence of every cache key. A target this host cannot run (or a spec LLVM does not know) makes
// every compile throw flexjit::Error with cpu_target_error(), never a kernel that would SIGILL.
std::string cpu_target_name();           // "znver4" (the host's name) or the FLEXJIT_CPU_TARGET text
const std::string& cpu_target_error();   // "" when kernels can be compiled and run here

// Whether the compile target has an LLVM target feature ("amx-bf16", "avx512bf16", ...): what
// every kernel is compiled for, so a template may use the feature exactly when this says so.
bool target_has_feature(const std::string& name);
// Whether the host CPU itself has it (what this process can execute).
bool host_has_feature(const std::string& name);

// The Clang driver arguments every compile uses (after argv0 and before the file name), for logs
// and for reproducing a kernel by hand with clang++-19.
const std::vector<std::string>& compile_flags();

// `object` may also be an ar archive (a split compile): all its members go into the one JITDylib.
// A process-wide LLJIT (created once, thread-safe, never destroyed: kernels are plain function
// pointers). Each loaded object goes in its own JITDylib (unique name), with the current process's
// symbols visible so kernels can call expf/tanhf etc. Returns the address of `symbol`; throws
// flexjit::Error if the object is invalid or the symbol is missing (the JITDylib is then removed).
void* load_object(const std::string& object, const std::string& symbol);

}  // namespace flexjit::jit

#include "jit/nvrtc.h"

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <mutex>
#include <regex>
#include <sstream>

#include "jit/nvrtc_abi.h"
#include "jit/types.h"

namespace flexjit::jit {
namespace {

using nvrtcResult = nvrtc_abi::Result;
using nvrtcProgram = nvrtc_abi::Program;

struct Nvrtc : nvrtc_abi::Functions {
  // Not NVRTC's: a library standing in for NVRTC that makes other binaries (the emulated CUDA
  // device's shim, tests/support/emulated_cuda_device.cpp) names itself here, and the name joins
  // the version in every CUDA cache key, so its binaries never mix with NVRTC's in one cache.
  const char* (*identity)() = nullptr;
  std::string error;  // why it could not be loaded (empty: loaded)
};

// The library names tried, in order: $FLEXJIT_NVRTC, the soname (LD_LIBRARY_PATH, ldconfig),
// then the toolkit's usual places ($CUDA_HOME, /usr/local/cuda).
std::vector<std::string> candidates() {
  std::vector<std::string> c;
  if (const char* e = std::getenv("FLEXJIT_NVRTC"); e && *e) c.push_back(e);
  c.push_back("libnvrtc.so.13");
  c.push_back("libnvrtc.so.12");
  for (const char* var : {"CUDA_HOME", "CUDA_PATH"})
    if (const char* e = std::getenv(var); e && *e) c.push_back(std::string(e) + "/lib64/libnvrtc.so");
  c.push_back("/usr/local/cuda/lib64/libnvrtc.so");
  return c;
}

const Nvrtc& nvrtc() {
  static const Nvrtc lib = [] {
    Nvrtc n;
    void* h = nullptr;
    std::string tried;
    for (const std::string& name : candidates()) {
      h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (h) break;
      tried += (tried.empty() ? "" : ", ") + name;
    }
    if (!h) {
      n.error = "NVRTC (libnvrtc) could not be loaded; tried " + tried +
                ". Install the CUDA toolkit's NVRTC or set FLEXJIT_NVRTC to the library's path";
      return n;
    }
    const std::string missing = nvrtc_abi::bind(h, &n);
    n.identity = reinterpret_cast<const char* (*)()>(dlsym(h, "flexjit_nvrtc_identity"));
    if (!missing.empty()) n.error = "the loaded NVRTC lacks " + missing + " (NVRTC 12 or newer is needed)";
    return n;
  }();
  return lib;
}

const Nvrtc& need_nvrtc() {
  const Nvrtc& n = nvrtc();
  if (!n.error.empty()) throw flexjit::Error("flexjit: " + n.error);
  return n;
}

std::string error_text(const Nvrtc& n, nvrtcResult r) {
  const char* s = n.error_string ? n.error_string(r) : nullptr;
  return s ? s : "NVRTC error " + std::to_string(r);
}

// The program and its destruction on every path out.
struct Program {
  const Nvrtc& n;
  nvrtcProgram p = nullptr;
  ~Program() {
    if (p) n.destroy(&p);
  }
};

std::string read_log(const Nvrtc& n, nvrtcProgram p) {
  size_t size = 0;
  if (n.log_size(p, &size) != 0 || size <= 1) return "";
  std::string log(size, '\0');
  if (n.log(p, log.data()) != 0) return "";
  log.resize(size - 1);  // the terminating NUL
  return log;
}

}  // namespace

bool nvrtc_available(std::string* why) {
  const Nvrtc& n = nvrtc();
  if (why) *why = n.error;
  return n.error.empty();
}

std::string nvrtc_version() {
  const Nvrtc& n = need_nvrtc();
  int major = 0, minor = 0;
  n.version(&major, &minor);
  return std::to_string(major) + "." + std::to_string(minor) + (n.identity ? std::string("+") + n.identity() : "");
}

std::vector<std::string> nvrtc_supported_archs() {
  const Nvrtc& n = need_nvrtc();
  int count = 0;
  if (n.num_archs(&count) != 0 || count <= 0) return {};
  std::vector<int> archs(static_cast<size_t>(count));
  if (n.archs(archs.data()) != 0) return {};
  std::vector<std::string> out;
  for (int a : archs) out.push_back("sm_" + std::to_string(a));
  return out;
}

CudaCompileResult compile_cuda(const std::string& source, const std::string& source_name,
                               const std::string& arch, bool want_cubin, bool ptxas_verbose) {
  const Nvrtc& n = need_nvrtc();
  // "sm_90" or "sm_90a": the number must be one this NVRTC supports.
  static const std::regex arch_re("sm_([0-9]+)a?");
  std::smatch m;
  bool known = false;
  if (std::regex_match(arch, m, arch_re))
    for (const std::string& a : nvrtc_supported_archs()) known |= a == "sm_" + m[1].str();
  if (!known) {
    std::string list;
    for (const std::string& a : nvrtc_supported_archs()) list += (list.empty() ? "" : " ") + a;
    throw flexjit::Error("flexjit: GPU architecture '" + arch + "' is not one NVRTC " + nvrtc_version() +
                         " compiles for (" + list + "; an 'a' suffix such as sm_90a is allowed)");
  }

  auto t0 = std::chrono::steady_clock::now();
  Program prog{n};
  nvrtcResult r = n.create(&prog.p, source.c_str(), source_name.c_str(), 0, nullptr, nullptr);
  if (r != 0) throw flexjit::Error("flexjit: nvrtcCreateProgram failed: " + error_text(n, r));
  // A real arch gives both CUBIN and PTX; a virtual one (compute_XX) PTX only.
  std::vector<std::string> opts = {(want_cubin ? "-arch=" : "-arch=compute_") +
                                       (want_cubin ? arch : arch.substr(3)),
                                   "-std=c++17", "-default-device", "-lineinfo",
                                   // Generated code defines helpers a given mod may not use.
                                   "--diag-suppress=177"};
  if (ptxas_verbose) opts.push_back("--ptxas-options=-v");
  std::vector<const char*> argv;
  for (const auto& o : opts) argv.push_back(o.c_str());
  r = n.compile(prog.p, static_cast<int>(argv.size()), argv.data());
  CudaCompileResult out;
  out.arch = arch;
  out.log = read_log(n, prog.p);
  if (r != 0) {
    throw flexjit::Error("flexjit: NVRTC " + nvrtc_version() + " could not compile " + source_name + " for " +
                         arch + " (" + error_text(n, r) + "):\n" + out.log);
  }
  size_t size = 0;
  if (n.ptx_size(prog.p, &size) == 0 && size > 1) {
    out.ptx.resize(size);
    if (n.ptx(prog.p, out.ptx.data()) != 0) out.ptx.clear();
    else out.ptx.resize(size - 1);
  }
  if (want_cubin && n.cubin_size(prog.p, &size) == 0 && size > 0) {
    out.cubin.resize(size);
    if (n.cubin(prog.p, out.cubin.data()) != 0) out.cubin.clear();
  }
  if (out.ptx.empty() || (want_cubin && out.cubin.empty()))
    throw flexjit::Error("flexjit: NVRTC compiled " + source_name + " for " + arch + " but returned no " +
                         (out.ptx.empty() ? "PTX" : "CUBIN"));
  out.compile_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

namespace {
constexpr char kBinaryMagic[] = "flexjit-cuda-v1\n";
}

std::string pack_cuda_binary(const CudaCompileResult& r) {
  std::string out = kBinaryMagic;
  out += "arch " + r.arch + "\ncubin " + std::to_string(r.cubin.size()) + "\nptx " + std::to_string(r.ptx.size()) + "\n";
  return out + r.cubin + r.ptx;
}

bool unpack_cuda_binary(const std::string& bytes, CudaCompileResult* out) {
  if (bytes.compare(0, sizeof(kBinaryMagic) - 1, kBinaryMagic) != 0) return false;
  size_t pos = sizeof(kBinaryMagic) - 1;
  auto field = [&](const char* name, std::string* value) {
    const std::string prefix = std::string(name) + " ";
    if (bytes.compare(pos, prefix.size(), prefix) != 0) return false;
    size_t end = bytes.find('\n', pos);
    if (end == std::string::npos || end - pos > 64) return false;
    *value = bytes.substr(pos + prefix.size(), end - pos - prefix.size());
    pos = end + 1;
    return true;
  };
  std::string arch, cubin_n, ptx_n;
  if (!field("arch", &arch) || !field("cubin", &cubin_n) || !field("ptx", &ptx_n)) return false;
  auto number = [](const std::string& s, size_t* v) {
    if (s.empty() || s.size() > 12 || s.find_first_not_of("0123456789") != std::string::npos) return false;
    *v = std::stoull(s);
    return true;
  };
  size_t nc = 0, np = 0;
  if (!number(cubin_n, &nc) || !number(ptx_n, &np) || bytes.size() != pos + nc + np) return false;
  out->arch = arch;
  out->cubin = bytes.substr(pos, nc);
  out->ptx = bytes.substr(pos + nc, np);
  return true;
}

std::vector<PtxasUsage> parse_ptxas_usage(const std::string& log) {
  static const std::regex entry_re("Compiling entry function '([^']+)'");
  static const std::regex frame_re("([0-9]+) bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads");
  static const std::regex regs_re("Used ([0-9]+) registers");
  std::vector<PtxasUsage> out;
  std::istringstream in(log);
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_search(line, m, entry_re)) {
      out.push_back(PtxasUsage{m[1].str()});
    } else if (!out.empty() && std::regex_search(line, m, frame_re)) {
      out.back().stack_frame = std::stol(m[1].str());
      out.back().spill_bytes = std::stol(m[2].str()) + std::stol(m[3].str());
    } else if (!out.empty() && std::regex_search(line, m, regs_re)) {
      out.back().registers = std::stoi(m[1].str());
    }
  }
  return out;
}

}  // namespace flexjit::jit

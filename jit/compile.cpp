// C++ text -> ELF object with the Clang 19 libraries, in process; object -> function pointer with
// ORC LLJIT. Every LLVM/Clang-version-sensitive call in flexjit lives in this file (it includes
// Clang's headers and takes ~30 s to compile; keep other files free of them).
//
// The pipeline mirrors what `clang++ -c -O3` does inside cc1, split in three timed steps:
//   1. frontend: clang::EmitLLVMOnlyAction with CodeGenOpts.DisableLLVMPasses, i.e. O3-ready IR
//      (no optnone, TBAA, lifetime markers) without running the pass pipeline;
//   2. optimize: PassBuilder::buildPerModuleDefaultPipeline(O3) with clang's O3 tuning options;
//   3. codegen: the legacy codegen pass manager emitting an object file.
// The host CPU name and its full feature list are set explicitly on both the Clang invocation and
// the TargetMachine (not `-march=native`), so what we compile for is exactly what
// compiler_identity() reports and what the cache keys on.
#include "jit/compile.h"
#include "jit/executor.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

#include "clang/Basic/Diagnostic.h"
#include "clang/Basic/DiagnosticOptions.h"
#include "clang/Basic/Version.h"
#include "clang/CodeGen/CodeGenAction.h"
#include "clang/Frontend/CompilerInstance.h"
#include "clang/Frontend/CompilerInvocation.h"
#include "clang/Frontend/PrecompiledPreamble.h"
#include "clang/Frontend/TextDiagnosticPrinter.h"
#include "clang/Frontend/Utils.h"
#include "clang/Lex/PreprocessorOptions.h"
#include "jit/types.h"
#include "llvm/Analysis/TargetLibraryInfo.h"
#include "llvm/Analysis/TargetTransformInfo.h"
#include "llvm/Config/llvm-config.h"
#include "llvm/ExecutionEngine/Orc/ExecutionUtils.h"
#include "llvm/ExecutionEngine/Orc/LLJIT.h"
#include "llvm/IR/LLVMContext.h"
#include "llvm/IR/LegacyPassManager.h"
#include "llvm/IR/Module.h"
#include "llvm/MC/MCSubtargetInfo.h"
#include "llvm/MC/TargetRegistry.h"
#include "llvm/Object/Archive.h"
#include "llvm/Object/ArchiveWriter.h"
#include "llvm/Passes/PassBuilder.h"
#include "llvm/Support/CrashRecoveryContext.h"
#include "llvm/Support/Error.h"
#include "llvm/Support/ErrorHandling.h"
#include "llvm/Support/MemoryBuffer.h"
#include "llvm/Support/TargetSelect.h"
#include "llvm/Support/VirtualFileSystem.h"
#include "llvm/Support/raw_ostream.h"
#include "llvm/Target/TargetMachine.h"
#include "llvm/Target/TargetOptions.h"
#include "llvm/TargetParser/Host.h"
#include "llvm/TargetParser/Triple.h"
#include "llvm/TargetParser/X86TargetParser.h"

#ifndef FLEXJIT_CLANG_EXE
#define FLEXJIT_CLANG_EXE "/usr/lib/llvm-19/bin/clang++"
#endif

namespace flexjit::jit {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::string to_string(llvm::Error err) { return llvm::toString(std::move(err)); }

// Bump when the way objects are produced changes without a flag change (pass pipeline, target
// options): it is part of compiler_identity(), hence of every cache key.
constexpr const char* kPipelineVersion = "flexjit-cpu-pipeline-2";  // 2: host features reach the frontend

void init_llvm_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    llvm::InitializeNativeTarget();
    llvm::InitializeNativeTargetAsmPrinter();
    llvm::InitializeNativeTargetAsmParser();  // kernels may contain inline asm
  });
}

// ---- LLVM's fatal errors ----
// Some backend bugs end in report_fatal_error, which aborts the process (LLVM 19 on a
// <17 x bfloat> load: "Do not know how to soft promote this operator's operand", which a bf16
// decode kernel with an odd Dv once produced). A kernel compile must fail instead, so each runs
// inside a CrashRecoveryContext: the fatal-error handler records the reason for the compiling
// thread, the abort() that follows is caught (CrashRecoveryContext::Enable handles SIGABRT, and
// re-raises any signal outside a recovering thread) and unwinds to RunSafely. What the aborted
// compile held is leaked, never reused.
thread_local std::string* t_fatal_reason = nullptr;

void on_llvm_fatal_error(void*, const char* reason, bool) {
  if (t_fatal_reason != nullptr) {
    *t_fatal_reason = reason;
    return;  // report_fatal_error aborts next: caught by the thread's CrashRecoveryContext
  }
  llvm::errs() << "LLVM ERROR: " << reason << "\n";  // LLVM's own message elsewhere
}

// Runs `body` (which may throw: rethrown here); false when LLVM failed fatally inside it, the
// reason in *reason.
bool run_recovering(const std::function<void()>& body, std::string* reason) {
  static std::once_flag once;
  std::call_once(once, [] {
    llvm::install_fatal_error_handler(on_llvm_fatal_error, nullptr);
    llvm::CrashRecoveryContext::Enable();
  });
  std::exception_ptr thrown;
  std::string fatal;
  t_fatal_reason = &fatal;
  llvm::CrashRecoveryContext crc;
  const bool ok = crc.RunSafely([&] {
    try {
      body();
    } catch (...) {
      thrown = std::current_exception();
    }
  });
  t_fatal_reason = nullptr;
  if (thrown) std::rethrow_exception(thrown);
  if (!ok) *reason = fatal.empty() ? std::string("a crash inside LLVM") : fatal;
  return ok;
}

// What kernels are compiled for: the host as LLVM sees it, or FLEXJIT_CPU_TARGET. The CPU name
// alone is not enough: under the hypervisor it reads `rocketlake` while the feature list has
// AVX512-FP16/BF16 and AMX (TOOLCHAIN.md), so the full feature list is always set explicitly.
struct CpuTarget {
  std::string triple;
  std::string cpu;       // -march / TargetMachine CPU
  std::string tune_cpu;  // -mtune
  std::vector<std::string> features;  // "+avx512f", "-amx-int8", ... sorted by name
  std::string feature_string;         // the same, comma-separated
  std::string spec;   // FLEXJIT_CPU_TARGET as given; "" = the host
  std::string error;  // non-empty: no kernel may be compiled (bad spec, or the host cannot run it)
  llvm::StringMap<bool> host;  // the host's own features (what this process can execute)
};

// Sets one feature and what follows from it (updateImpliedFeatures leaves the feature itself
// alone, as in Clang's X86TargetInfo::setFeatureEnabled).
void set_feature(llvm::StringMap<bool>& map, llvm::StringRef feature, bool on) {
  map[feature] = on;
  llvm::X86::updateImpliedFeatures(feature, on, map);
}

// FLEXJIT_CPU_TARGET = "<cpu>[,+feature|-feature...]": an LLVM x86 CPU name (x86-64-v2,
// x86-64-v3, x86-64-v4, znver4, sapphirerapids, ...) or "host", then features to add or remove.
// Implied features follow (+avx512bf16 brings AVX-512 F and BW; -avx512f drops every AVX-512
// feature), as with -march and -m flags. Every feature the result enables must be one this host
// has, or kernels could fault with SIGILL: such a target is an error at compile time.
void apply_target_spec(CpuTarget& t, const std::string& spec) {
  const llvm::StringMap<bool>& host = t.host;
  std::vector<std::string> parts;
  for (size_t at = 0; at <= spec.size();) {
    size_t comma = spec.find(',', at);
    if (comma == std::string::npos) comma = spec.size();
    std::string p = spec.substr(at, comma - at);
    while (!p.empty() && p.front() == ' ') p.erase(p.begin());
    while (!p.empty() && p.back() == ' ') p.pop_back();
    parts.push_back(p);
    at = comma + 1;
  }
  const std::string hint = "; FLEXJIT_CPU_TARGET takes an LLVM x86 CPU name or 'host', then optional "
                           "+feature / -feature items, e.g. 'x86-64-v3' or 'host,-avx512bf16'";
  const std::string& cpu = parts[0];
  llvm::StringMap<bool> map;
  for (const auto& kv : host) map[kv.getKey()] = cpu == "host" ? kv.getValue() : false;
  if (cpu != "host") {
    if (llvm::X86::parseArchX86(cpu, /*Only64Bit=*/true) == llvm::X86::CK_None) {
      t.error = "FLEXJIT_CPU_TARGET='" + spec + "': '" + cpu + "' is not an x86-64 CPU LLVM knows" + hint;
      return;
    }
    map["64bit"] = true;  // implied by the x86_64 triple, not listed per CPU
    llvm::SmallVector<llvm::StringRef, 64> feats;
    llvm::X86::getFeaturesForCPU(cpu, feats, /*NeedPlus=*/false);
    for (llvm::StringRef f : feats) set_feature(map, f, true);
    t.cpu = cpu;
    // The x86-64-vN levels name no microarchitecture to tune for (Clang's driver does the same).
    t.tune_cpu = llvm::StringRef(cpu).starts_with("x86-64") ? "generic" : cpu;
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& p = parts[i];
    if (p.size() < 2 || (p[0] != '+' && p[0] != '-') || !host.count(p.substr(1))) {
      t.error = "FLEXJIT_CPU_TARGET='" + spec + "': '" + p + "' is not +feature or -feature with an x86 " +
                "feature LLVM knows (e.g. +avx512bf16, -amx-tile)" + hint;
      return;
    }
    set_feature(map, p.substr(1), p[0] == '+');
  }
  // Clang's driver turns on 512-bit EVEX encodings with AVX-512 unless told -evex512 (LLVM 18+);
  // the CPU tables leave it out, and without it 16-lane vectors change the call ABI.
  if (map.lookup("avx512f") && spec.find("-evex512") == std::string::npos) map["evex512"] = true;
  // A host whose CPUID reports AVX10.1 at 256 bits only (seen under a hypervisor on an AMX host)
  // next to evex512: Clang warns that +avx10.1-256 with 512-bit EVEX is an invalid combination
  // and promotes it to avx10.1-512, a feature the host does not report. AVX10.1 only names a set
  // of AVX-512 features, each of which the map sets on its own, so the umbrella is left out.
  if (map.lookup("evex512") && map.lookup("avx10.1-256") && !map.lookup("avx10.1-512")) map["avx10.1-256"] = false;
  std::vector<std::string> missing;
  std::vector<std::string> names;
  for (const auto& kv : map) names.push_back(kv.getKey().str());
  std::sort(names.begin(), names.end());
  t.features.clear();
  t.feature_string.clear();
  for (const auto& n : names) {
    const bool on = map.lookup(n);
    if (on && host.count(n) && !host.lookup(n)) missing.push_back(n);
    t.features.push_back((on ? "+" : "-") + n);
    if (!t.feature_string.empty()) t.feature_string += ',';
    t.feature_string += t.features.back();
  }
  if (!missing.empty()) {
    std::string list;
    for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
    t.error = "FLEXJIT_CPU_TARGET='" + spec + "' needs CPU features this host lacks (" + list +
              "): its kernels would fault here. Pick a target this CPU can run (x86-64-v3, 'host', ...), "
              "drop those features with -feature items, or unset FLEXJIT_CPU_TARGET";
  }
}

const CpuTarget& cpu_target() {
  static const CpuTarget target = [] {
    CpuTarget t;
    // The default target triple is the one Clang's driver uses; we also pass it as --target, so
    // the driver, the IR module and the TargetMachine agree by construction.
    t.triple = llvm::Triple::normalize(llvm::sys::getDefaultTargetTriple());
    t.cpu = t.tune_cpu = llvm::sys::getHostCPUName().str();
    // LLVM 19: getHostCPUFeatures() returns the map (LLVM <= 18 filled an out-parameter).
    t.host = llvm::sys::getHostCPUFeatures();
    const char* env = std::getenv("FLEXJIT_CPU_TARGET");
    t.spec = env ? env : "";
    if (t.spec == "native") t.spec.clear();
    apply_target_spec(t, t.spec.empty() ? "host" : t.spec);
    return t;
  }();
  return target;
}

}  // namespace

bool host_has_feature(const std::string& name) { return cpu_target().host.lookup(name); }

bool target_has_feature(const std::string& name) {
  const std::vector<std::string>& f = cpu_target().features;
  return std::find(f.begin(), f.end(), "+" + name) != f.end();
}

std::string cpu_target_name() {
  const CpuTarget& t = cpu_target();
  return t.spec.empty() ? t.cpu : t.spec;
}

const std::string& cpu_target_error() { return cpu_target().error; }

namespace {

// ---------------------------------------------------------------------------------------------
// 1. Frontend

// What one compile targets: the CPU target (triple, CPU, features) and the driver flags. The host
// pipeline sets the feature list in full on the invocation; a cross compile keeps what the
// driver derives from -mcpu.
struct Pipeline {
  const CpuTarget* target;
  const std::vector<std::string>* flags;
  bool set_features = true;
  bool prefix_pch = false;  // precompile a source's prefix (kPrefixEnd), the host pipeline's
};

// A source's precompiled prefix (kPrefixEnd in compile.h): the prefix text, served to Clang as
// the header kPrefixHeader, and its PCH in memory (Clang's preamble machinery, as clangd uses it:
// the PCH stands for the #include of that header on the main file's first line).
constexpr char kPrefixHeader[] = "/flexjit-prefix/prefix.h";
constexpr char kPrefixInclude[] = "#include \"/flexjit-prefix/prefix.h\"\n";
struct PrefixPch {
  std::string text;
  std::unique_ptr<clang::PrecompiledPreamble> pch;
};

// Files served from memory (name, text), layered over the real file system (the driver still
// needs the real one to find the resource dir from argv0). The texts must outlive the result.
llvm::IntrusiveRefCntPtr<llvm::vfs::FileSystem> memory_vfs(
    std::initializer_list<std::pair<const char*, llvm::MemoryBufferRef>> files) {
  auto mem_fs = llvm::makeIntrusiveRefCnt<llvm::vfs::InMemoryFileSystem>();
  // Trap: calling setCurrentWorkingDirectory on the overlay would chdir() the whole process,
  // because getRealFileSystem() is linked to the process cwd. Set it on the in-memory layer only,
  // so a relative path resolves there exactly as the real layer would resolve it.
  char cwd[4096];
  mem_fs->setCurrentWorkingDirectory(getcwd(cwd, sizeof(cwd)) ? cwd : "/");
  for (const auto& [name, buffer] : files) mem_fs->addFile(name, 0, llvm::MemoryBuffer::getMemBuffer(buffer));
  auto overlay = llvm::makeIntrusiveRefCnt<llvm::vfs::OverlayFileSystem>(llvm::vfs::getRealFileSystem());
  overlay->pushOverlay(mem_fs);
  return overlay;
}

// The compiler invocation for the main file `path` (in `vfs`): the driver flags, then the target
// CPU and features set explicitly. Null (with the driver's complaint in diag_os) if it fails.
std::shared_ptr<clang::CompilerInvocation> make_invocation(const std::string& path,
                                                           llvm::IntrusiveRefCntPtr<llvm::vfs::FileSystem> vfs,
                                                           const Pipeline& pl, llvm::raw_ostream& diag_os) {
  // Driver-stage diagnostics (bad flags) would go to stderr without a DiagnosticsEngine of ours.
  auto driver_diag_opts = llvm::makeIntrusiveRefCnt<clang::DiagnosticOptions>();
  clang::TextDiagnosticPrinter driver_printer(diag_os, driver_diag_opts.get());
  clang::CreateInvocationOptions cio;
  cio.Diags = clang::CompilerInstance::createDiagnostics(driver_diag_opts.get(), &driver_printer,
                                                         /*ShouldOwnClient=*/false);
  cio.VFS = vfs;
  cio.RecoverOnError = false;

  std::vector<const char*> argv;
  // argv0 must be the real clang++ of LLVM 19: the driver derives the resource dir (builtin
  // headers such as <stddef.h>) and the GCC installation from it.
  argv.push_back(FLEXJIT_CLANG_EXE);
  for (const auto& f : *pl.flags) argv.push_back(f.c_str());
  argv.push_back(path.c_str());
  std::shared_ptr<clang::CompilerInvocation> inv = clang::createInvocation(argv, cio);
  if (!inv) return nullptr;

  // Explicit CPU + features instead of -march=native (see the file comment).
  const CpuTarget& host = *pl.target;
  if (pl.set_features) {
    inv->getTargetOpts().CPU = host.cpu;
    inv->getTargetOpts().TuneCPU = host.tune_cpu;
    // Trap: clang::TargetInfo::CreateTargetInfo rebuilds Features from FeaturesAsWritten (the
    // driver's, i.e. -march's), so setting Features alone is silently undone: the functions then
    // carry the CPU name's features (no AMX, AVX512-BF16 or -FP16 under this hypervisor's name).
    inv->getTargetOpts().FeaturesAsWritten = host.features;
    inv->getTargetOpts().Features = host.features;
  }
  // Trap: DisableFree defaults to true under the driver (cc1 exits right after), which leaks the
  // AST, Sema and the IR of every compile in a long-lived process.
  inv->getFrontendOpts().DisableFree = false;
  inv->getCodeGenOpts().DisableFree = false;
  // O3-ready IR, but the pass pipeline runs in step 2 so it can be timed on its own.
  inv->getCodeGenOpts().DisableLLVMPasses = true;
  return inv;
}

// Precompiles `prefix` (a source's text up to and including kPrefixEnd) for the pipeline; null
// if Clang cannot (the caller then compiles the whole text).
std::unique_ptr<PrefixPch> build_prefix_pch(const std::string& prefix, const Pipeline& pl) {
  auto out = std::make_unique<PrefixPch>();
  out->text = prefix;
  const char* main_path = "/flexjit-prefix/main.cpp";
  std::unique_ptr<llvm::MemoryBuffer> main = llvm::MemoryBuffer::getMemBufferCopy(kPrefixInclude, main_path);
  auto vfs = memory_vfs({{kPrefixHeader, llvm::MemoryBufferRef(out->text, kPrefixHeader)},
                         {main_path, main->getMemBufferRef()}});
  std::string diag_text;
  llvm::raw_string_ostream diag_os(diag_text);
  std::shared_ptr<clang::CompilerInvocation> inv = make_invocation(main_path, vfs, pl, diag_os);
  if (!inv) return nullptr;
  auto diag_opts = llvm::makeIntrusiveRefCnt<clang::DiagnosticOptions>();
  clang::TextDiagnosticPrinter printer(diag_os, diag_opts.get());
  llvm::IntrusiveRefCntPtr<clang::DiagnosticsEngine> diags =
      clang::CompilerInstance::createDiagnostics(diag_opts.get(), &printer, /*ShouldOwnClient=*/false);
  // The prefix's inline functions are what the kernels call: keep their bodies (an editor's
  // preamble skips them).
  struct KeepBodies : clang::PreambleCallbacks {
    bool shouldSkipFunctionBody(clang::Decl*) override { return false; }
  } callbacks;
  llvm::ErrorOr<clang::PrecompiledPreamble> pch = clang::PrecompiledPreamble::Build(
      *inv, main.get(), clang::PreambleBounds(unsigned(std::strlen(kPrefixInclude)), /*PreambleEndsAtStartOfLine=*/true),
      *diags, vfs, std::make_shared<clang::PCHContainerOperations>(), /*StoreInMemory=*/true,
      /*StoragePath=*/"", callbacks);
  if (!pch || diags->hasErrorOccurred()) return nullptr;
  out->pch = std::make_unique<clang::PrecompiledPreamble>(std::move(*pch));
  return out;
}

bool prefix_pch_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FLEXJIT_PCH");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

// The process's precompiled prefixes, built once each (under the lock: compiles that need one
// being built wait for it rather than build it again). A prefix that failed stays null.
const PrefixPch* prefix_pch(const std::string& prefix, const Pipeline& pl) {
  static std::mutex mu;
  static auto* built = new std::map<std::string, std::unique_ptr<PrefixPch>>();  // never destroyed
  std::lock_guard<std::mutex> lock(mu);
  auto it = built->find(prefix);
  if (it == built->end()) it = built->emplace(prefix, build_prefix_pch(prefix, pl)).first;
  return it->second.get();
}

// Runs Clang on `source` (served from memory as `path`) and returns the unoptimized O3 IR.
// Diagnostics (warnings and errors) go to `diag_text`. With `prefix`, `source` starts with
// kPrefixInclude and the PCH stands for that line.
std::unique_ptr<llvm::Module> run_frontend(const std::string& source, const std::string& path,
                                           int part, llvm::LLVMContext& ctx,
                                           std::string& diag_text, bool& ok, const Pipeline& pl,
                                           const PrefixPch* prefix = nullptr) {
  ok = false;
  llvm::raw_string_ostream diag_os(diag_text);
  std::unique_ptr<llvm::MemoryBuffer> main_buffer = llvm::MemoryBuffer::getMemBufferCopy(source, path);
  llvm::IntrusiveRefCntPtr<llvm::vfs::FileSystem> vfs =
      prefix != nullptr ? memory_vfs({{kPrefixHeader, llvm::MemoryBufferRef(prefix->text, kPrefixHeader)},
                                      {path.c_str(), main_buffer->getMemBufferRef()}})
                        : memory_vfs({{path.c_str(), main_buffer->getMemBufferRef()}});
  std::shared_ptr<clang::CompilerInvocation> inv = make_invocation(path, vfs, pl, diag_os);
  if (!inv) {
    diag_os.flush();
    if (diag_text.empty()) diag_text = "the Clang driver could not build a compiler invocation";
    return nullptr;
  }
  // One part of a split translation unit (as -DFLEXJIT_PART=k: the source's lines keep their
  // numbers in diagnostics).
  if (part > 0) inv->getPreprocessorOpts().addMacroDef("FLEXJIT_PART=" + std::to_string(part));
  // The prefix never reads FLEXJIT_PART (its PCH was built without it).
  if (prefix != nullptr) {
    prefix->pch->OverridePreamble(*inv, vfs, main_buffer.get());
    // Trap: the preamble remaps the main file to main_buffer, and a remapped buffer is freed by
    // the compiler unless retained: main_buffer stays ours.
    inv->getPreprocessorOpts().RetainRemappedFileBuffers = true;
  }

  clang::CompilerInstance ci;
  ci.setInvocation(std::move(inv));
  clang::TextDiagnosticPrinter printer(diag_os, &ci.getDiagnosticOpts());
  ci.createDiagnostics(&printer, /*ShouldOwnClient=*/false);
  ci.createFileManager(vfs);
  // "N errors generated." is printed to the verbose stream, which defaults to llvm::errs().
  ci.setVerboseOutputStream(diag_os);

  clang::EmitLLVMOnlyAction action(&ctx);
  bool success = ci.ExecuteAction(action);
  std::unique_ptr<llvm::Module> module = action.takeModule();
  diag_os.flush();
  ok = success && module && !ci.getDiagnostics().hasErrorOccurred();
  return ok ? std::move(module) : nullptr;
}

// ---------------------------------------------------------------------------------------------
// 2. + 3. Optimize and codegen

std::unique_ptr<llvm::TargetMachine> make_target_machine(const CpuTarget& host, std::string& err) {
  const llvm::Target* target = llvm::TargetRegistry::lookupTarget(host.triple, err);
  if (!target) return nullptr;
  llvm::TargetOptions opts;
  // What clang's initTargetOptions derives from our flags: -ffp-contract=fast,
  // -fno-signed-zeros, -fno-trapping-math. (Fast-math flags on instructions and the function
  // attributes written by the frontend carry the rest; there is no -ffinite-math-only on purpose:
  // -inf is how masked scores are spelled.)
  opts.AllowFPOpFusion = llvm::FPOpFusion::Fast;
  opts.NoSignedZerosFPMath = true;
  opts.NoTrappingFPMath = true;
  opts.UseInitArray = true;
  // PIC + small code model: every reference inside the object is PC-relative and every external
  // goes through the GOT/PLT, which JITLink builds; absolute 32-bit relocations (non-PIC code)
  // fail to link once JIT memory is mapped above 2 GiB.
  return std::unique_ptr<llvm::TargetMachine>(target->createTargetMachine(
      host.triple, host.cpu, host.feature_string, opts, llvm::Reloc::PIC_, llvm::CodeModel::Small,
      llvm::CodeGenOptLevel::Aggressive));
}

void optimize_module(llvm::Module& m, llvm::TargetMachine& tm) {
  // Clang's O3 tuning (BackendUtil.cpp: -funroll-loops, -vectorize-loops, -vectorize-slp are on
  // at O2 and above).
  llvm::PipelineTuningOptions pto;
  pto.LoopUnrolling = true;
  pto.LoopInterleaving = true;
  pto.LoopVectorization = true;
  pto.SLPVectorization = true;

  llvm::LoopAnalysisManager lam;
  llvm::FunctionAnalysisManager fam;
  llvm::CGSCCAnalysisManager cgam;
  llvm::ModuleAnalysisManager mam;
  llvm::PassBuilder pb(&tm, pto);
  llvm::TargetLibraryInfoImpl tlii(llvm::Triple(m.getTargetTriple()));
  fam.registerPass([&] { return llvm::TargetLibraryAnalysis(tlii); });
  pb.registerModuleAnalyses(mam);
  pb.registerCGSCCAnalyses(cgam);
  pb.registerFunctionAnalyses(fam);
  pb.registerLoopAnalyses(lam);
  pb.crossRegisterProxies(lam, fam, cgam, mam);
  llvm::ModulePassManager mpm = pb.buildPerModuleDefaultPipeline(llvm::OptimizationLevel::O3);
  mpm.run(m, mam);
}

bool emit_object(llvm::Module& m, llvm::TargetMachine& tm, std::string& out) {
  llvm::SmallVector<char, 0> buffer;
  llvm::raw_svector_ostream os(buffer);
  llvm::legacy::PassManager pm;
  llvm::TargetLibraryInfoImpl tlii(llvm::Triple(m.getTargetTriple()));
  pm.add(llvm::createTargetTransformInfoWrapperPass(tm.getTargetIRAnalysis()));
  pm.add(new llvm::TargetLibraryInfoWrapperPass(tlii));
  // LLVM 18+: CodeGenFileType is an enum class (was CGFT_ObjectFile).
  if (tm.addPassesToEmitFile(pm, os, nullptr, llvm::CodeGenFileType::ObjectFile)) return false;
  pm.run(m);
  out.assign(buffer.data(), buffer.size());
  return true;
}

// ---------------------------------------------------------------------------------------------
// The JIT

struct Jit {
  std::unique_ptr<llvm::orc::LLJIT> lljit;
  std::atomic<unsigned long> next_id{0};
};

// ORC reports materialization failures (e.g. "Symbols not found: [ foo ]") through the session's
// error reporter, which by default prints them to stderr, while lookup() itself only returns
// "Failed to materialize symbols". Without a compile thread pool the reporter runs on the thread
// doing the lookup, so a thread_local buffer gives load_object the real reason.
thread_local std::string t_session_errors;

Jit& the_jit() {
  // Created once and deliberately never destroyed: loaded kernels are plain function pointers
  // that may be called until the process exits (also from TBB workers during static teardown).
  static Jit* jit = [] {
    init_llvm_once();
    // Keep LLJIT's default process-symbols JITDylib: LLVM 19 refuses to build the JIT without
    // it ("Native platforms require a process symbols JITDylib") when
    // setLinkProcessSymbolsByDefault(false) is used with the default platform setup.
    auto j = llvm::orc::LLJITBuilder().create();
    if (!j) {
      throw flexjit::Error("flexjit: could not create the LLVM ORC JIT for the host: " +
                           to_string(j.takeError()));
    }
    (*j)->getExecutionSession().setErrorReporter([](llvm::Error err) {
      t_session_errors += to_string(std::move(err));
      t_session_errors += '\n';
    });
    auto* result = new Jit;
    result->lljit = std::move(*j);
    return result;
  }();
  return *jit;
}

}  // namespace

namespace {

// The driver flags for a target: `arch` is -march=CPU (x86: the feature list is then set in full
// on the invocation) or -mcpu=CPU (a cross compile).
std::vector<std::string> flags_for(const std::string& triple, const std::string& arch, bool x86) {
  std::vector<std::string> f{
        "--target=" + triple, arch,
        "-x", "c++", "-std=c++17", "-O3",
        // Position-independent code: see make_target_machine.
        "-fPIC",
        // Kernels are leaf extern "C" code: no unwinding into them, no typeinfo, no
        // __gxx_personality_v0 to resolve.
        "-fno-exceptions", "-fno-rtti",
        // Lets reductions vectorise; deliberately not -ffast-math (finite-math breaks -inf
        // masking).
        "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
        "-ffp-contract=fast",
        // Distribution defaults that would add calls/instructions to every kernel.
        "-fno-stack-protector",
        // The driver turns colour on when stderr is a terminal; the text ends up in exceptions.
        "-fno-color-diagnostics", "-ferror-limit=30", "-c"};
  if (x86) {
    // Without it LLVM vectorises at 256 bits even with AVX-512.
    f.push_back("-mprefer-vector-width=512");
    f.push_back("-fcf-protection=none");  // x86 only: no endbr64 in every function
  }
  return f;
}

}  // namespace

const std::vector<std::string>& compile_flags() {
  static const std::vector<std::string> flags =
      flags_for(cpu_target().triple, "-march=" + cpu_target().cpu, /*x86=*/true);
  return flags;
}

const std::string& compiler_identity() {
  static const std::string identity = [] {
    const CpuTarget& host = cpu_target();
    std::string s = kPipelineVersion;
    s += ";clang=" + clang::getClangFullVersion();
    s += ";llvm=" LLVM_VERSION_STRING;
    s += ";triple=" + host.triple;
    s += ";cpu=" + host.cpu;
    s += ";features=" + host.feature_string;
    s += ";flags=";
    for (const auto& f : compile_flags()) s += f + ' ';
    return s;
  }();
  return identity;
}

namespace {

// The whole pipeline for one translation unit (part 0) or one part of a split one.
// The name a source is compiled under (it goes on the driver's command line: keep it from being
// read as an option).
std::string source_path(const std::string& source_name) {
  std::string path = source_name.empty() ? std::string("kernel.cpp") : source_name;
  if (path[0] == '-') path = "./" + path;
  return path;
}

// With a precompiled prefix ending at byte `end` of `source`: the text Clang compiles instead (the
// prefix's #include, then the rest with its original line numbers).
std::string after_prefix(const std::string& source, size_t end, const std::string& path) {
  const long lines = std::count(source.begin(), source.begin() + long(end), '\n');
  std::string quoted;
  for (char c : path) {
    if (c == '"' || c == '\\') quoted += '\\';
    quoted += c;
  }
  // The preamble the PCH stands for is the run of directives the file starts with (Clang computes
  // it: ComputePreambleBounds), so a declaration ends it right after the #include.
  return kPrefixInclude + ("typedef int fjk_after_prefix_;\n#line " + std::to_string(lines + 1) + " \"" + quoted +
                           "\"\n") +
         source.substr(end);
}

// `text` is the source, or with `prefix` what after_prefix made of it.
CompileResult compile_one(const std::string& text, const std::string& source_name, int part,
                          const Pipeline& pl, const PrefixPch* prefix = nullptr) {
  const std::string path = source_path(source_name);

  CompileResult result;
  result.prefix_pch = prefix != nullptr;
  auto ctx = std::make_unique<llvm::LLVMContext>();  // declared before the module: the module must die first
  std::unique_ptr<llvm::Module> module;
  std::unique_ptr<llvm::TargetMachine> tm;
  std::string fatal;
  const bool recovered_ok = run_recovering(
      [&] {
        std::string diags;
        bool ok = false;
        auto t0 = Clock::now();
        module = run_frontend(text, path, part, *ctx, diags, ok, pl, prefix);
        result.frontend_ms = ms_since(t0);
        if (!ok) {
          throw flexjit::Error("flexjit: Clang could not compile the generated kernel source " + source_name + ":\n" +
                               diags);
        }
        result.log = diags;

        std::string err;
        tm = make_target_machine(*pl.target, err);
        if (!tm) throw flexjit::Error("flexjit: no LLVM target for " + pl.target->triple + " (" + err + ")");
        module->setDataLayout(tm->createDataLayout());

        t0 = Clock::now();
        optimize_module(*module, *tm);
        result.optimize_ms = ms_since(t0);

        // Nothing runs an object's static constructors in this JIT (no ORC platform runtime), so a
        // dynamic initializer that survived O3 would silently leave a global uninitialized.
        if (module->getNamedGlobal("llvm.global_ctors")) {
          throw flexjit::Error("flexjit: " + source_name +
                               " has global objects with dynamic initialization, which the JIT does "
                               "not run; make them constexpr or move them into the kernel function");
        }

        t0 = Clock::now();
        bool emitted = emit_object(*module, *tm, result.object);
        result.codegen_ms = ms_since(t0);
        FLEXJIT_CHECK(emitted, "the TargetMachine can emit object files");
      },
      &fatal);
  if (!recovered_ok) {
    // LLVM stopped mid-pass: its objects may be inconsistent, so they are leaked, not destroyed.
    (void)module.release();
    (void)tm.release();
    (void)ctx.release();
    throw flexjit::Error("flexjit: LLVM failed on the generated kernel source " + source_name + ": " + fatal +
                         " (a compiler bug for this kernel, not a problem with the inputs; the process carries on). "
                         "Other kernel options (BLOCK_N, BLOCK_M, USE_AMX=0 / USE_DPBF16=0) compile a different "
                         "kernel; please report it with the source");
  }
  return result;
}

constexpr char kArchiveMagic[] = "!<arch>\n";

// N from a line "#define FLEXJIT_PARTS N" (2..8) in the source; 1 when there is none.
int declared_parts(const std::string& source) {
  static const std::string directive = "\n#define FLEXJIT_PARTS ";
  size_t at = source.find(directive);
  if (at == std::string::npos) return 1;
  int n = std::atoi(source.c_str() + at + directive.size());
  return n >= 2 && n <= 8 ? n : 1;
}

// The parts' objects as one deterministic GNU ar archive (members part1.o, part2.o, ...).
std::string archive_of(std::vector<CompileResult>& parts) {
  std::vector<llvm::NewArchiveMember> members;
  std::vector<std::string> names;
  for (size_t i = 0; i < parts.size(); ++i) names.push_back("part" + std::to_string(i + 1) + ".o");
  for (size_t i = 0; i < parts.size(); ++i) {
    llvm::NewArchiveMember m;
    m.Buf = llvm::MemoryBuffer::getMemBufferCopy(parts[i].object, names[i]);
    m.MemberName = names[i];
    members.push_back(std::move(m));
  }
  auto buf = llvm::writeArchiveToBuffer(members, llvm::SymtabWritingMode::NoSymtab,
                                        llvm::object::Archive::K_GNU, /*Deterministic=*/true,
                                        /*Thin=*/false);
  if (!buf) throw flexjit::Error("flexjit: could not archive a split kernel's objects: " +
                                 to_string(buf.takeError()));
  return std::string((*buf)->getBufferStart(), (*buf)->getBufferSize());
}

// One translation unit, whole or split into its declared parts (compiled on threads).
CompileResult compile_parts(const std::string& source, const std::string& source_name, const Pipeline& pl) {
  // A precompiled prefix is found and the text to compile made once, for every part.
  const PrefixPch* prefix = nullptr;
  std::string after;
  if (pl.prefix_pch && prefix_pch_enabled()) {
    const size_t at = source.find(kPrefixEnd);
    if (at != std::string::npos) {
      const size_t end = at + std::strlen(kPrefixEnd);
      prefix = prefix_pch(source.substr(0, end), pl);
      if (prefix != nullptr) after = after_prefix(source, end, source_path(source_name));
    }
  }
  const std::string& text = prefix != nullptr ? after : source;
  const int parts = declared_parts(source);
  if (parts == 1) return compile_one(text, source_name, 0, pl, prefix);

  // Side by side (jit/executor.h: part 1 on this thread and the others on threads of their own,
  // or the caller's pool).
  std::vector<CompileResult> results(static_cast<size_t>(parts));
  run_side_by_side(parts, [&](int i) { results[size_t(i)] = compile_one(text, source_name, i + 1, pl, prefix); });

  CompileResult out;
  out.parts = parts;
  out.prefix_pch = prefix != nullptr;
  for (int k = 1; k <= parts; ++k) {
    const CompileResult& r = results[size_t(k - 1)];
    if (!r.log.empty()) out.log += "[part " + std::to_string(k) + "] " + r.log;
    out.frontend_ms = std::max(out.frontend_ms, r.frontend_ms);
    out.optimize_ms = std::max(out.optimize_ms, r.optimize_ms);
    out.codegen_ms = std::max(out.codegen_ms, r.codegen_ms);
  }
  out.object = archive_of(results);
  return out;
}

}  // namespace

CompileResult compile_cpp_to_object(const std::string& source, const std::string& source_name) {
  init_llvm_once();
  if (!cpu_target().error.empty()) throw Error("cannot compile " + source_name + ": " + cpu_target().error);
  return compile_parts(source, source_name, Pipeline{&cpu_target(), &compile_flags(), true, true});
}

CompileResult cross_compile_cpp_to_object(const std::string& source, const std::string& source_name,
                                          const CrossTarget& target) {
  static std::once_flag all_targets;
  std::call_once(all_targets, [] {
    llvm::InitializeAllTargetInfos();
    llvm::InitializeAllTargets();
    llvm::InitializeAllTargetMCs();
    llvm::InitializeAllAsmPrinters();
  });
  CpuTarget t;
  t.triple = llvm::Triple::normalize(target.triple);
  t.cpu = t.tune_cpu = target.cpu;
  std::string err;
  const llvm::Target* found = llvm::TargetRegistry::lookupTarget(t.triple, err);
  if (!found) throw Error("cross compile: no LLVM target for triple '" + target.triple + "' (" + err + ")");
  const llvm::Triple triple(t.triple);
  if (triple.isX86())
    throw Error("cross compile: '" + target.triple + "' is x86; compile for other x86 CPUs with FLEXJIT_CPU_TARGET");
  // (Asked of a generic subtarget: one made for an unknown CPU prints a warning to stderr.)
  std::unique_ptr<llvm::MCSubtargetInfo> sti(found->createMCSubtargetInfo(t.triple, "generic", ""));
  if (!sti || (t.cpu != "generic" && !sti->isCPUStringValid(t.cpu)))
    throw Error("cross compile: '" + target.cpu + "' is not a CPU LLVM knows for " + target.triple +
                " (e.g. neoverse-n1, neoverse-v1, generic)");
  std::vector<std::string> flags = flags_for(t.triple, "-mcpu=" + t.cpu, /*x86=*/false);
  flags.insert(flags.end() - 1, target.extra_flags.begin(), target.extra_flags.end());  // before "-c"
  return compile_parts(source, source_name, Pipeline{&t, &flags, false});
}

void* load_object(const std::string& object, const std::string& symbol) {
  Jit& jit = the_jit();
  llvm::orc::LLJIT& j = *jit.lljit;
  // Unique JITDylib per object: objects from different kernels may define the same helper
  // symbols, and a kernel's code must never be replaced while it may be running.
  std::string name = "flexjit." + std::to_string(++jit.next_id) + "." + symbol;

  auto fail = [&](llvm::orc::JITDylib* jd, const std::string& what, llvm::Error err) -> void* {
    std::string msg = to_string(std::move(err));
    if (!t_session_errors.empty()) msg += "\n" + t_session_errors;
    t_session_errors.clear();
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    if (jd) llvm::consumeError(j.getExecutionSession().removeJITDylib(*jd));
    throw flexjit::Error("flexjit: could not " + what + " for kernel symbol '" + symbol + "' (" +
                         std::to_string(object.size()) + "-byte object): " + msg);
  };

  t_session_errors.clear();
  auto jd = j.createJITDylib(name);
  if (!jd) return fail(nullptr, "create a JITDylib", jd.takeError());
  // expf, tanhf, memcpy, ...: resolved from the libraries already loaded in this process. LLVM 19
  // also links its process-symbols JITDylib into every createJITDylib(); the generator on the
  // kernel's own JITDylib keeps this independent of that default (older LLVMs lack it).
  auto gen = llvm::orc::DynamicLibrarySearchGenerator::GetForCurrentProcess(
      j.getDataLayout().getGlobalPrefix());
  if (!gen) return fail(&*jd, "open the process's symbol table", gen.takeError());
  jd->addGenerator(std::move(*gen));

  if (object.compare(0, sizeof(kArchiveMagic) - 1, kArchiveMagic) == 0) {
    // A split kernel: every member goes into this one JITDylib, where they resolve each other.
    auto archive = llvm::object::Archive::create(llvm::MemoryBufferRef(object, name));
    if (!archive) return fail(&*jd, "read the archive", archive.takeError());
    llvm::Error child_err = llvm::Error::success();
    int members = 0;
    for (const llvm::object::Archive::Child& child : (*archive)->children(child_err)) {
      auto ref = child.getMemoryBufferRef();
      if (!ref) {
        llvm::consumeError(std::move(child_err));
        return fail(&*jd, "read an archive member", ref.takeError());
      }
      auto buffer = llvm::MemoryBuffer::getMemBufferCopy(ref->getBuffer(),
                                                         name + "." + std::to_string(++members));
      if (auto err = j.addObjectFile(*jd, std::move(buffer))) {
        llvm::consumeError(std::move(child_err));
        return fail(&*jd, "load an archive member", std::move(err));
      }
    }
    if (child_err) return fail(&*jd, "read the archive", std::move(child_err));
    if (members == 0) return fail(&*jd, "load the archive", llvm::make_error<llvm::StringError>(
                                      "it has no members", llvm::inconvertibleErrorCode()));
  } else {
    auto buffer = llvm::MemoryBuffer::getMemBufferCopy(object, name);
    if (auto err = j.addObjectFile(*jd, std::move(buffer))) {
      return fail(&*jd, "load the object file", std::move(err));
    }
  }
  auto addr = j.lookup(*jd, symbol);
  if (!addr) return fail(&*jd, "link the object file", addr.takeError());
  if (!t_session_errors.empty()) t_session_errors.clear();
  return addr->toPtr<void*>();
}

}  // namespace flexjit::jit

// The kernel cache: memory (one compile per key in a process, also under many threads) and disk
// (content-hashed keys, atomic writes, one compile per key across processes under a file lock; a
// bad entry is a miss, never a crash).
//
// Disk layout under dir():
//   <key>.o          the ELF object (a split kernel: an ar archive of its parts' objects), byte
//                    for byte what compile_cpp_to_object produced
//   <key>.bin        a CUDA kernel's CUBIN + PTX (jit/nvrtc.h pack_cuda_binary)
//   <key>.meta       manifest: key, symbol, byte length and SHA-256 of <key>.o (or .bin)
//   <key>.cpp        the generated source, when FLEXJIT_DUMP contains "src"
//   failed/<key>.cpp the source of a kernel that did not compile
//   locks/<key>.lock the per-key lock file (flock)
//   .tmp-*           files being written (renamed into place when complete)
//
// Prebuilt tier: a second, read-only directory of the same layout (prebuilt_dir()), looked up
// after the disk cache and before compiling. The build fills <build>/flexjit-kernels next to the
// libraries with `flexjit cache warm` (the attention and decode kernels of common shapes: they
// hold no mod code, so they serve every mod), like a library shipping compiled kernels; the mods
// are always compiled here. Its entries are checked exactly like the disk cache's (a bad one is a
// miss) and never written. FLEXJIT_PREBUILT_DIR names another directory, or turns it off with
// "off" (or "0", "none", empty).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "jit/sha256.h"

namespace flexjit::jit {

// Lower-case hex SHA-256 of `data` (64 characters): jit/sha256.h.

// Key = SHA-256 over the fields sorted by name, each as "name=value\n" (a '\' or newline inside a
// value is escaped, so distinct field lists never collide), with compiler_identity() and
// FLEXJIT_VERSION added as the fields "flexjit.compiler" and "flexjit.version". Field names must
// be unique, non-empty and free of '=' and newlines. Returns 64 hex digits.
std::string make_key(std::vector<std::pair<std::string, std::string>> fields);
// The same with another compiler identity in "flexjit.compiler" (CUDA kernels: the NVRTC version
// and GPU arch; the host CPU does not affect them, so a cache warmed elsewhere still hits).
std::string make_key(std::vector<std::pair<std::string, std::string>> fields, const std::string& compiler);

enum class CacheHit { Miss, Memory, Disk, Prebuilt };
const char* cache_hit_name(CacheHit h);  // "miss", "memory", "disk", "prebuilt"

struct CachedKernel {
  void* fn = nullptr;
  CacheHit hit = CacheHit::Miss;
  double compile_ms = 0;    // make_source + Clang + LLVM; 0 unless compiled now
  double load_ms = 0;       // disk read + checksum + JIT link; 0 on a memory hit
  std::string source_path;  // set when the source was dumped (FLEXJIT_DUMP=src)
  std::string log;          // Clang warnings, when compiled now
};

struct CacheStats {
  long compiles = 0, memory_hits = 0, disk_hits = 0, disk_corrupt = 0, prebuilt_hits = 0;
};

class KernelCache {
 public:
  // dir from env FLEXJIT_CACHE_DIR, else $XDG_CACHE_HOME/flexjit, else ~/.cache/flexjit.
  // Created on first use, never destroyed (loaded kernels live for the whole process).
  static KernelCache& global();
  explicit KernelCache(std::string dir, std::string prebuilt_dir = {});  // for tests and tools
  ~KernelCache();
  KernelCache(const KernelCache&) = delete;
  KernelCache& operator=(const KernelCache&) = delete;

  // Memory -> disk -> compile. `make_source` is called only when compiling. Exactly one compile
  // per key in this process even when many threads ask at once (the others wait, then get
  // hit=Memory), and across processes (an exclusive lock file per key; the disk is checked again
  // after taking it). A missing, truncated, mismatching or corrupt disk entry is a miss (counted
  // in disk_corrupt) that recompiles and overwrites. If the directory is not writable the cache
  // works from memory (and reads the disk if it can). On a compile error the source is written to
  // <dir>/failed/<key>.cpp and the thrown flexjit::Error names that path.
  // `key`: 1-128 characters from [A-Za-z0-9_-] (make_key gives 64 hex digits). `symbol`: the
  // extern "C" entry point the source defines. A key always means the same symbol.
  CachedKernel get_or_compile(const std::string& key, const std::string& symbol,
                              const std::function<std::string()>& make_source);

  // For artifacts that are not loaded into this process (CUDA CUBIN + PTX): disk -> build, with
  // the same key rules, file lock, atomic writes and checksummed manifest, stored as <key>.bin.
  // A bad entry is rebuilt. No memory cache here: the CUDA runtime keeps its loaded modules.
  struct Blob {
    std::string bytes;
    CacheHit hit = CacheHit::Miss;  // Miss (built now) or Disk
    double build_ms = 0;
  };
  Blob get_or_build(const std::string& key, const std::string& symbol,
                    const std::function<std::string()>& build);

  // Writes a kernel's generated source as <dir>/<key><ext> (failed: <dir>/failed/<key><ext>, or a
  // temp dir when the cache is read-only) and returns the path; "" if nothing could be written.
  std::string keep_source(const std::string& key, const std::string& ext, const std::string& text, bool failed);
  // Whether FLEXJIT_DUMP asks for every generated source to be kept.
  static bool dump_sources_requested();

  CacheStats stats() const;
  void clear_memory();  // drop the memory cache (loaded code stays mapped); for tests
  const std::string& dir() const { return dir_; }
  const std::string& prebuilt_dir() const { return prebuilt_dir_; }  // "" when there is none
  bool disk_writable() const { return disk_writable_; }

  // For the CLI's `cache` command.
  struct Entry {
    std::string key;
    long bytes;  // size of the object file
    long mtime;  // seconds since the epoch
  };
  std::vector<Entry> list() const;  // entries with an object file, sorted by key
  size_t clear_disk();  // removes only files this cache writes; returns the number of entries

 private:
  struct Slot;
  CachedKernel load_or_compile(const std::string& key, const std::string& symbol,
                               const std::function<std::string()>& make_source);
  bool try_disk(const std::string& key, const std::string& symbol, bool& corrupt_counted,
                CachedKernel& out);
  bool try_prebuilt(const std::string& key, const std::string& symbol, CachedKernel& out);

  std::string dir_;
  std::string prebuilt_dir_;
  bool disk_writable_ = false;
  mutable std::mutex mu_;  // guards slots_, stats_ and every Slot
  std::unordered_map<std::string, std::shared_ptr<Slot>> slots_;
  CacheStats stats_;
};

}  // namespace flexjit::jit

// Internals shared by the two halves of the kernel cache: cache.cpp (keys, disk entries, blobs;
// LLVM-free) and cache_cpu.cpp (C++ objects compiled and loaded through LLVM). Not for other code.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>

#include "jit/cache.h"

namespace flexjit::jit {

struct KernelCache::Slot {
  std::condition_variable cv;
  bool done = false;
  std::string symbol;
  CachedKernel result;
  std::exception_ptr error;  // the owner's exception, rethrown to the threads that waited
};

namespace detail {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kManifestMagic = "flexjit-kernel-cache 1";
constexpr size_t kMaxObjectBytes = size_t{1} << 30;

double ms_since(Clock::time_point t0);
bool valid_key(const std::string& key);
bool valid_symbol(const std::string& s);
bool dump_sources();  // FLEXJIT_DUMP contains "src"
// Reads a whole regular file; nullopt if it is missing, unreadable or larger than max_bytes.
std::optional<std::string> read_file(const std::string& path, size_t max_bytes);
// Writes dir/name through a temporary file and a rename: readers see all of it or none.
bool write_file_atomic(const std::string& dir, const std::string& name, const std::string& data);
std::string make_manifest(const std::string& key, const std::string& symbol, const std::string& object);

enum class DiskState { Absent, Valid, Corrupt };
// Reads <key>.meta and <key><ext> and checks them against each other and against what is asked for.
DiskState read_entry(const std::string& dir, const std::string& key, const std::string& symbol,
                     std::string& object, const char* ext = ".o");
std::string default_cache_dir();
// The prebuilt tier's directory (jit/cache.h): $FLEXJIT_PREBUILT_DIR, else flexjit-kernels beside
// the binary that holds this code if it exists; "" for none.
std::string default_prebuilt_dir();

// An exclusive flock on `path` for the lifetime of the object; held() is false (and nothing is
// locked) if the file cannot be created, e.g. on a read-only cache dir.
class FileLock {
 public:
  explicit FileLock(const std::string& path) {
    if (path.empty()) return;
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) return;
    int rc;
    do {
      rc = ::flock(fd_, LOCK_EX);  // blocks while another process compiles this key
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

}  // namespace detail
}  // namespace flexjit::jit

// The CPU half of the kernel cache: compiled C++ objects loaded into this process's JIT
// (jit/compile.h, LLVM). The rest of the cache (keys, disk entries, blobs) is LLVM-free in
// cache.cpp, so the CUDA-only build links without this file.
#include <exception>
#include <filesystem>

#include "jit/cache.h"
#include "jit/cache_detail.h"
#include "jit/compile.h"
#include "jit/types.h"

namespace flexjit::jit {

using namespace detail;

std::string make_key(std::vector<std::pair<std::string, std::string>> fields) {
  return make_key(std::move(fields), compiler_identity());
}

CachedKernel KernelCache::get_or_compile(const std::string& key, const std::string& symbol,
                                         const std::function<std::string()>& make_source) {
  FLEXJIT_CHECK(valid_key(key), "a cache key is 1-128 characters of [A-Za-z0-9_-]: '" + key + "'");
  FLEXJIT_CHECK(valid_symbol(symbol), "a kernel symbol is a C identifier: '" + symbol + "'");
  std::shared_ptr<Slot> slot;
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = slots_.find(key);
    if (it != slots_.end()) {
      slot = it->second;
      slot->cv.wait(lock, [&] { return slot->done; });
      if (slot->error) std::rethrow_exception(slot->error);
      FLEXJIT_CHECK(slot->symbol == symbol, "cache key " + key + " was used for two symbols ('" +
                                                slot->symbol + "' and '" + symbol +
                                                "'): the key must cover the symbol name");
      ++stats_.memory_hits;
      CachedKernel r = slot->result;
      r.hit = CacheHit::Memory;
      r.compile_ms = 0;
      r.load_ms = 0;
      r.log.clear();
      return r;
    }
    slot = std::make_shared<Slot>();
    slot->symbol = symbol;
    slots_.emplace(key, slot);
  }

  // This thread owns the slot: load or compile without holding mu_.
  CachedKernel result;
  std::exception_ptr error;
  try {
    result = load_or_compile(key, symbol, make_source);
  } catch (...) {
    error = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    slot->done = true;
    if (error) {
      slot->error = error;
      // Forget the failure, so a later call tries again (e.g. after the user fixes the mod).
      auto it = slots_.find(key);
      if (it != slots_.end() && it->second == slot) slots_.erase(it);
    } else {
      slot->result = result;
    }
  }
  slot->cv.notify_all();
  if (error) std::rethrow_exception(error);
  return result;
}

bool KernelCache::try_disk(const std::string& key, const std::string& symbol, bool& corrupt_counted,
                           CachedKernel& out) {
  auto t0 = Clock::now();
  std::string object;
  DiskState state = read_entry(dir_, key, symbol, object);
  void* fn = nullptr;
  if (state == DiskState::Valid) {
    try {
      fn = load_object(object, symbol);
    } catch (const flexjit::Error&) {
      // The checksum matched but the JIT rejected it (e.g. written by a build whose key did not
      // cover a change): recompile over it.
      state = DiskState::Corrupt;
    }
  }
  if (state == DiskState::Corrupt && !corrupt_counted) {
    corrupt_counted = true;
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.disk_corrupt;
  }
  if (state != DiskState::Valid) return false;
  out.fn = fn;
  out.hit = CacheHit::Disk;
  out.load_ms = ms_since(t0);
  std::string src = dir_ + "/" + key + ".cpp";
  std::error_code ec;
  if (dump_sources() && fs::exists(src, ec)) out.source_path = src;
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.disk_hits;
  return true;
}

// The read-only prebuilt tier (cache.h): a valid entry the JIT accepts is a hit; anything else
// falls through to compiling (nothing there is counted as corrupt, rewritten or removed).
bool KernelCache::try_prebuilt(const std::string& key, const std::string& symbol, CachedKernel& out) {
  if (prebuilt_dir_.empty()) return false;
  auto t0 = Clock::now();
  std::string object;
  if (read_entry(prebuilt_dir_, key, symbol, object) != DiskState::Valid) return false;
  void* fn = nullptr;
  try {
    fn = load_object(object, symbol);
  } catch (const flexjit::Error&) {
    return false;
  }
  out.fn = fn;
  out.hit = CacheHit::Prebuilt;
  out.load_ms = ms_since(t0);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.prebuilt_hits;
  return true;
}

CachedKernel KernelCache::load_or_compile(const std::string& key, const std::string& symbol,
                                          const std::function<std::string()>& make_source) {
  CachedKernel out;
  bool corrupt_counted = false;
  if (try_disk(key, symbol, corrupt_counted, out)) return out;
  if (try_prebuilt(key, symbol, out)) return out;

  // One compile per key across processes: whoever takes the lock first compiles; the others
  // block here and then find its entry on disk.
  std::error_code ec;
  if (disk_writable_) fs::create_directories(dir_ + "/locks", ec);  // clear_disk may remove it
  FileLock lock(disk_writable_ ? dir_ + "/locks/" + key + ".lock" : std::string());
  if (lock.held() && try_disk(key, symbol, corrupt_counted, out)) return out;

  auto t0 = Clock::now();
  std::string source = make_source();
  const bool dump = dump_sources() && disk_writable_;
  // The name Clang's diagnostics use: the dump path when the source is kept there.
  std::string source_name = dump ? dir_ + "/" + key + ".cpp" : key + ".cpp";
  if (dump && write_file_atomic(dir_, key + ".cpp", source)) out.source_path = source_name;

  CompileResult compiled;
  try {
    compiled = compile_cpp_to_object(source, source_name);
  } catch (const flexjit::Error& e) {
    std::string failed_dir = dir_ + "/failed";
    fs::create_directories(failed_dir, ec);
    if (ec || !write_file_atomic(failed_dir, key + ".cpp", source)) {
      // The cache dir is not writable: keep the source somewhere the user can read it.
      failed_dir = fs::temp_directory_path(ec).string() + "/flexjit-failed";
      fs::create_directories(failed_dir, ec);
      if (ec || !write_file_atomic(failed_dir, key + ".cpp", source)) failed_dir.clear();
    }
    std::string where = failed_dir.empty()
                            ? "(the source could not be written to " + dir_ + "/failed or /tmp)"
                            : "the generated source is at " + failed_dir + "/" + key + ".cpp";
    throw flexjit::Error("flexjit: kernel '" + symbol + "' (cache key " + key +
                         ") failed to compile; " + where + ".\n" + e.what());
  }
  out.compile_ms = ms_since(t0);
  out.log = std::move(compiled.log);

  // Load before writing to disk, so an object the JIT rejects never becomes a cache entry.
  t0 = Clock::now();
  out.fn = load_object(compiled.object, symbol);
  out.load_ms = ms_since(t0);
  out.hit = CacheHit::Miss;

  if (disk_writable_) {
    // Object first, manifest second: a reader that sees the new manifest with the old object (or
    // the reverse) gets a checksum mismatch, i.e. a miss.
    if (write_file_atomic(dir_, key + ".o", compiled.object)) {
      write_file_atomic(dir_, key + ".meta", make_manifest(key, symbol, compiled.object));
    }
  }
  std::lock_guard<std::mutex> guard(mu_);
  ++stats_.compiles;
  return out;
}

}  // namespace flexjit::jit

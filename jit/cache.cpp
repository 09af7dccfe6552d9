// Kernel cache: memory slots with one owner per key, disk entries written atomically and checked
// by length + SHA-256 before they are handed to the JIT, and an flock per key across processes.
#include "jit/cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>

#include "jit/types.h"
#include "jit/cache_detail.h"
#include "jit/sha256.h"

#ifndef FLEXJIT_VERSION
#define FLEXJIT_VERSION "0.0.0-dev"
#endif

namespace flexjit::jit {
namespace detail {

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}


bool valid_key(const std::string& key) {
  if (key.empty() || key.size() > 128) return false;
  return std::all_of(key.begin(), key.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
  });
}

bool valid_symbol(const std::string& s) {
  if (s.empty() || (s[0] >= '0' && s[0] <= '9')) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '$' || c == '.';
  });
}

bool dump_sources() {
  const char* d = std::getenv("FLEXJIT_DUMP");
  return d && std::string(d).find("src") != std::string::npos;
}

// Reads a whole regular file; nullopt if it is missing, unreadable or larger than max_bytes.
std::optional<std::string> read_file(const std::string& path, size_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  struct stat st;
  std::optional<std::string> out;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && size_t(st.st_size) <= max_bytes) {
    std::string data(size_t(st.st_size), '\0');
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::read(fd, &data[done], data.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      done += size_t(n);
    }
    if (done == data.size()) out = std::move(data);
  }
  ::close(fd);
  return out;
}

// Writes `data` to a temporary name in `dir`, then renames it onto `dir/name`: readers see the
// old file or the complete new one, never a partial write. No fsync: after a crash an entry may be
// empty or stale, which the manifest's length and checksum turn into a miss.
bool write_file_atomic(const std::string& dir, const std::string& name, const std::string& data) {
  static std::atomic<unsigned long> counter{0};
  std::string tmp =
      dir + "/.tmp-" + name + "." + std::to_string(::getpid()) + "." + std::to_string(++counter);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  size_t done = 0;
  bool ok = true;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ok = false;
      break;
    }
    done += size_t(n);
  }
  ok = (::close(fd) == 0) && ok;
  if (ok) ok = ::rename(tmp.c_str(), (dir + "/" + name).c_str()) == 0;
  if (!ok) ::unlink(tmp.c_str());
  return ok;
}

std::string make_manifest(const std::string& key, const std::string& symbol,
                          const std::string& object) {
  std::string m = kManifestMagic;
  m += "\nkey " + key;
  m += "\nsymbol " + symbol;
  m += "\nbytes " + std::to_string(object.size());
  m += "\nsha256 " + sha256_hex(object);
  m += "\n";
  return m;
}

// Reads <key>.meta and <key>.o and checks them against each other and against what is asked for.
DiskState read_entry(const std::string& dir, const std::string& key, const std::string& symbol,
                     std::string& object, const char* ext) {
  std::string base = dir + "/" + key;
  std::optional<std::string> manifest = read_file(base + ".meta", 4096);
  std::optional<std::string> obj = read_file(base + ext, kMaxObjectBytes);
  if (!manifest && !obj) {
    // Both missing is a plain miss; an unreadable-but-present file is corruption.
    std::error_code ec;
    bool present = fs::exists(base + ".meta", ec) || fs::exists(base + ext, ec);
    return present ? DiskState::Corrupt : DiskState::Absent;
  }
  if (!manifest || !obj) return DiskState::Corrupt;
  // Exact text comparison: a truncated, edited or foreign manifest differs somewhere.
  if (*manifest != make_manifest(key, symbol, *obj)) return DiskState::Corrupt;
  object = std::move(*obj);
  return DiskState::Valid;
}

std::string default_cache_dir() {
  if (const char* d = std::getenv("FLEXJIT_CACHE_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/flexjit";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/flexjit";
  return "/tmp/flexjit-cache-" + std::to_string(::getuid());
}

std::string default_prebuilt_dir() {
  if (const char* d = std::getenv("FLEXJIT_PREBUILT_DIR")) {
    const std::string v = d;
    return v.empty() || v == "off" || v == "0" || v == "none" ? std::string() : v;
  }
  // <directory of the binary holding this code>/flexjit-kernels: the CLI and the torch op library
  // sit beside it in the build tree (and in an install, if it is copied there). The main program's
  // link map has an empty name (dladdr would give argv[0], e.g. a bare "flexjit" found on PATH):
  // it is /proc/self/exe.
  Dl_info info;
  struct link_map* map = nullptr;
  if (::dladdr1(reinterpret_cast<void*>(&default_prebuilt_dir), &info, reinterpret_cast<void**>(&map),
                RTLD_DL_LINKMAP) == 0 || map == nullptr)
    return {};
  const std::string file = map->l_name && *map->l_name ? std::string(map->l_name) : std::string("/proc/self/exe");
  std::error_code ec;
  const fs::path bin = fs::canonical(fs::path(file), ec);
  if (ec) return {};
  const fs::path dir = bin.parent_path() / "flexjit-kernels";
  return fs::is_directory(dir, ec) ? dir.string() : std::string();
}

}  // namespace detail

using namespace detail;

std::string make_key(std::vector<std::pair<std::string, std::string>> fields, const std::string& compiler) {
  fields.emplace_back("flexjit.compiler", compiler);
  fields.emplace_back("flexjit.version", FLEXJIT_VERSION);
  std::sort(fields.begin(), fields.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string text;
  for (size_t i = 0; i < fields.size(); ++i) {
    const std::string& name = fields[i].first;
    FLEXJIT_CHECK(
        !name.empty() && name.find_first_of("=\n") == std::string::npos,
        "cache key field names are non-empty and contain no '=' or newline: '" + name + "'");
    FLEXJIT_CHECK(i == 0 || fields[i - 1].first != name,
                  "cache key field names are unique: '" + name + "' appears twice");
    text += name;
    text += '=';
    for (char c : fields[i].second) {
      if (c == '\\') {
        text += "\\\\";
      } else if (c == '\n') {
        text += "\\n";
      } else {
        text += c;
      }
    }
    text += '\n';
  }
  return sha256_hex(text);
}

const char* cache_hit_name(CacheHit h) {
  switch (h) {
    case CacheHit::Miss:
      return "miss";
    case CacheHit::Memory:
      return "memory";
    case CacheHit::Disk:
      return "disk";
    case CacheHit::Prebuilt:
      return "prebuilt";
  }
  return "?";
}

// One per key in memory. The first thread to ask owns it and fills it; later threads wait on cv
// (under KernelCache::mu_) until done.
KernelCache& KernelCache::global() {
  // Never destroyed: kernels handed out stay callable until exit.
  static KernelCache* cache = new KernelCache(default_cache_dir(), default_prebuilt_dir());
  return *cache;
}

KernelCache::KernelCache(std::string dir, std::string prebuilt_dir)
    : dir_(std::move(dir)), prebuilt_dir_(std::move(prebuilt_dir)) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
  while (prebuilt_dir_.size() > 1 && prebuilt_dir_.back() == '/') prebuilt_dir_.pop_back();
  if (prebuilt_dir_ == dir_) prebuilt_dir_.clear();  // one tier, not two views of it
  std::error_code ec;
  fs::create_directories(dir_, ec);
  disk_writable_ = fs::is_directory(dir_, ec) && ::access(dir_.c_str(), W_OK | X_OK) == 0;
  if (disk_writable_) {
    fs::create_directories(dir_ + "/locks", ec);
    if (ec) disk_writable_ = false;
  }
}

KernelCache::~KernelCache() = default;

KernelCache::Blob KernelCache::get_or_build(const std::string& key, const std::string& symbol,
                                            const std::function<std::string()>& build) {
  FLEXJIT_CHECK(valid_key(key), "a cache key is 1-128 characters of [A-Za-z0-9_-]: '" + key + "'");
  FLEXJIT_CHECK(valid_symbol(symbol), "a kernel symbol is a C identifier: '" + symbol + "'");
  Blob out;
  bool corrupt_counted = false;  // a damaged entry is counted once, though looked at twice
  auto from_disk = [&] {
    std::string bytes;
    DiskState state = read_entry(dir_, key, symbol, bytes, ".bin");
    if (state == DiskState::Corrupt && !corrupt_counted) {
      corrupt_counted = true;
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.disk_corrupt;
    }
    if (state != DiskState::Valid) return false;
    out.bytes = std::move(bytes);
    out.hit = CacheHit::Disk;
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.disk_hits;
    return true;
  };
  if (from_disk()) return out;
  std::error_code ec;
  if (disk_writable_) fs::create_directories(dir_ + "/locks", ec);
  FileLock lock(disk_writable_ ? dir_ + "/locks/" + key + ".lock" : std::string());
  if (lock.held() && from_disk()) return out;
  auto t0 = Clock::now();
  out.bytes = build();
  out.build_ms = ms_since(t0);
  out.hit = CacheHit::Miss;
  if (disk_writable_ && write_file_atomic(dir_, key + ".bin", out.bytes))
    write_file_atomic(dir_, key + ".meta", make_manifest(key, symbol, out.bytes));
  std::lock_guard<std::mutex> guard(mu_);
  ++stats_.compiles;
  return out;
}

std::string KernelCache::keep_source(const std::string& key, const std::string& ext, const std::string& text,
                                     bool failed) {
  std::error_code ec;
  std::string dir = failed ? dir_ + "/failed" : dir_;
  fs::create_directories(dir, ec);
  if (!ec && write_file_atomic(dir, key + ext, text)) return dir + "/" + key + ext;
  if (!failed) return "";
  dir = fs::temp_directory_path(ec).string() + "/flexjit-failed";
  fs::create_directories(dir, ec);
  if (!ec && write_file_atomic(dir, key + ext, text)) return dir + "/" + key + ext;
  return "";
}

bool KernelCache::dump_sources_requested() { return dump_sources(); }

CacheStats KernelCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void KernelCache::clear_memory() {
  // Slots being filled stay alive through their owner's shared_ptr; only the map forgets them.
  std::lock_guard<std::mutex> lock(mu_);
  slots_.clear();
}

std::vector<KernelCache::Entry> KernelCache::list() const {
  std::vector<Entry> entries;
  std::error_code ec;
  for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
    const fs::path& p = it->path();
    if ((p.extension() != ".o" && p.extension() != ".bin") || !valid_key(p.stem().string())) continue;
    struct stat st;
    if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    entries.push_back(Entry{p.stem().string(), long(st.st_size), long(st.st_mtime)});
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.key < b.key; });
  return entries;
}

size_t KernelCache::clear_disk() {
  // Only names this cache writes are removed: FLEXJIT_CACHE_DIR may point somewhere shared.
  size_t entries = 0;
  auto sweep = [&](const std::string& dir, std::initializer_list<const char*> exts) {
    std::error_code ec;
    std::vector<fs::path> doomed;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const fs::path& p = it->path();
      std::string name = p.filename().string();
      bool ours = name.rfind(".tmp-", 0) == 0;
      for (const char* ext : exts) {
        ours = ours || (p.extension() == ext && valid_key(p.stem().string()));
      }
      if (ours) doomed.push_back(p);
    }
    for (const auto& p : doomed) {
      if (fs::remove(p, ec) && (p.extension() == ".o" || p.extension() == ".bin") && dir == dir_) ++entries;
    }
    if (dir != dir_) fs::remove(dir, ec);  // only succeeds when empty
  };
  sweep(dir_, {".o", ".bin", ".meta", ".cpp", ".cu"});
  sweep(dir_ + "/failed", {".cpp"});
  sweep(dir_ + "/locks", {".lock"});
  std::error_code ec;
  if (disk_writable_) fs::create_directories(dir_ + "/locks", ec);  // get_or_compile needs it
  return entries;
}

}  // namespace flexjit::jit

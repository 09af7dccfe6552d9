// The tuning database's storage: bucket keys, the JSON file format, and safe sharing of one file
// between threads (a mutex) and processes (an flock on <file>.lock plus atomic renames).
#include "runtime/tuning_db.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

namespace flexjit::runtime {
namespace {

namespace fs = std::filesystem;
using detail::FileStamp;
using nlohmann::json;
using Entries = std::map<std::string, TunedChoice>;

constexpr const char* kFormat = "flexjit-tuning";
constexpr int kVersion = 1;
// A real database is kilobytes; a file this large is not ours, and reading it would stall a call.
constexpr int64_t kMaxFileBytes = int64_t(64) << 20;

// ---- keys -------------------------------------------------------------------------------------

int64_t round_up_pow2(int64_t n) {
  constexpr int64_t kMax = int64_t(1) << 62;  // the largest power of two an int64_t holds
  if (n <= 1) return 1;
  if (n >= kMax) return kMax;
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Free text inside a space-separated key: blanks would make "engine=a b" read like two fields.
std::string one_token(std::string s) {
  for (char& c : s)
    if (std::isspace(static_cast<unsigned char>(c))) c = '_';
  return s;
}

// Trims and collapses runs of blanks, so "Intel(R) Xeon(R) CPU   @ 2.2GHz" (padded in some
// /proc/cpuinfo versions) and a hand-typed model give the same key.
std::string collapse_blanks(const std::string& s) {
  std::string out;
  bool pending_space = false;
  for (char c : s) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += c;
  }
  return out;
}

std::string read_cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string model = collapse_blanks(line.substr(colon + 1));
    if (!model.empty()) return model;
  }
  return "unknown";  // e.g. many aarch64 kernels have no "model name" line
}

// ---- the file format --------------------------------------------------------------------------

// Each reader checks range as well as type, so every file store() can write reads back, and a
// hand-edited value that store() would refuse makes the file malformed.
bool read_int(const json& o, const char* name, int64_t max, int64_t& out, std::string& why) {
  auto it = o.find(name);
  if (it == o.end() || !it->is_number_integer()) {
    why = std::string("\"") + name + "\" is missing or not an integer";
    return false;
  }
  bool too_big = it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(max);
  if (too_big || it->get<int64_t>() < 0) {
    why = std::string("\"") + name + "\" = " + it->dump() + " is out of range";
    return false;
  }
  out = it->get<int64_t>();
  return true;
}

bool read_time(const json& o, const char* name, double& out, std::string& why) {
  auto it = o.find(name);
  if (it == o.end() || !it->is_number() || !std::isfinite(it->get<double>()) ||
      it->get<double>() < 0) {
    why = std::string("\"") + name + "\" is missing or not a finite number >= 0";
    return false;
  }
  out = it->get<double>();
  return true;
}

bool read_text(const json& o, const char* name, std::string& out, std::string& why) {
  auto it = o.find(name);
  if (it == o.end() || !it->is_string()) {
    why = std::string("\"") + name + "\" is missing or not a string";
    return false;
  }
  out = it->get<std::string>();
  return true;
}

bool parse_choice(const json& e, TunedChoice& c, std::string& why) {
  if (!e.is_object()) {
    why = "not an object";
    return false;
  }
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  int64_t bm = 0, bn = 0;
  bool ok =
      read_int(e, "block_m", kIntMax, bm, why) && read_int(e, "block_n", kIntMax, bn, why) &&
      read_int(e, "partition_size", std::numeric_limits<int64_t>::max(), c.partition_size, why) &&
      read_time(e, "us", c.us, why) && read_time(e, "default_us", c.default_us, why) &&
      read_text(e, "tuned_at", c.tuned_at, why) && read_text(e, "detail", c.detail, why) &&
      (!e.contains("engine") || read_text(e, "engine", c.engine, why));
  c.block_m = int(bm);
  c.block_n = int(bn);
  return ok;
}

// The entries of a valid database; nullopt with `why` set for anything else. Unknown extra
// fields are ignored so a later version-1 writer may add some.
std::optional<Entries> parse_db(const std::string& text, std::string& why) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    why = std::string("not valid JSON: ") + e.what();
    return std::nullopt;
  }
  if (!j.is_object() || j.value("format", json()) != kFormat) {
    why = std::string("\"format\" is not \"") + kFormat + "\"";
    return std::nullopt;
  }
  if (j.value("version", json()) != kVersion) {
    why = "\"version\" is " + j.value("version", json()).dump() + ", this flexjit reads version " +
          std::to_string(kVersion);
    return std::nullopt;
  }
  auto entries = j.find("entries");
  if (entries == j.end() || !entries->is_object()) {
    why = "\"entries\" is missing or not an object";
    return std::nullopt;
  }
  Entries out;
  for (auto it = entries->begin(); it != entries->end(); ++it) {
    if (!parse_choice(it.value(), out[it.key()], why)) {
      why = "entry \"" + it.key() + "\": " + why;
      return std::nullopt;
    }
  }
  return out;
}

// ordered_json keeps the header first and the fields in the documented order for human readers.
std::string dump_db(const Entries& entries) {
  using ojson = nlohmann::ordered_json;
  ojson list = ojson::object();
  for (const auto& [key, c] : entries) {  // std::map: already sorted by key
    list[key] = {
        {"block_m", c.block_m}, {"block_n", c.block_n},       {"partition_size", c.partition_size},
        {"us", c.us},           {"default_us", c.default_us}, {"tuned_at", c.tuned_at},
        {"detail", c.detail}};
    if (!c.engine.empty()) list[key]["engine"] = c.engine;
  }
  ojson j = {{"format", kFormat}, {"version", kVersion}, {"entries", std::move(list)}};
  // `replace`: a detail string with invalid UTF-8 must not make store() throw a JSON error.
  return j.dump(2, ' ', false, ojson::error_handler_t::replace) + "\n";
}

// A time that JSON cannot hold (NaN, inf) would be written as null and then make the whole file
// malformed for every reader, so it is refused here instead.
void check_choice(const std::string& path, const TunedChoice& c) {
  auto bad = [](double t) { return !std::isfinite(t) || t < 0; };
  if (bad(c.us) || bad(c.default_us)) {
    throw Error("tuning database " + path + ": cannot store a choice with us=" +
                std::to_string(c.us) + ", default_us=" + std::to_string(c.default_us) +
                "; times must be finite and >= 0 (do not store a failed measurement)");
  }
  if (c.block_m < 0 || c.block_n < 0 || c.partition_size < 0) {
    throw Error("tuning database " + path + ": cannot store negative knobs (BLOCK_M=" +
                std::to_string(c.block_m) + ", BLOCK_N=" + std::to_string(c.block_n) +
                ", PARTITION_SIZE=" + std::to_string(c.partition_size) +
                "); use 0 for a knob that is not part of the choice");
  }
}

// ---- files ------------------------------------------------------------------------------------

int64_t to_ns(const timespec& t) { return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec; }

FileStamp stamp_of(const struct stat& st) {
  FileStamp s;
  s.exists = true;
  s.dev = uint64_t(st.st_dev);
  s.ino = uint64_t(st.st_ino);
  s.size = int64_t(st.st_size);
  s.mtime_ns = to_ns(st.st_mtim);
  s.ctime_ns = to_ns(st.st_ctim);
  return s;
}

// Absent (ENOENT, or a parent that is not a directory) and unreachable both give exists=false:
// either way there is nothing to read.
FileStamp stat_stamp(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return FileStamp{};
  return stamp_of(st);
}

struct Snapshot {
  FileStamp stamp;  // of the content in `text` (fstat of the descriptor that was read)
  std::string text;
  int read_errno = 0;  // present but unreadable (EACCES, EISDIR, EIO, ...)
  bool too_large = false;
};

Snapshot read_snapshot(const std::string& path) {
  Snapshot s;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno != ENOENT && errno != ENOTDIR) {
      s.read_errno = errno;
      s.stamp = stat_stamp(path);
    }
    return s;
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    s.read_errno = errno;
  } else if (!S_ISREG(st.st_mode)) {
    s.stamp = stamp_of(st);
    s.read_errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
  } else if (int64_t(st.st_size) > kMaxFileBytes) {
    s.stamp = stamp_of(st);
    s.too_large = true;
  } else {
    s.stamp = stamp_of(st);
    s.text.resize(size_t(st.st_size));
    size_t done = 0;
    while (done < s.text.size()) {
      ssize_t n = ::read(fd, s.text.data() + done, s.text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) s.read_errno = errno;
      if (n <= 0) break;  // a short file is a truncated one; the parser will say so
      done += size_t(n);
    }
    s.text.resize(done);
  }
  ::close(fd);
  return s;
}

int write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EIO;
    done += size_t(n);
  }
  return 0;
}

// Unique among threads and processes; O_EXCL catches the rest. The pid matters after fork(),
// when a child's generator starts from its parent's state.
std::string tmp_name(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t seed = std::random_device{}();
  uint64_t r = seed ^ (++counter * 0x9E3779B97F4A7C15ull) ^ uint64_t(::getpid()) << 40;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(r));
  return path + ".tmp-" + std::to_string(::getpid()) + "-" + hex;
}

// Makes a finished rename durable; best effort (some filesystems refuse fsync on a directory).
void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// An exclusive flock on `path` for the lifetime of the object. flock() locks belong to the open
// file description, so two TuningDb objects in one process exclude each other too.
class FileLock {
 public:
  explicit FileLock(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      err_ = errno;
      return;
    }
    int rc;
    do {
      rc = ::flock(fd_, LOCK_EX);  // waits while another process stores
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      err_ = errno;
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);  // closing the descriptor releases the flock
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  bool held() const { return fd_ >= 0; }
  int error() const { return err_; }

 private:
  int fd_ = -1;
  int err_ = 0;
};

std::string parent_dir(const std::string& path) { return fs::path(path).parent_path().string(); }

}  // namespace

bool detail::FileStamp::operator==(const FileStamp& o) const {
  return exists == o.exists && dev == o.dev && ino == o.ino && size == o.size &&
         mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
}

// ---- TuningBucket -------------------------------------------------------------------------------

int64_t TuningBucket::lq_bucket() const { return round_up_pow2(lq); }
int64_t TuningBucket::lkv_bucket() const { return round_up_pow2(lkv); }
int64_t TuningBucket::work_bucket() const { return round_up_pow2(work); }

std::string TuningBucket::key() const {
  std::string k = one_token(path);
  k += ' ';
  k += dtype_name(dtype);
  k += " D=" + std::to_string(head_dim);
  k += " Dv=" + std::to_string(head_dim_v);
  k += " G=" + std::to_string(gqa_group);
  k += " Lq<=" + std::to_string(lq_bucket());
  k += " Lkv<=" + std::to_string(lkv_bucket());
  k += " work<=" + std::to_string(work_bucket());
  k += paged ? " paged=1" : " paged=0";
  k += " threads=" + std::to_string(threads);
  k += " engine=" + one_token(engine);
  k += " cpu=" + (cpu.empty() ? host_cpu_model() : collapse_blanks(cpu));
  return k;
}

const std::string& host_cpu_model() {
  static const std::string model = read_cpu_model();
  return model;
}

// ---- TuningDb -----------------------------------------------------------------------------------

TuningDb& TuningDb::global() {
  // Never destroyed: a static destructor or a detached thread may still look up during exit.
  static TuningDb* db = new TuningDb(default_path());
  return *db;
}

std::string TuningDb::default_path() {
  // The kernel cache's rule (jit/cache.cpp default_cache_dir), repeated to keep the JIT unlinked.
  std::string dir;
  if (const char* d = std::getenv("FLEXJIT_CACHE_DIR"); d && *d) {
    dir = d;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) {
    dir = std::string(x) + "/flexjit";
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    dir = std::string(h) + "/.cache/flexjit";
  } else {
    dir = "/tmp/flexjit-cache-" + std::to_string(::getuid());
  }
  return dir + "/tuning.json";
}

TuningDb::TuningDb(std::string file_path)
    : path_(std::move(file_path)), lock_path_(path_ + ".lock") {}

const std::string& TuningDb::path() const { return path_; }

std::vector<std::string> TuningDb::notes() const {
  std::lock_guard<std::mutex> g(mu_);
  return notes_;
}

void TuningDb::set_recheck_interval(std::chrono::milliseconds interval) {
  std::lock_guard<std::mutex> g(mu_);
  recheck_interval_ = interval;
}

std::optional<TunedChoice> TuningDb::lookup(const TuningBucket& b) {
  std::string key = b.key();
  std::lock_guard<std::mutex> g(mu_);
  refresh_if_stale();
  auto it = entries_.find(key);
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::pair<std::string, TunedChoice>> TuningDb::entries() {
  std::lock_guard<std::mutex> g(mu_);
  refresh_if_stale();
  return {entries_.begin(), entries_.end()};
}

void TuningDb::store(const TuningBucket& b, const TunedChoice& c) {
  check_choice(path_, c);
  std::string key = b.key();
  std::lock_guard<std::mutex> g(mu_);
  ensure_dir();
  FileLock lock(lock_path_);
  if (!lock.held()) fail("cannot create or lock " + lock_path_, std::strerror(lock.error()));
  // Re-read under the lock: entries other processes stored since our last read must survive.
  if (int err = reload(true))
    fail("cannot read the existing file to add to it", std::strerror(err));
  Entries next = entries_;
  next[key] = c;
  write_db(next);
  entries_ = std::move(next);
  stamp_ = stat_stamp(path_);
  last_check_ = std::chrono::steady_clock::now();
}

size_t TuningDb::clear() {
  std::lock_guard<std::mutex> g(mu_);
  loaded_ = true;
  last_check_ = std::chrono::steady_clock::now();
  if (!stat_stamp(path_).exists) {  // nothing stored; do not create a cache dir just to say so
    entries_.clear();
    stamp_ = FileStamp{};
    return 0;
  }
  FileLock lock(lock_path_);
  if (!lock.held()) fail("cannot create or lock " + lock_path_, std::strerror(lock.error()));
  if (int err = reload(true)) fail("cannot read the existing file to clear it", std::strerror(err));
  size_t removed = entries_.size();
  write_db({});
  entries_.clear();
  stamp_ = stat_stamp(path_);
  return removed;
}

// Cheap on the hot path: within the interval this is one steady_clock read; after it, one stat().
void TuningDb::refresh_if_stale() {
  auto now = std::chrono::steady_clock::now();
  if (loaded_ && now - last_check_ < recheck_interval_) return;
  last_check_ = now;
  if (loaded_ && stat_stamp(path_) == stamp_) return;
  reload(false);
}

// Replaces entries_ with the file's content. A bad file is set aside, which needs the flock:
// renaming without it could move away a good file that a concurrent store() had just renamed into
// place. Returns 0, or the errno of a file that is present but cannot be read (left in place).
int TuningDb::reload(bool have_flock) {
  Snapshot snap = read_snapshot(path_);
  loaded_ = true;
  stamp_ = snap.stamp;  // a bad file is not re-examined until it changes
  entries_.clear();
  if (snap.read_errno) {
    notes_.push_back("cannot read " + path_ + " (" + std::strerror(snap.read_errno) +
                     "); no tunings are used. Fix its permissions or delete it.");
    return snap.read_errno;
  }
  if (!snap.stamp.exists) return 0;
  std::string why = "larger than 64 MiB";
  if (!snap.too_large) {
    if (auto parsed = parse_db(snap.text, why)) {
      entries_ = std::move(*parsed);
      return 0;
    }
  }
  if (!have_flock) {
    FileLock lock(lock_path_);
    if (lock.held()) return reload(true);
    notes_.push_back(path_ + " is not a valid tuning database (" + why +
                     ") and cannot be set aside (cannot lock " + lock_path_ + ": " +
                     std::strerror(lock.error()) + "); no tunings are used. Delete it.");
    return 0;
  }
  if (set_aside(why)) stamp_ = stat_stamp(path_);
  return 0;
}

// Renames the bad file out of the way (kept for inspection) so the next store() starts clean.
bool TuningDb::set_aside(const std::string& why) {
  std::string base =
      path_ + ".bad-" + std::to_string(std::time(nullptr)) + "-" + std::to_string(::getpid());
  std::string target = base;
  // A second bad file in the same second would otherwise replace the first one's evidence.
  for (int i = 1; stat_stamp(target).exists; ++i) target = base + "-" + std::to_string(i);
  if (::rename(path_.c_str(), target.c_str()) != 0) {
    notes_.push_back(path_ + " is not a valid tuning database (" + why +
                     ") and cannot be renamed to " + target + " (" + std::strerror(errno) +
                     "); no tunings are used. Delete it.");
    return false;
  }
  notes_.push_back("set aside " + path_ + " as " + target + ": " + why +
                   ". Its tunings are ignored; `flexjit tune` stores new ones.");
  return true;
}

void TuningDb::ensure_dir() const {
  std::string dir = parent_dir(path_);
  if (dir.empty()) return;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create the directory " + dir, ec.message());
}

// Readers see the old file or the complete new one, never a partial write.
void TuningDb::write_db(const Entries& entries) const {
  std::string text = dump_db(entries);
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
    tmp = tmp_name(path_);
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) fail("cannot create " + tmp, std::strerror(errno));
  int err = write_all(fd, text);
  // fsync before rename: after a crash, a renamed file whose data never reached the disk would be
  // empty, and the next reader would set aside every tuning with it.
  if (!err && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && !err) err = errno;
  if (!err && ::rename(tmp.c_str(), path_.c_str()) != 0) err = errno;
  if (err) {
    ::unlink(tmp.c_str());
    fail("cannot write " + tmp + " and rename it over the database", std::strerror(err));
  }
  fsync_dir(parent_dir(path_));
}

void TuningDb::fail(const std::string& what, const std::string& reason) const {
  std::string dir = parent_dir(path_);
  throw Error("tuning database " + path_ + ": " + what + ": " + reason + ". Make " +
              (dir.empty() ? std::string(".") : dir) +
              " a writable directory, or set FLEXJIT_CACHE_DIR to one (the database is then "
              "$FLEXJIT_CACHE_DIR/tuning.json).");
}

}  // namespace flexjit::runtime

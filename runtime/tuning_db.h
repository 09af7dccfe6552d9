// The persistent autotuning database: which kernel knobs (BLOCK_M, BLOCK_N, PARTITION_SIZE) won
// for a shape bucket, stored as JSON next to the kernel cache so `flexjit tune` runs once and
// every later process reuses the result. Storage only: no timing, no kernels.
//
// File (<cache dir>/tuning.json):
//   {"format": "flexjit-tuning", "version": 1,
//    "entries": {"<TuningBucket::key()>": {"block_m": 0, "block_n": 64, "partition_size": 512,
//                "us": 41.5, "default_us": 57.0, "tuned_at": "2025-01-31T12:00:00Z",
//                "detail": "12 candidates, 5 reps"}}}
// and, for choices that name an engine (CUDA prefill), "engine": "wgmma2".
// A file that is not this (bad JSON, another format or version, a malformed entry) is renamed to
// tuning.json.bad-<unix time>-<pid> and the database starts empty; it is never a crash.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "jit/types.h"  // flexjit::DType, dtype_name(), flexjit::Error

namespace flexjit::runtime {

// What a tuned choice applies to. Raw sizes go in; key() buckets them.
struct TuningBucket {
  std::string path = "decode";  // "decode" or "prefill"
  DType dtype = DType::F32;
  int head_dim = 64, head_dim_v = 64, gqa_group = 1;
  int64_t lq = 1;    // query rows per sequence
  int64_t lkv = 1;   // KV length (longest sequence)
  int64_t work = 1;  // independent (batch, head) work items of the call
  bool paged = false;
  int threads = 1;
  std::string engine;  // "fma", "amx", "dot" ... (free text, part of the key)
  std::string cpu;     // CPU model (part of the key); empty -> key() uses host_cpu_model()

  // Canonical text, e.g.
  // "decode bf16 D=128 Dv=128 G=4 Lq<=1 Lkv<=32768 work<=4 paged=0 threads=2 engine=dot cpu=AMD.."
  // lq, lkv and work round UP to a power of two (3 -> 4, 4097 -> 8192, 1 -> 1; values < 1 -> 1).
  // Whitespace inside `engine` becomes '_' so the key stays one token per field.
  std::string key() const;
  // Upper bounds of the buckets (what key() prints), for callers that tune at the bucket edge.
  int64_t lq_bucket() const;
  int64_t lkv_bucket() const;
  int64_t work_bucket() const;
};

struct TunedChoice {
  int block_m = 0, block_n = 0;  // 0 = not part of the choice
  int64_t partition_size = 0;    // 0 = not part of the choice
  double us = 0;                 // measured median time of the winner (microseconds)
  double default_us = 0;         // measured median time of the untuned default, same run
  std::string tuned_at;          // ISO-8601 UTC time of the measurement
  std::string detail;            // free text, e.g. "12 candidates, 5 reps"
  // The kernel engine the choice runs on, where the bucket leaves it open (CUDA prefill: "mma",
  // "wgmma", "wgmma2"; CPU decode on AMX hosts: "dot", "amx"); "" = not part of the choice.
  // Stored only when set.
  std::string engine;
};

// The CPU model name from /proc/cpuinfo ("model name" of the first CPU), trimmed, with runs of
// blanks collapsed to one space; "unknown" if absent. Read once per process.
const std::string& host_cpu_model();

namespace detail {
// Identity of a file's content as stat() sees it; equal stamps mean "no need to re-read". Every
// write renames a fresh inode into place, so the stamp changes with each write even when two
// writes fall into one mtime tick.
struct FileStamp {
  bool exists = false;
  uint64_t dev = 0, ino = 0;
  int64_t size = 0, mtime_ns = 0, ctime_ns = 0;
  bool operator==(const FileStamp& o) const;
};
}  // namespace detail

class TuningDb {
 public:
  // The process-wide database at default_path().
  static TuningDb& global();
  // <dir>/tuning.json, <dir> = FLEXJIT_CACHE_DIR, else $XDG_CACHE_HOME/flexjit, else
  // $HOME/.cache/flexjit, else /tmp/flexjit-cache-<uid> (the kernel cache's rule).
  static std::string default_path();

  explicit TuningDb(std::string file_path);
  TuningDb(const TuningDb&) = delete;
  TuningDb& operator=(const TuningDb&) = delete;

  // The bucket's entry, or nullopt. Never throws for a bad, missing or unreadable file. Sees
  // another process's store() once the recheck interval has passed.
  std::optional<TunedChoice> lookup(const TuningBucket& b);

  // Adds or replaces the bucket's entry, keeping entries other processes wrote meanwhile
  // (read-modify-write under an flock on <file>.lock, atomic rename). Throws flexjit::Error
  // naming the path if the directory cannot be created or written, or if `c` has a non-finite
  // or negative time (JSON cannot hold NaN/inf).
  void store(const TuningBucket& b, const TunedChoice& c);

  // All entries (key, choice), sorted by key.
  std::vector<std::pair<std::string, TunedChoice>> entries();
  // Removes every entry (writes an empty database under the lock); returns how many there were.
  // A database file that does not exist is left absent (nothing is created) and gives 0.
  size_t clear();

  const std::string& path() const;
  // Human-readable notes about files set aside (or unreadable) during this process.
  std::vector<std::string> notes() const;

  // How often lookup() may stat() the file to notice other processes' writes (default 100 ms).
  // Zero checks on every lookup; tests use it to avoid sleeping.
  void set_recheck_interval(std::chrono::milliseconds interval);

 private:
  using Entries = std::map<std::string, TunedChoice>;

  void refresh_if_stale();
  int reload(bool have_flock);
  bool set_aside(const std::string& why);
  void ensure_dir() const;
  void write_db(const Entries& entries) const;
  [[noreturn]] void fail(const std::string& what, const std::string& reason) const;

  std::string path_, lock_path_;
  mutable std::mutex mu_;  // guards everything below
  bool loaded_ = false;
  Entries entries_;
  detail::FileStamp stamp_;  // of the file entries_ came from
  std::chrono::steady_clock::time_point last_check_{};
  std::chrono::milliseconds recheck_interval_{100};
  std::vector<std::string> notes_;
};

}  // namespace flexjit::runtime

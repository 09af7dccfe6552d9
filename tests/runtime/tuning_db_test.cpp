// LABELS: unit cache
// runtime/tuning_db: bucket keys, persistence across instances, bad files set aside (truncated,
// foreign version, wrong format, malformed entry, garbage) and rebuilt by the next store, stores
// from forked processes and from threads all kept, another instance's store seen without
// reopening, and unwritable or unreadable locations.
#include "runtime/tuning_db.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "jit/types.h"

namespace flexjit::runtime {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

bool parses_as_json(const std::string& path) {
  return !nlohmann::json::parse(read_text(path), nullptr, false).is_discarded();
}

// A bucket per (group, i): `engine` makes every pair distinct, lkv varies the bucket too.
TuningBucket bucket(int group, int i) {
  TuningBucket b;
  b.dtype = DType::BF16;
  b.head_dim = b.head_dim_v = 128;
  b.lkv = int64_t(1) << (i % 20);
  b.engine = "g" + std::to_string(group) + "-" + std::to_string(i);
  b.cpu = "Test CPU";
  return b;
}

TunedChoice choice(int n) {
  TunedChoice c;
  c.block_n = 16 * (n + 1);
  c.partition_size = 256 * (n + 1);
  c.us = 10.5 + n;
  c.default_us = 20.25 + n;
  c.tuned_at = "2025-01-31T12:00:00Z";
  c.detail = "choice " + std::to_string(n);
  return c;
}

// A fresh directory per test, removed afterwards.
class TuningDbTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "flexjit-tuning-test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/tuning.json";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  // Files in dir_ whose name starts with `prefix`, e.g. "tuning.json.bad-".
  std::vector<std::string> files_starting(const std::string& prefix) const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) {
      std::string name = e.path().filename().string();
      if (name.rfind(prefix, 0) == 0) out.push_back(e.path().string());
    }
    return out;
  }
  std::string dir_, path_;
};

// ---- keys ---------------------------------------------------------------------------------------

TEST(TuningBucketKey, CanonicalText) {
  TuningBucket b;
  b.dtype = DType::BF16;
  b.head_dim = b.head_dim_v = 128;
  b.gqa_group = 4;
  b.lq = 1;
  b.lkv = 20000;
  b.work = 3;
  b.threads = 2;
  b.engine = "dot";
  b.cpu = "AMD EPYC 9654 96-Core Processor";
  EXPECT_EQ(b.key(),
            "decode bf16 D=128 Dv=128 G=4 Lq<=1 Lkv<=32768 work<=4 paged=0 threads=2 engine=dot "
            "cpu=AMD EPYC 9654 96-Core Processor");
}

TEST(TuningBucketKey, SizesRoundUpToPowersOfTwo) {
  TuningBucket b;
  struct Case {
    int64_t raw, bucket;
  };
  for (Case c : {Case{1, 1}, Case{2, 2}, Case{3, 4}, Case{17, 32}, Case{4096, 4096},
                 Case{4097, 8192}, Case{0, 1}, Case{-5, 1}}) {
    b.lq = b.lkv = b.work = c.raw;
    EXPECT_EQ(b.lq_bucket(), c.bucket) << "raw " << c.raw;
    EXPECT_EQ(b.lkv_bucket(), c.bucket) << "raw " << c.raw;
    EXPECT_EQ(b.work_bucket(), c.bucket) << "raw " << c.raw;
  }
  b.lq = 3;
  b.lkv = 4097;
  b.work = 1;
  EXPECT_NE(b.key().find(" Lq<=4 Lkv<=8192 work<=1 "), std::string::npos) << b.key();
  b.lkv = int64_t(1) << 62;
  EXPECT_EQ(b.lkv_bucket(), int64_t(1) << 62);  // no overflow at the top
  b.lkv = (int64_t(1) << 62) + 1;
  EXPECT_EQ(b.lkv_bucket(), int64_t(1) << 62);
}

TEST(TuningBucketKey, SameBucketSameKeyDistinctBucketsDistinctKeys) {
  TuningBucket base;
  base.cpu = "Test CPU";
  TuningBucket same = base;
  base.lkv = 3000;
  same.lkv = 4096;  // same power-of-two bucket
  EXPECT_EQ(base.key(), same.key());

  std::vector<TuningBucket> variants(12, base);
  variants[1].path = "prefill";
  variants[2].dtype = DType::BF16;
  variants[3].head_dim = 128;
  variants[4].head_dim_v = 128;
  variants[5].gqa_group = 4;
  variants[6].lq = 2;
  variants[7].lkv = 5000;
  variants[8].work = 2;
  variants[9].paged = true;
  variants[10].threads = 8;
  variants[11].engine = "amx";
  std::set<std::string> keys;
  for (const auto& v : variants) keys.insert(v.key());
  EXPECT_EQ(keys.size(), variants.size());
  TuningBucket other_cpu = base;
  other_cpu.cpu = "Other CPU";
  EXPECT_EQ(keys.count(other_cpu.key()), 0u);
}

TEST(TuningBucketKey, CpuDefaultsToHostModel) {
  const std::string& host = host_cpu_model();
  ASSERT_FALSE(host.empty());
  EXPECT_NE(host.front(), ' ');
  EXPECT_NE(host.back(), ' ');
  EXPECT_EQ(host.find('\n'), std::string::npos);
  TuningBucket b;
  std::string k = b.key();
  ASSERT_GT(k.size(), host.size() + 5);
  EXPECT_EQ(k.substr(k.size() - host.size() - 5), " cpu=" + host) << k;
  b.cpu = host;
  EXPECT_EQ(b.key(), k);  // spelling out the host model is the same bucket
}

TEST(TuningBucketKey, BlanksInFreeTextDoNotSplitFields) {
  TuningBucket b;
  b.engine = "my engine";
  b.cpu = "  Some   CPU  @ 2GHz ";
  EXPECT_NE(b.key().find(" engine=my_engine cpu=Some CPU @ 2GHz"), std::string::npos) << b.key();
}

TEST(TuningDbPath, FollowsTheKernelCacheRule) {
  struct Saved {
    const char* name;
    std::optional<std::string> value;
  };
  std::vector<Saved> saved;
  for (const char* n : {"FLEXJIT_CACHE_DIR", "XDG_CACHE_HOME", "HOME"}) {
    const char* v = std::getenv(n);
    saved.push_back({n, v ? std::optional<std::string>(v) : std::nullopt});
  }
  ::setenv("FLEXJIT_CACHE_DIR", "/a/cache", 1);
  ::setenv("XDG_CACHE_HOME", "/xdg", 1);
  ::setenv("HOME", "/home/u", 1);
  EXPECT_EQ(TuningDb::default_path(), "/a/cache/tuning.json");
  ::setenv("FLEXJIT_CACHE_DIR", "", 1);  // empty means unset, as for the kernel cache
  EXPECT_EQ(TuningDb::default_path(), "/xdg/flexjit/tuning.json");
  ::unsetenv("XDG_CACHE_HOME");
  EXPECT_EQ(TuningDb::default_path(), "/home/u/.cache/flexjit/tuning.json");
  for (const auto& s : saved) {
    if (s.value)
      ::setenv(s.name, s.value->c_str(), 1);
    else
      ::unsetenv(s.name);
  }
  EXPECT_EQ(TuningDb::global().path(), TuningDb::default_path());
}

// ---- persistence --------------------------------------------------------------------------------

TEST_F(TuningDbTest, MissingFileIsAnEmptyDatabase) {
  TuningDb db(path_);
  EXPECT_FALSE(db.lookup(bucket(0, 0)).has_value());
  EXPECT_TRUE(db.entries().empty());
  EXPECT_EQ(db.clear(), 0u);
  EXPECT_TRUE(db.notes().empty());
  EXPECT_TRUE(fs::is_empty(dir_));  // looking and clearing create nothing
}

TEST_F(TuningDbTest, StoreThenLookupHereAndInANewInstance) {
  TuningBucket b = bucket(0, 12);
  TunedChoice c = choice(3);
  c.block_m = 32;
  {
    TuningDb db(path_);
    db.store(b, c);
    auto got = db.lookup(b);
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(got->partition_size, c.partition_size);
  }
  TuningDb fresh(path_);
  TuningBucket same_bucket = b;
  same_bucket.lkv = b.lkv - 1;  // 4095 -> 4096, same bucket as 4096
  auto got = fresh.lookup(same_bucket);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->block_m, 32);
  EXPECT_EQ(got->block_n, c.block_n);
  EXPECT_EQ(got->partition_size, c.partition_size);
  EXPECT_EQ(got->us, c.us);
  EXPECT_EQ(got->default_us, c.default_us);
  EXPECT_EQ(got->tuned_at, c.tuned_at);
  EXPECT_EQ(got->detail, c.detail);
  EXPECT_FALSE(fresh.lookup(bucket(0, 13)).has_value());

  auto j = nlohmann::json::parse(read_text(path_));
  EXPECT_EQ(j["format"], "flexjit-tuning");
  EXPECT_EQ(j["version"], 1);
  EXPECT_EQ(j["entries"].size(), 1u);
  EXPECT_TRUE(j["entries"].contains(b.key()));
}

TEST_F(TuningDbTest, StoreReplacesTheBucketsEntry) {
  TuningDb db(path_);
  db.store(bucket(0, 1), choice(1));
  db.store(bucket(0, 2), choice(2));
  db.store(bucket(0, 1), choice(7));
  EXPECT_EQ(db.lookup(bucket(0, 1))->detail, "choice 7");
  TuningDb fresh(path_);
  auto all = fresh.entries();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_LT(all[0].first, all[1].first);  // sorted by key
  EXPECT_EQ(fresh.lookup(bucket(0, 1))->detail, "choice 7");
  EXPECT_EQ(fresh.lookup(bucket(0, 2))->detail, "choice 2");
}

TEST_F(TuningDbTest, ClearRemovesEveryEntry) {
  TuningDb db(path_);
  for (int i = 0; i < 3; ++i) db.store(bucket(0, i), choice(i));
  EXPECT_EQ(db.clear(), 3u);
  EXPECT_TRUE(db.entries().empty());
  EXPECT_TRUE(parses_as_json(path_));
  TuningDb fresh(path_);
  EXPECT_FALSE(fresh.lookup(bucket(0, 0)).has_value());
  db.store(bucket(0, 5), choice(5));  // usable after clearing
  EXPECT_EQ(TuningDb(path_).entries().size(), 1u);
}

TEST_F(TuningDbTest, StoreRefusesTimesJsonCannotHold) {
  TuningDb db(path_);
  db.store(bucket(0, 0), choice(0));
  TunedChoice bad = choice(1);
  bad.us = std::nan("");
  EXPECT_THROW(db.store(bucket(0, 1), bad), Error);
  bad = choice(1);
  bad.default_us = INFINITY;
  EXPECT_THROW(db.store(bucket(0, 1), bad), Error);
  bad = choice(1);
  bad.block_n = -1;
  EXPECT_THROW(db.store(bucket(0, 1), bad), Error);
  TuningDb fresh(path_);  // the file is untouched and still valid
  EXPECT_EQ(fresh.entries().size(), 1u);
  EXPECT_TRUE(fresh.notes().empty());
}

// ---- bad files ----------------------------------------------------------------------------------

// After a bad file: lookups miss without throwing, the file is renamed to tuning.json.bad-*
// with its bytes intact, a note says so, and the next store writes a clean file.
void expect_set_aside_then_rebuilt(const std::string& dir, const std::string& path,
                                   const std::string& bad_text) {
  write_text(path, bad_text);
  TuningDb db(path);
  std::optional<TunedChoice> got;
  EXPECT_NO_THROW(got = db.lookup(bucket(0, 0)));
  EXPECT_FALSE(got.has_value());
  EXPECT_FALSE(fs::exists(path));
  std::vector<std::string> bad;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind("tuning.json.bad-", 0) == 0) bad.push_back(e.path());
  }
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_EQ(read_text(bad[0]), bad_text);
  ASSERT_EQ(db.notes().size(), 1u);
  EXPECT_NE(db.notes()[0].find("set aside " + path), std::string::npos) << db.notes()[0];

  db.store(bucket(0, 9), choice(9));
  ASSERT_TRUE(parses_as_json(path));
  TuningDb fresh(path);
  auto all = fresh.entries();
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].first, bucket(0, 9).key());
}

TEST_F(TuningDbTest, TruncatedFileIsSetAside) {
  {
    TuningDb db(path_);
    for (int i = 0; i < 4; ++i) db.store(bucket(0, i), choice(i));
  }
  std::string full = read_text(path_);
  expect_set_aside_then_rebuilt(dir_, path_, full.substr(0, full.size() / 2));
}

struct BadFileCase {
  const char* name;
  std::string text;
};

class BadFile : public TuningDbTest, public ::testing::WithParamInterface<BadFileCase> {};

TEST_P(BadFile, IsSetAsideAndRebuilt) {
  expect_set_aside_then_rebuilt(dir_, path_, GetParam().text);
}

const char kGoodEntry[] =
    R"({"block_m":0,"block_n":64,"partition_size":512,"us":1.5,"default_us":2.0,)"
    R"("tuned_at":"2025-01-31T12:00:00Z","detail":"x"})";

// Binary, with NUL bytes and invalid UTF-8, like an object file written to the wrong name.
const char kGarbage[] = "\177ELF\001\377\376\000\000 bytes";

INSTANTIATE_TEST_SUITE_P(
    TuningDb, BadFile,
    ::testing::Values(
        BadFileCase{"ForeignVersion", R"({"format":"flexjit-tuning","version":999,"entries":{}})"},
        BadFileCase{"ForeignFormat", R"({"format":"other-tool","version":1,"entries":{}})"},
        BadFileCase{"NotAnObject", "[1, 2, 3]"},
        BadFileCase{"Garbage", std::string(kGarbage, sizeof kGarbage - 1)},
        BadFileCase{"Empty", ""},
        BadFileCase{"MalformedEntry",
                    R"({"format":"flexjit-tuning","version":1,"entries":{"k":{"block_m":"x"}}})"},
        BadFileCase{"NegativeKnob",
                    R"({"format":"flexjit-tuning","version":1,"entries":{"k":{"block_m":-4,)"
                    R"("block_n":64,"partition_size":512,"us":1.5,"default_us":2.0,)"
                    R"("tuned_at":"t","detail":"x"}}})"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST_F(TuningDbTest, ValidFileWithExtraFieldsIsKept) {
  // The fixed text above parses: the bad-file cases fail for their one defect only.
  write_text(path_, std::string(R"({"format":"flexjit-tuning","version":1,"written_by":"x",)") +
                        R"("entries":{")" + bucket(0, 0).key() + R"(":)" + kGoodEntry + "}}");
  TuningDb db(path_);
  auto got = db.lookup(bucket(0, 0));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->partition_size, 512);
  EXPECT_TRUE(files_starting("tuning.json.bad-").empty());
}

TEST_F(TuningDbTest, StoreSetsAsideABadFileItFinds) {
  write_text(path_, "{not json");
  TuningDb db(path_);
  db.store(bucket(0, 1), choice(1));  // no lookup first: store's own re-read finds it
  EXPECT_EQ(files_starting("tuning.json.bad-").size(), 1u);
  EXPECT_EQ(TuningDb(path_).entries().size(), 1u);
}

// ---- sharing ------------------------------------------------------------------------------------

TEST_F(TuningDbTest, AnotherInstanceSeesAStoreAfterTheRecheckInterval) {
  TuningDb writer(path_), reader(path_);
  EXPECT_FALSE(reader.lookup(bucket(0, 0)).has_value());  // loads (nothing there yet)
  writer.store(bucket(0, 0), choice(0));
  std::this_thread::sleep_for(150ms);  // past the default 100 ms between stat() calls
  auto got = reader.lookup(bucket(0, 0));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->detail, "choice 0");
}

TEST_F(TuningDbTest, AnotherInstanceSeesReplaceAndClearWithoutInterval) {
  TuningDb writer(path_), reader(path_);
  reader.set_recheck_interval(0ms);
  writer.store(bucket(0, 0), choice(0));
  EXPECT_EQ(reader.lookup(bucket(0, 0))->detail, "choice 0");
  // Same size, possibly the same mtime tick: the new inode still tells the files apart.
  writer.store(bucket(0, 0), choice(1));
  EXPECT_EQ(reader.lookup(bucket(0, 0))->detail, "choice 1");
  writer.clear();
  EXPECT_FALSE(reader.lookup(bucket(0, 0)).has_value());
}

TEST_F(TuningDbTest, ForkedProcessesKeepEachOthersEntries) {
  constexpr int kChildren = 4, kPerChild = 25;
  std::vector<pid_t> pids;
  for (int child = 0; child < kChildren; ++child) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // No gtest assertions in the child: the exit status is the result.
      int status = 0;
      try {
        TuningDb db(path_);
        for (int i = 0; i < kPerChild; ++i) db.store(bucket(child + 1, i), choice(child * 100 + i));
      } catch (...) {
        status = 1;
      }
      ::_exit(status);
    }
    pids.push_back(pid);
  }
  for (pid_t pid : pids) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  }
  ASSERT_TRUE(parses_as_json(path_));
  TuningDb db(path_);
  EXPECT_EQ(db.entries().size(), size_t(kChildren * kPerChild));
  for (int child = 0; child < kChildren; ++child) {
    for (int i = 0; i < kPerChild; ++i) {
      auto got = db.lookup(bucket(child + 1, i));
      ASSERT_TRUE(got.has_value()) << "child " << child << " entry " << i;
      EXPECT_EQ(got->detail, "choice " + std::to_string(child * 100 + i));
    }
  }
  EXPECT_TRUE(files_starting("tuning.json.bad-").empty());
  EXPECT_TRUE(files_starting("tuning.json.tmp-").empty());
}

TEST_F(TuningDbTest, ThreadsShareOneInstance) {
  constexpr int kThreads = 8, kPerThread = 25;
  TuningDb db(path_);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&db, t] {
      for (int i = 0; i < kPerThread; ++i) {
        db.store(bucket(t, i), choice(i));
        (void)db.lookup(bucket((t + 1) % kThreads, i));  // reads interleaved with writes
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(db.entries().size(), size_t(kThreads * kPerThread));
  EXPECT_EQ(TuningDb(path_).entries().size(), size_t(kThreads * kPerThread));
  EXPECT_TRUE(parses_as_json(path_));
}

// ---- locations that cannot be used --------------------------------------------------------------

void expect_unwritable(const std::string& path) {
  TuningDb db(path);
  std::optional<TunedChoice> got;
  EXPECT_NO_THROW(got = db.lookup(bucket(0, 0)));
  EXPECT_FALSE(got.has_value());
  EXPECT_TRUE(db.entries().empty());
  try {
    db.store(bucket(0, 0), choice(0));
    ADD_FAILURE() << "store into " << path << " did not throw";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("FLEXJIT_CACHE_DIR"), std::string::npos) << msg;  // says how to fix it
  }
}

TEST_F(TuningDbTest, PathUnderARegularFileCannotBeWritten) {
  write_text(dir_ + "/file", "x");
  expect_unwritable(dir_ + "/file/tuning.json");
  expect_unwritable(dir_ + "/file/sub/tuning.json");
}

TEST_F(TuningDbTest, PathUnderProcCannotBeWritten) {
  expect_unwritable("/proc/flexjit-tuning-test/tuning.json");
}

TEST_F(TuningDbTest, DirectoryInPlaceOfTheFileIsReportedNotRemoved) {
  fs::create_directory(path_);
  TuningDb db(path_);
  std::optional<TunedChoice> got;
  EXPECT_NO_THROW(got = db.lookup(bucket(0, 0)));
  EXPECT_FALSE(got.has_value());
  ASSERT_EQ(db.notes().size(), 1u);
  EXPECT_NE(db.notes()[0].find("cannot read " + path_), std::string::npos) << db.notes()[0];
  try {
    db.store(bucket(0, 0), choice(0));
    ADD_FAILURE() << "store over a directory did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path_), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::is_directory(path_));
}

}  // namespace
}  // namespace flexjit::runtime

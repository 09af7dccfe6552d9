// LABELS: cache
// jit/cache: memory -> disk -> compile, one compile per key (threads and processes), bad disk
// entries are misses, compile errors keep their source.
#include "jit/cache.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <map>
#include <vector>

#include "jit/compile.h"
#include "jit/types.h"

namespace flexjit::jit {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class CacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "flexjit-cache-test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string dir_;
};

// f(x) = x * mul + 1, through a vector loop and expf so the object has real code in it.
std::string kernel_source(const std::string& symbol, int mul) {
  std::string src = R"(typedef float f32x16 __attribute__((vector_size(64)));
extern "C" float SYMBOL(float x) {
  f32x16 v = {};
  for (int k = 0; k < 16; ++k) v[k] = x * MUL;
  return v[3] + __builtin_expf(0.0f);
}
)";
  src.replace(src.find("SYMBOL"), 6, symbol);
  src.replace(src.find("MUL"), 3, std::to_string(mul) + ".0f");
  return src;
}

using KernelFn = float (*)(float);
float call(const CachedKernel& k, float x) { return reinterpret_cast<KernelFn>(k.fn)(x); }

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_all(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << data;
}

std::string key_for(const std::string& name) { return make_key({{"test", name}}); }

TEST_F(CacheTest, SameKeyCompilesOnce) {
  KernelCache cache(dir_);
  EXPECT_TRUE(cache.disk_writable());
  std::string key = key_for("same");
  int calls = 0;
  auto make = [&] {
    ++calls;
    return kernel_source("k_same", 3);
  };
  CachedKernel a = cache.get_or_compile(key, "k_same", make);
  EXPECT_EQ(a.hit, CacheHit::Miss);
  EXPECT_GT(a.compile_ms, 0);
  std::printf("[ timing ] compile %.1f ms, load %.2f ms\n", a.compile_ms, a.load_ms);
  CachedKernel b = cache.get_or_compile(key, "k_same", make);
  EXPECT_EQ(b.hit, CacheHit::Memory);
  EXPECT_EQ(b.compile_ms, 0);
  EXPECT_EQ(a.fn, b.fn);
  EXPECT_EQ(calls, 1);
  EXPECT_FLOAT_EQ(call(b, 2.0f), 7.0f);
  CacheStats s = cache.stats();
  EXPECT_EQ(s.compiles, 1);
  EXPECT_EQ(s.memory_hits, 1);
  EXPECT_EQ(s.disk_hits, 0);
  EXPECT_EQ(s.disk_corrupt, 0);
  EXPECT_TRUE(fs::exists(dir_ + "/" + key + ".o"));
  EXPECT_TRUE(fs::exists(dir_ + "/" + key + ".meta"));
}

TEST_F(CacheTest, EightThreadsCompileOnce) {
  KernelCache cache(dir_);
  std::string key = key_for("threads");
  std::atomic<int> calls{0};
  std::atomic<int> ready{0};
  std::vector<CachedKernel> got(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      ++ready;
      while (ready.load() < 8) std::this_thread::yield();  // all ask at once
      got[t] = cache.get_or_compile(key, "k_threads", [&] {
        ++calls;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // widen the race window
        return kernel_source("k_threads", 5);
      });
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(calls.load(), 1);
  int misses = 0;
  for (const auto& k : got) {
    EXPECT_EQ(k.fn, got[0].fn);
    misses += k.hit == CacheHit::Miss;
  }
  EXPECT_EQ(misses, 1);
  EXPECT_FLOAT_EQ(call(got[0], 1.0f), 6.0f);
  CacheStats s = cache.stats();
  EXPECT_EQ(s.compiles, 1);
  EXPECT_EQ(s.memory_hits, 7);
}

TEST_F(CacheTest, NewCacheOnSameDirHitsDiskWithoutSource) {
  std::string key = key_for("disk");
  {
    KernelCache first(dir_);
    first.get_or_compile(key, "k_disk", [] { return kernel_source("k_disk", 4); });
  }
  KernelCache second(dir_);
  CachedKernel k = second.get_or_compile(key, "k_disk", []() -> std::string {
    ADD_FAILURE() << "make_source must not run on a disk hit";
    return "";
  });
  EXPECT_EQ(k.hit, CacheHit::Disk);
  EXPECT_EQ(k.compile_ms, 0);
  EXPECT_GT(k.load_ms, 0);
  EXPECT_LT(k.load_ms, 100) << "a disk hit must not invoke Clang";
  std::printf("[ timing ] disk hit load %.2f ms\n", k.load_ms);
  EXPECT_FLOAT_EQ(call(k, 2.0f), 9.0f);
  CacheStats s = second.stats();
  EXPECT_EQ(s.compiles, 0);
  EXPECT_EQ(s.disk_hits, 1);

  // clear_memory() makes the next call go to disk again; the old pointer stays valid.
  second.clear_memory();
  CachedKernel again = second.get_or_compile(key, "k_disk", [] { return std::string(); });
  EXPECT_EQ(again.hit, CacheHit::Disk);
  EXPECT_FLOAT_EQ(call(k, 1.0f), 5.0f);
  EXPECT_FLOAT_EQ(call(again, 1.0f), 5.0f);
}

// Each case damages a good entry; a new cache must recompile (one disk_corrupt), the kernel must
// be right, and the entry must be good again afterwards.
struct Damage {
  const char* name;
  void (*apply)(const std::string& obj, const std::string& meta, const std::string& key);
};

const Damage kDamages[] = {
    {"TruncatedObject", [](const std::string& obj, const std::string&,
                           const std::string&) { fs::resize_file(obj, fs::file_size(obj) / 2); }},
    {"EmptyObject",
     [](const std::string& obj, const std::string&, const std::string&) { write_all(obj, ""); }},
    {"FlippedByteInObject",
     [](const std::string& obj, const std::string&, const std::string&) {
       std::string data = read_all(obj);
       data[data.size() / 2] ^= 0x5a;
       write_all(obj, data);
     }},
    {"MissingObject",
     [](const std::string& obj, const std::string&, const std::string&) { fs::remove(obj); }},
    {"TruncatedManifest",
     [](const std::string&, const std::string& meta, const std::string&) {
       fs::resize_file(meta, fs::file_size(meta) / 2);
     }},
    {"MissingManifest",
     [](const std::string&, const std::string& meta, const std::string&) { fs::remove(meta); }},
    {"ManifestForOtherSymbol",
     [](const std::string&, const std::string& meta, const std::string&) {
       std::string m = read_all(meta);
       m.replace(m.find("symbol k_dmg"), 12, "symbol k_xyz");
       write_all(meta, m);
     }},
    {"GarbageObjectWithMatchingManifest",
     [](const std::string& obj, const std::string& meta, const std::string& key) {
       // The checksum passes, so the JIT itself must reject the bytes without crashing.
       std::string junk = "\177ELF this is not really an object file";
       write_all(obj, junk);
       write_all(meta, "flexjit-kernel-cache 1\nkey " + key + "\nsymbol k_dmg\nbytes " +
                           std::to_string(junk.size()) + "\nsha256 " + sha256_hex(junk) + "\n");
     }},
};

class CacheDamageTest : public CacheTest, public ::testing::WithParamInterface<Damage> {};

TEST_P(CacheDamageTest, DamagedEntryRecompiles) {
  std::string key = key_for(std::string("damage-") + GetParam().name);
  auto make = [] { return kernel_source("k_dmg", 7); };
  KernelCache(dir_).get_or_compile(key, "k_dmg", make);
  std::string obj = dir_ + "/" + key + ".o", meta = dir_ + "/" + key + ".meta";
  GetParam().apply(obj, meta, key);

  KernelCache cache(dir_);
  int calls = 0;
  CachedKernel k = cache.get_or_compile(key, "k_dmg", [&] {
    ++calls;
    return make();
  });
  EXPECT_EQ(k.hit, CacheHit::Miss);
  EXPECT_EQ(calls, 1);
  EXPECT_FLOAT_EQ(call(k, 2.0f), 15.0f);
  CacheStats s = cache.stats();
  EXPECT_EQ(s.disk_corrupt, 1);
  EXPECT_EQ(s.compiles, 1);

  CachedKernel healed =
      KernelCache(dir_).get_or_compile(key, "k_dmg", [] { return std::string(); });
  EXPECT_EQ(healed.hit, CacheHit::Disk);
  EXPECT_FLOAT_EQ(call(healed, 2.0f), 15.0f);
}

INSTANTIATE_TEST_SUITE_P(Cache, CacheDamageTest, ::testing::ValuesIn(kDamages),
                         [](const auto& info) { return std::string(info.param.name); });

TEST_F(CacheTest, DifferentKeysCompileSeparately) {
  KernelCache cache(dir_);
  CachedKernel a =
      cache.get_or_compile(key_for("a"), "k_ab", [] { return kernel_source("k_ab", 2); });
  CachedKernel b =
      cache.get_or_compile(key_for("b"), "k_ab", [] { return kernel_source("k_ab", 3); });
  EXPECT_EQ(a.hit, CacheHit::Miss);
  EXPECT_EQ(b.hit, CacheHit::Miss);
  EXPECT_NE(a.fn, b.fn);
  EXPECT_FLOAT_EQ(call(a, 1.0f), 3.0f);
  EXPECT_FLOAT_EQ(call(b, 1.0f), 4.0f);
  EXPECT_EQ(cache.stats().compiles, 2);
}

TEST(MakeKey, OrderIndependentAndSensitiveToEveryField) {
  std::vector<std::pair<std::string, std::string>> base = {
      {"template", "abc123"}, {"mod", "ff00"}, {"HEAD_DIM", "128"}, {"dtype", "bf16"}};
  std::string k = make_key(base);
  EXPECT_EQ(k.size(), 64u);
  EXPECT_EQ(k.find_first_not_of("0123456789abcdef"), std::string::npos);

  auto reversed = base;
  std::reverse(reversed.begin(), reversed.end());
  EXPECT_EQ(make_key(reversed), k);

  for (size_t i = 0; i < base.size(); ++i) {
    auto changed = base;
    changed[i].second += "x";
    EXPECT_NE(make_key(changed), k) << "value of " << base[i].first;
    auto renamed = base;
    renamed[i].first += "x";
    EXPECT_NE(make_key(renamed), k) << "name of " << base[i].first;
  }
  auto extra = base;
  extra.emplace_back("BLOCK_M", "64");
  EXPECT_NE(make_key(extra), k);

  // A newline inside a value cannot fake another field.
  EXPECT_NE(make_key({{"a", "x\nb=y"}}), make_key({{"a", "x"}, {"b", "y"}}));
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(CacheHitName, Names) {
  EXPECT_STREQ(cache_hit_name(CacheHit::Miss), "miss");
  EXPECT_STREQ(cache_hit_name(CacheHit::Memory), "memory");
  EXPECT_STREQ(cache_hit_name(CacheHit::Disk), "disk");
  EXPECT_STREQ(cache_hit_name(CacheHit::Prebuilt), "prebuilt");
}

// Every file under `dir` with its size and contents: a read-only tier must leave it unchanged.
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files[e.path().string()] = read_all(e.path().string());
  return files;
}

// The prebuilt tier (a second, read-only directory): a hit there loads without compiling and
// writes nothing anywhere; a damaged entry there is a miss that compiles into the cache's own
// directory and leaves the prebuilt one as it was.
TEST_F(CacheTest, PrebuiltTierServesHitsAndIsNeverWritten) {
  const std::string pre = dir_ + "/prebuilt", own = dir_ + "/own", own2 = dir_ + "/own2";
  const std::string key = key_for("prebuilt");
  KernelCache(pre).get_or_compile(key, "k_pre", [] { return kernel_source("k_pre", 3); });
  const auto before = snapshot(pre);

  KernelCache cache(own, pre);
  EXPECT_EQ(cache.prebuilt_dir(), pre);
  CachedKernel k = cache.get_or_compile(key, "k_pre", []() -> std::string {
    ADD_FAILURE() << "make_source must not run on a prebuilt hit";
    return "";
  });
  EXPECT_EQ(k.hit, CacheHit::Prebuilt);
  EXPECT_EQ(k.compile_ms, 0);
  EXPECT_FLOAT_EQ(call(k, 2.0f), 7.0f);
  EXPECT_EQ(cache.stats().prebuilt_hits, 1);
  EXPECT_EQ(cache.stats().compiles, 0);
  EXPECT_EQ(cache.get_or_compile(key, "k_pre", [] { return std::string(); }).hit, CacheHit::Memory);
  EXPECT_FALSE(fs::exists(own + "/" + key + ".o")) << "a prebuilt hit is not copied";
  EXPECT_EQ(snapshot(pre), before);

  // The cache's own directory comes first: an entry there is a disk hit.
  KernelCache(own).get_or_compile(key, "k_pre", [] { return kernel_source("k_pre", 3); });
  EXPECT_EQ(KernelCache(own, pre).get_or_compile(key, "k_pre", [] { return std::string(); }).hit, CacheHit::Disk);

  // A truncated prebuilt object: compiled into own2, the prebuilt file untouched.
  const std::string obj = pre + "/" + key + ".o";
  const std::string bytes = read_all(obj);
  write_all(obj, bytes.substr(0, bytes.size() / 2));
  const auto damaged = snapshot(pre);
  KernelCache other(own2, pre);
  CachedKernel c = other.get_or_compile(key, "k_pre", [] { return kernel_source("k_pre", 3); });
  EXPECT_EQ(c.hit, CacheHit::Miss);
  EXPECT_FLOAT_EQ(call(c, 1.0f), 4.0f);
  EXPECT_EQ(other.stats().disk_corrupt, 0) << "the prebuilt tier's entries are not the cache's to count";
  EXPECT_TRUE(fs::exists(own2 + "/" + key + ".o"));
  EXPECT_EQ(snapshot(pre), damaged);

  // A prebuilt directory that is the cache's own is one tier, not two.
  EXPECT_EQ(KernelCache(pre, pre + "/").prebuilt_dir(), "");
}

TEST_F(CacheTest, CompileErrorNamesFailedSourceAndIsNotCached) {
  KernelCache cache(dir_);
  std::string key = key_for("broken");
  const std::string bad = "extern \"C\" float k_bad(float x) {\n  return x +;\n}\n";
  std::string failed = dir_ + "/failed/" + key + ".cpp";
  try {
    cache.get_or_compile(key, "k_bad", [&] { return bad; });
    ADD_FAILURE() << "a compile error must throw";
  } catch (const flexjit::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(failed), std::string::npos) << msg;
    EXPECT_NE(msg.find(":2:13: error"), std::string::npos) << msg;
    EXPECT_NE(msg.find("k_bad"), std::string::npos) << msg;
  }
  EXPECT_EQ(read_all(failed), bad);
  EXPECT_FALSE(fs::exists(dir_ + "/" + key + ".o"));
  EXPECT_EQ(cache.stats().compiles, 0);

  // The failure is not remembered: the same key with a fixed source compiles.
  CachedKernel k = cache.get_or_compile(key, "k_bad", [] { return kernel_source("k_bad", 1); });
  EXPECT_EQ(k.hit, CacheHit::Miss);
  EXPECT_FLOAT_EQ(call(k, 2.0f), 3.0f);
}

TEST_F(CacheTest, DumpSrcKeepsTheSource) {
  ::setenv("FLEXJIT_DUMP", "ir,src", 1);
  KernelCache cache(dir_);
  std::string key = key_for("dump");
  CachedKernel k = cache.get_or_compile(key, "k_dump", [] { return kernel_source("k_dump", 2); });
  ::unsetenv("FLEXJIT_DUMP");
  EXPECT_EQ(k.source_path, dir_ + "/" + key + ".cpp");
  EXPECT_EQ(read_all(k.source_path), kernel_source("k_dump", 2));

  CachedKernel plain =
      cache.get_or_compile(key_for("nodump"), "k_dump", [] { return kernel_source("k_dump", 2); });
  EXPECT_TRUE(plain.source_path.empty());
}

TEST_F(CacheTest, UnwritableDirWorksFromMemory) {
  // A path below a regular file cannot be created, even by root.
  write_all(dir_ + "/file", "x");
  KernelCache cache(dir_ + "/file/cache");
  EXPECT_FALSE(cache.disk_writable());
  std::string key = key_for("nowrite");
  CachedKernel a = cache.get_or_compile(key, "k_nw", [] { return kernel_source("k_nw", 6); });
  CachedKernel b = cache.get_or_compile(key, "k_nw", [] { return kernel_source("k_nw", 6); });
  EXPECT_EQ(a.hit, CacheHit::Miss);
  EXPECT_EQ(b.hit, CacheHit::Memory);
  EXPECT_FLOAT_EQ(call(b, 1.0f), 7.0f);
  EXPECT_TRUE(cache.list().empty());
}

TEST_F(CacheTest, ListAndClearDisk) {
  KernelCache cache(dir_);
  std::string ka = key_for("list-a"), kb = key_for("list-b");
  cache.get_or_compile(ka, "k_l", [] { return kernel_source("k_l", 1); });
  cache.get_or_compile(kb, "k_l", [] { return kernel_source("k_l", 2); });
  write_all(dir_ + "/unrelated.txt", "keep me");

  std::vector<KernelCache::Entry> entries = cache.list();
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].key, std::min(ka, kb));
  EXPECT_EQ(entries[1].key, std::max(ka, kb));
  EXPECT_GT(entries[0].bytes, 0);
  EXPECT_GT(entries[0].mtime, 0);

  EXPECT_EQ(cache.clear_disk(), 2u);
  EXPECT_TRUE(cache.list().empty());
  EXPECT_TRUE(fs::exists(dir_ + "/unrelated.txt"));
  EXPECT_FALSE(fs::exists(dir_ + "/" + ka + ".meta"));

  KernelCache fresh(dir_);
  CachedKernel k = fresh.get_or_compile(ka, "k_l", [] { return kernel_source("k_l", 1); });
  EXPECT_EQ(k.hit, CacheHit::Miss);
}

// Two processes ask for one key at the same moment: the per-key lock lets one compile, the other
// waits and loads its object from disk. make_source appends to a file, so the count spans both.
TEST_F(CacheTest, TwoProcessesCompileOnce) {
  std::string key = key_for("fork");
  std::string go = dir_ + "/go", count = dir_ + "/source-calls";
  std::vector<pid_t> kids;
  for (int i = 0; i < 2; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Child: no gtest assertions here; the exit code is the verdict.
      for (int t = 0; t < 2000 && !fs::exists(go); ++t) ::usleep(5000);
      int code = 1;
      try {
        KernelCache cache(dir_);
        CachedKernel k = cache.get_or_compile(key, "k_fork", [&] {
          std::ofstream(count, std::ios::app) << "x";
          std::this_thread::sleep_for(std::chrono::milliseconds(300));  // hold the lock a while
          return kernel_source("k_fork", 9);
        });
        bool right = call(k, 1.0f) == 10.0f;
        std::ofstream(dir_ + "/result-" + std::to_string(i))
            << cache_hit_name(k.hit) << " " << k.load_ms << "\n";
        code = right ? (k.hit == CacheHit::Miss ? 10 : k.hit == CacheHit::Disk ? 11 : 12) : 2;
      } catch (...) {
        code = 3;
      }
      ::_exit(code);
    }
    kids.push_back(pid);
  }
  write_all(go, "go");
  std::vector<int> codes;
  for (pid_t pid : kids) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    codes.push_back(WEXITSTATUS(status));
  }
  std::sort(codes.begin(), codes.end());
  EXPECT_EQ(codes, (std::vector<int>{10, 11})) << "want one miss (10) and one disk hit (11)";
  EXPECT_EQ(read_all(count), "x") << "make_source ran more than once across processes";
  for (int i = 0; i < 2; ++i) {
    std::printf("[ child %d ] %s", i, read_all(dir_ + "/result-" + std::to_string(i)).c_str());
  }
}

}  // namespace
}  // namespace flexjit::jit

namespace flexjit::jit {
namespace {

// Blob entries (CUDA binaries): built once, then read from disk in a new cache object; a
// damaged entry is rebuilt, never returned; list and clear count them.
TEST(CacheBlob, BuildOnceThenDiskAndDamageRebuilds) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "flexjit-blob-test-XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string dir = tmpl;
  const std::string key(64, 'b');
  int builds = 0;
  auto build = [&] {
    ++builds;
    return std::string("flexjit-cuda-v1\nwhatever bytes\0\1", 33);
  };
  {
    KernelCache c(dir);
    KernelCache::Blob a = c.get_or_build(key, "flexjit_cuda_k", build);
    EXPECT_EQ(a.hit, CacheHit::Miss);
    EXPECT_EQ(builds, 1);
    EXPECT_TRUE(std::filesystem::exists(dir + "/" + key + ".bin"));
  }
  KernelCache c2(dir);
  KernelCache::Blob b = c2.get_or_build(key, "flexjit_cuda_k", build);
  EXPECT_EQ(b.hit, CacheHit::Disk);
  EXPECT_EQ(builds, 1);
  EXPECT_EQ(b.bytes.size(), 33u);
  {  // truncate the entry: a miss that rebuilds and rewrites it
    std::ofstream f(dir + "/" + key + ".bin", std::ios::binary | std::ios::trunc);
    f << "flexjit";
  }
  KernelCache::Blob r = c2.get_or_build(key, "flexjit_cuda_k", build);
  EXPECT_EQ(r.hit, CacheHit::Miss);
  EXPECT_EQ(builds, 2);
  EXPECT_EQ(r.bytes.size(), 33u);
  EXPECT_EQ(c2.stats().disk_corrupt, 1);
  // A key means one symbol: the manifest names it, so another symbol is not served this entry.
  KernelCache::Blob other = c2.get_or_build(key, "flexjit_cuda_other", build);
  EXPECT_EQ(other.hit, CacheHit::Miss);
  ASSERT_EQ(c2.list().size(), 1u);
  EXPECT_EQ(c2.clear_disk(), 1u);
  EXPECT_FALSE(std::filesystem::exists(dir + "/" + key + ".bin"));
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
}  // namespace flexjit::jit

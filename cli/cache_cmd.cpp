#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "jit/cache.h"

namespace flexjit::cli {

void add_cache_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("cache", "Inspect or clear the on-disk kernel cache (FLEXJIT_CACHE_DIR)");
  auto action = std::make_shared<std::string>("list");
  cmd->add_option("action", *action, "list | clear | dir")->check(CLI::IsMember({"list", "clear", "dir"}));
  cmd->callback([action] {
    auto& cache = jit::KernelCache::global();
    if (*action == "dir") {
      std::printf("%s\n", cache.dir().c_str());
    } else if (*action == "clear") {
      std::printf("removed %zu entries from %s\n", cache.clear_disk(), cache.dir().c_str());
    } else {
      auto entries = cache.list();
      long total = 0;
      for (const auto& e : entries) {
        std::printf("%s  %8ld bytes\n", e.key.c_str(), e.bytes);
        total += e.bytes;
      }
      std::printf("%zu kernels, %ld bytes in %s\n", entries.size(), total, cache.dir().c_str());
    }
  });
}

}  // namespace flexjit::cli

// flexjit: run attention with JIT-compiled mods from the shell.
//   flexjit run   --q Q.npy --k K.npy --v V.npy --out O.npy [...]   one call, .npy in and out
//   flexjit demo                                                   a tour with checks and timings
//   flexjit cache [list|clear|dir]                                 the on-disk kernel cache
//   flexjit bench [--quick] [--filter S] [--json F]                the compare_torch suite, C++ side
//   flexjit tune [--path decode|prefill] [--lkv ...] | --show        the autotuner and its database
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "jit/types.h"

int main(int argc, char** argv) {
  CLI::App app{"flexjit: FlexAttention-style attention with JIT-compiled score/mask mods"};
  app.require_subcommand(1);
  flexjit::cli::add_run_command(app);
  flexjit::cli::add_demo_command(app);
  flexjit::cli::add_cache_command(app);
  flexjit::cli::add_bench_command(app);
  flexjit::cli::add_tune_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const flexjit::Error& e) {
    std::fprintf(stderr, "flexjit: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flexjit: internal error: %s\n", e.what());
    return 3;
  }
  return 0;
}

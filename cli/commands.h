// The flexjit command line: each subcommand in its own file, all on the public API.
#pragma once

#include <CLI/CLI.hpp>

namespace flexjit::cli {

// Each adds its subcommand to `app`; the callback runs it. Errors are thrown as flexjit::Error.
void add_run_command(CLI::App& app);
void add_demo_command(CLI::App& app);
void add_cache_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_tune_command(CLI::App& app);

}  // namespace flexjit::cli

// `flexjit tune`: measure candidate PARTITION_SIZE / block sizes for shape buckets on this
// machine and keep the winners in the tuning database (runtime/autotune.h), or show / clear it.
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/mods_from_args.h"
#include "cli/npy.h"
#include "runtime/autotune.h"
#include "runtime/cuda_autotune.h"
#include "runtime/cuda_driver.h"

namespace flexjit::cli {
namespace {

struct TuneArgs {
  std::string path = "decode";
  std::vector<std::string> dtypes{"bf16"};
  std::vector<int> head_dims{128};
  int head_dim_v = 0;  // 0: = head dim
  int64_t heads = 32, kv_heads = 8;
  std::vector<int64_t> batches{1};
  std::vector<int64_t> lq;   // default: 1 (decode) or = lkv (prefill)
  std::vector<int64_t> lkv{4096};
  bool paged = false;
  int64_t page_size = 16;
  int threads = 0, reps = 5;
  std::string json;
  bool show = false, clear = false;
  std::string device = "cpu";
  std::string mask = "causal";  // CUDA prefill: the BlockMask tuned with (causal | none)
};

std::string knobs_text(int block_m, int block_n, int64_t partition_size) {
  std::string s;
  if (block_m) s += "BLOCK_M=" + std::to_string(block_m) + " ";
  if (block_n) s += "BLOCK_N=" + std::to_string(block_n) + " ";
  if (partition_size) s += "PARTITION_SIZE=" + std::to_string(partition_size);
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// One line, redrawn in place on a terminal; a line per step otherwise (logs, CI).
void draw_progress(int done, int total, const TuneCandidate& next) {
  const bool tty = isatty(2) != 0;
  const int width = 30, filled = total > 0 ? done * width / total : width;
  std::string bar(size_t(filled), '#');
  bar.resize(size_t(width), '.');
  const bool playoff = done == total - 1;  // the last step re-times the finalists
  std::fprintf(stderr, "%s  [%s] %d/%d %s%s", tty ? "\r" : "", bar.c_str(), done, total,
               done == total ? "done" : playoff ? "playoff of the fastest and the default" : done == 0 ? "default " : "",
               done == total || playoff ? ""
                                        : ((next.engine.empty() ? "" : "ENGINE=" + next.engine + " ") +
                                           knobs_text(next.block_m, next.block_n, next.partition_size))
                                              .c_str());
  std::fprintf(stderr, tty ? "\033[K" : "\n");
  if (tty && done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

void show() {
  runtime::TuningDb& db = runtime::TuningDb::global();
  auto entries = db.entries();
  std::printf("tuning database %s: %zu entries\n", db.path().c_str(), entries.size());
  for (const auto& [key, c] : entries) {
    std::printf("  %s\n    %s%s: %.1f us (default %.1f us, %.2fx) at %s; %s\n", key.c_str(),
                c.engine.empty() ? "" : ("ENGINE=" + c.engine + " ").c_str(),
                knobs_text(c.block_m, c.block_n, c.partition_size).c_str(), c.us, c.default_us,
                c.us > 0 ? c.default_us / c.us : 0.0, c.tuned_at.c_str(), c.detail.c_str());
  }
  for (const auto& n : db.notes()) std::printf("note: %s\n", n.c_str());
}

void run_tune(const TuneArgs& a) {
  if (a.show) return show();
  if (a.clear) {
    runtime::TuningDb& db = runtime::TuningDb::global();
    std::printf("removed %zu entries from %s\n", db.clear(), db.path().c_str());
    return;
  }
  nlohmann::json results = nlohmann::json::array();
  // --device cuda: the CUDA decode kernel's BLOCK_N x PARTITION_SIZE on this machine's GPU 0,
  // stored under its model and SM count (runtime/cuda_autotune.h).
  const bool cuda = a.device == "cuda";
  CudaDeviceInfo gpu;
  if (cuda) {
    const std::string status = cuda_driver_status();
    if (!status.empty()) throw Error("tune --device cuda times kernels on a GPU: " + status);
    cuda_use_primary_context();
    gpu = cuda_device_info(cuda_current_device_props());
    std::fprintf(stderr, "tuning on %s (%s, %d SMs)\n", gpu.name.c_str(), gpu.arch.c_str(), gpu.sm_count);
  }
  for (const auto& dt : a.dtypes)
    for (int d : a.head_dims)
      for (int64_t b : a.batches)
        for (int64_t lkv : a.lkv)
          for (int64_t lq : a.lq.empty() ? std::vector<int64_t>{a.path == "prefill" ? lkv : 1} : a.lq) {
            TuneRequest r;
            r.path = a.path;
            r.dtype = parse_dtype(dt);
            r.head_dim = d;
            r.head_dim_v = a.head_dim_v ? a.head_dim_v : d;
            r.batch = b;
            r.heads = a.heads;
            r.kv_heads = a.kv_heads;
            r.lq = lq;
            r.lkv = lkv;
            r.paged = a.paged;
            r.page_size = a.page_size;
            r.threads = a.threads;
            r.reps = a.reps;
            CudaTuneRequest cr;
            if (cuda) {
              cr.dtype = r.dtype;
              cr.head_dim = r.head_dim;
              cr.head_dim_v = r.head_dim_v;
              cr.batch = b;
              cr.heads = a.heads;
              cr.kv_heads = a.kv_heads;
              cr.lq = lq;
              cr.lkv = lkv;
              cr.paged = a.paged;
              cr.page_size = a.page_size;
              cr.reps = a.reps;
            }
            // CUDA prefill: the engine (mma.sync / wgmma / pipelined wgmma) and its blocks.
            CudaPrefillTuneRequest pr;
            const bool cuda_prefill = cuda && a.path == "prefill";
            if (cuda_prefill) {
              if (a.paged) throw Error("tune --device cuda --path prefill: there is no paged prefill; drop --paged");
              pr.dtype = r.dtype;
              pr.head_dim = r.head_dim;
              pr.head_dim_v = r.head_dim_v;
              pr.batch = b;
              pr.heads = a.heads;
              pr.kv_heads = a.kv_heads;
              pr.len = lkv;
              pr.causal = a.mask == "causal";
              pr.reps = a.reps;
            }
            const std::string bucket = cuda_prefill ? cuda_prefill_tune_bucket(pr, gpu).key()
                                       : cuda       ? cuda_tune_bucket(cr, gpu).key()
                                                    : tune_bucket(r).key();
            std::fprintf(stderr, "tuning %s\n", bucket.c_str());
            TuneResult res = cuda_prefill ? tune_cuda_prefill(pr, gpu, cuda_prefill_timer(pr, gpu), draw_progress)
                             : cuda       ? tune_cuda_decode(cr, gpu, cuda_decode_timer(cr, gpu), draw_progress)
                                          : tune(r, draw_progress);
            const auto& w = res.best;
            std::printf("%s\n  best %s%s: %.1f us; default %.1f us (%.2fx)%s\n", bucket.c_str(),
                        w.engine.empty() ? "" : ("ENGINE=" + w.engine + " ").c_str(),
                        knobs_text(w.block_m, w.block_n, w.partition_size).c_str(), w.us, w.default_us,
                        w.default_us / w.us, res.stored ? "; stored" : "");
            std::fflush(stdout);
            nlohmann::json cands = nlohmann::json::array();
            for (const auto& c : res.candidates)
              cands.push_back({{"BLOCK_M", c.block_m}, {"BLOCK_N", c.block_n}, {"PARTITION_SIZE", c.partition_size},
                               {"us", c.us}, {"error", c.error}, {"ENGINE", c.engine}});
            results.push_back({{"bucket", bucket},
                               {"best", {{"BLOCK_M", w.block_m}, {"BLOCK_N", w.block_n},
                                         {"PARTITION_SIZE", w.partition_size}, {"us", w.us}, {"ENGINE", w.engine}}},
                               {"default_us", w.default_us},
                               {"candidates", cands}});
          }
  std::printf("tuning database: %s\n", runtime::TuningDb::global().path().c_str());
  if (!a.json.empty()) {
    OutputFiles files;
    files.add_text("--json", a.json, results.dump(2) + "\n");
    files.commit();
  }
}

}  // namespace

void add_tune_command(CLI::App& app) {
  auto a = std::make_shared<TuneArgs>();
  auto* cmd = app.add_subcommand(
      "tune", "Time candidate PARTITION_SIZE / BLOCK_N (decode) or BLOCK_M x BLOCK_N (prefill) for shape buckets "
              "and store the winners in the tuning database next to the kernel cache");
  cmd->add_option("--path", a->path, "decode | prefill (default decode)")->check(CLI::IsMember({"decode", "prefill"}));
  cmd->add_option("--dtype", a->dtypes, "dtypes, comma-separated (default bf16)")->delimiter(',');
  cmd->add_option("--head-dim", a->head_dims, "head dims D (default 128)")->delimiter(',');
  cmd->add_option("--head-dim-v", a->head_dim_v, "Dv (default: = D)");
  cmd->add_option("--heads", a->heads, "query heads Hq (default 32)");
  cmd->add_option("--kv-heads", a->kv_heads, "KV heads Hkv (default 8; the GQA group is Hq / Hkv)");
  cmd->add_option("--batch", a->batches, "batch sizes (default 1)")->delimiter(',');
  cmd->add_option("--lq", a->lq, "query lengths (default 1 for decode, = --lkv for prefill)")->delimiter(',');
  cmd->add_option("--lkv", a->lkv, "KV lengths; each is tuned at the top of its power-of-two bucket (default 4096)")
      ->delimiter(',');
  cmd->add_flag("--paged", a->paged, "decode from a paged KV cache");
  cmd->add_option("--page-size", a->page_size, "page size with --paged (default 16)");
  cmd->add_option("--threads", a->threads, "threads (default: all cores; part of the bucket)");
  cmd->add_option("--reps", a->reps, "timed calls per candidate, median (default 5)");
  cmd->add_option("--json", a->json, "write every candidate's time as JSON");
  cmd->add_flag("--show", a->show, "print the tuning database and exit");
  cmd->add_option("--device", a->device, "cpu (default) or cuda: tune the CUDA decode kernel (or with --path prefill "
                                         "the prefill engine and blocks) on GPU 0 (bf16 / fp16), stored under the "
                                         "GPU's model and SM count")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--mask", a->mask, "CUDA prefill: tune with a causal BlockMask (causal, default) or none")
      ->check(CLI::IsMember({"causal", "none"}));
  cmd->add_flag("--clear", a->clear, "remove every entry of the tuning database and exit");
  cmd->callback([a] { run_tune(*a); });
}

}  // namespace flexjit::cli

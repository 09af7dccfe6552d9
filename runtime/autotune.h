// The autotuner: times candidate knobs for one shape bucket on this machine and stores the winner
// in the tuning database (runtime/tuning_db.h), where the planners (runtime/tuning.h) find it on
// every later call in the bucket, in this process and in others.
//
//   decode:  BLOCK_N in {64, 128, 256} x PARTITION_SIZE in {128, 256, ..., no split} (multiples of
//            BLOCK_N and the page size)
//   prefill: BLOCK_M in {16, 32, 64, 128} x BLOCK_N in {32, 64, 128, 256} (those whose scratch fits)
//
// Each candidate runs on random inputs of the request's shape (at the top of the KV-length
// bucket, so a stored entry is measured where it matters most), once to compile and warm up,
// then `reps` timed calls; the median counts. Then a playoff: the three fastest and the cost
// model's own choice are timed again, interleaved over three rounds, and a candidate is stored
// only if its median beats the cost model's by >= 3% (otherwise the cost model's knobs are
// stored: on a shared machine the fastest of ~20 noisy timings is partly luck). The cost
// model's time is stored beside the winner (TunedChoice::default_us), so `flexjit tune --show`
// says what tuning gained.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/attention.h"
#include "runtime/tuning_db.h"

namespace flexjit {

struct TuneRequest {
  std::string path = "decode";  // "decode" or "prefill"
  DType dtype = DType::BF16;
  int head_dim = 128, head_dim_v = 128;
  int64_t batch = 1, heads = 32, kv_heads = 8;
  int64_t lq = 1;          // query rows per sequence (decode: <= 16)
  int64_t lkv = 4096;      // keys; rounded up to its bucket's top
  bool paged = false;      // decode only: a paged cache of page_size keys per page
  int64_t page_size = 16;
  int threads = 0;         // 0: all cores
  int reps = 5;            // timed calls per candidate
  bool store = true;       // write the winner to the database
};

struct TuneCandidate {
  int block_m = 0, block_n = 0;
  int64_t partition_size = 0;
  double us = 0;           // median; < 0: the candidate could not run (error holds why)
  std::string error;
  std::string engine;      // CUDA prefill: "mma", "wgmma", "wgmma2"; CPU decode on an AMX host: "dot", "amx"; else ""
};

struct TuneResult {
  std::string bucket;                       // TuningBucket::key()
  runtime::TunedChoice best;                // the winner, with default_us
  std::vector<TuneCandidate> candidates;    // every candidate, in the order timed
  bool stored = false;
};

// Progress: called before each candidate (done of total) and once at the end (done == total).
using TuneProgress = std::function<void(int done, int total, const TuneCandidate& next)>;

// Times the bucket's candidates and (request.store) stores the winner. Throws flexjit::Error for a
// request that cannot run (bad sizes, a paged prefill, ...).
TuneResult tune(const TuneRequest& request, const TuneProgress& progress = {});

// The bucket a request tunes (what tune() stores under, and what calls of that shape look up).
runtime::TuningBucket tune_bucket(const TuneRequest& request);

}  // namespace flexjit

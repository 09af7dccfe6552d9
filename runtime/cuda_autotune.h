// The CUDA decode autotuner (`flexjit tune --device cuda`): times BLOCK_N x PARTITION_SIZE
// candidates for one shape bucket on the GPU at hand and stores the winner in the tuning database
// (runtime/tuning_db.h) under cuda_decode_bucket, keyed by the GPU's model and SM count, where
// plan_cuda_decode finds it on later calls (plan.split "tuned"). Full build only (the database
// is JSON).
//
// Candidates: BLOCK_N in {32, 64} x PARTITION_SIZE in {256, 512, ...} up to no split, at the top
// of the request's KV-length bucket. Then a playoff, as on CPU (runtime/autotune.h): the three
// fastest and the cost model's own choice are timed again over three interleaved rounds, and a
// candidate is stored only if it beats the cost model by >= 3%; otherwise the cost model's knobs
// are stored, with both times, so `flexjit tune --show` says what tuning gained (or that it did not).
#pragma once

#include <functional>

#include "runtime/autotune.h"
#include "runtime/cuda_decode.h"
#include "runtime/cuda_prefill.h"

namespace flexjit {

struct CudaTuneRequest {
  DType dtype = DType::BF16;
  int head_dim = 128, head_dim_v = 128;
  int64_t batch = 1, heads = 32, kv_heads = 8;
  int64_t lq = 1;        // 1..16
  int64_t lkv = 4096;    // tuned at the top of its power-of-two bucket
  bool paged = false;
  int64_t page_size = 16;
  int reps = 10;         // timed calls per candidate (median)
  bool store = true;
};

// Median microseconds of one call with these knobs; < 0 when the candidate cannot run.
using CudaCandidateTimer = std::function<double(int block_n, int64_t partition_size)>;

// The bucket a request tunes on `dev`.
runtime::TuningBucket cuda_tune_bucket(const CudaTuneRequest& r, const CudaDeviceInfo& dev);

// Times the candidates with `time_us` and (r.store) stores the winner. Throws flexjit::Error for
// a request that cannot run, or when no candidate ran.
TuneResult tune_cuda_decode(const CudaTuneRequest& r, const CudaDeviceInfo& dev, const CudaCandidateTimer& time_us,
                            const TuneProgress& progress = {});

// The GPU's timer for a request: device buffers at the bucket's top KV length (q, k, v filled with
// finite values; a permuted block table when paged), then plan_cuda_decode with the candidate's
// knobs + run_cuda_decode + a synchronisation per call, the median of r.reps after a warm-up call.
// Needs a GPU with a current context (cuda_use_primary_context); the buffers live as long as the
// returned timer.
CudaCandidateTimer cuda_decode_timer(const CudaTuneRequest& r, const CudaDeviceInfo& dev);

// ---- CUDA prefill: the engine (mma.sync, wgmma, pipelined wgmma) and its blocks ----
// `flexjit tune --device cuda --path prefill`: times the engines and tiles this GPU can run for
// one bucket (cuda_prefill_bucket: the GPU, dtype, head dims, GQA group, length and B x Hq rounded
// up to powers of two, masked or not), each candidate's output checked against the default's, and
// stores the winner (TunedChoice.engine + BLOCK_M / BLOCK_N) where plan_cuda_prefill finds it
// (plan.knobs "tuned"). The same playoff and 3% rule as decode.
struct CudaPrefillTuneRequest {
  DType dtype = DType::BF16;
  int head_dim = 128, head_dim_v = 128;
  int64_t batch = 1, heads = 32, kv_heads = 8;
  int64_t len = 4096;  // Lq = Lkv, tuned at the top of its power-of-two bucket
  bool causal = true;  // a causal BlockMask of 128 x 128 blocks (the "cuda-mask" bucket), else none
  int reps = 10;       // timed calls per candidate (median)
  bool store = true;
};

// Median microseconds of one call of the candidate (use_wgmma 0 / 1 / 2, BLOCK_M, BLOCK_N); < 0
// when it cannot run. Throws flexjit::Error when its output disagrees with the default's.
using CudaPrefillTimer = std::function<double(int use_wgmma, int block_m, int block_n)>;

runtime::TuningBucket cuda_prefill_tune_bucket(const CudaPrefillTuneRequest& r, const CudaDeviceInfo& dev);

// The candidates for a request on `dev` (engine, BLOCK_M, BLOCK_N), the default's first.
std::vector<TuneCandidate> cuda_prefill_candidates(const CudaPrefillTuneRequest& r, const CudaDeviceInfo& dev);

TuneResult tune_cuda_prefill(const CudaPrefillTuneRequest& r, const CudaDeviceInfo& dev, const CudaPrefillTimer& time_us,
                             const TuneProgress& progress = {});

// The GPU's timer: q, k, v of the bucket's top length filled with a fixed pseudo-random pattern,
// the causal mask on the device when asked; each candidate runs once, its output is compared with
// the default engine's (max |diff| <= 3e-2, bf16 / fp16 outputs), then timed (median of r.reps,
// a synchronisation per call). Needs a GPU with a current context.
CudaPrefillTimer cuda_prefill_timer(const CudaPrefillTuneRequest& r, const CudaDeviceInfo& dev);

}  // namespace flexjit

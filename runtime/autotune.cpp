#include "runtime/autotune.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <numeric>
#include <random>

#include "runtime/launch.h"
#include "runtime/reference.h"
#include "runtime/tuning.h"
#include "score_mods/registry.h"

namespace flexjit {
namespace {

using runtime::DecodeShape;
using runtime::PrefillShape;

void require(bool ok, const std::string& msg) {
  if (!ok) throw Error("tune: " + msg);
}

void check_request(const TuneRequest& r) {
  require(r.path == "decode" || r.path == "prefill", "path must be decode or prefill, got '" + r.path + "'");
  require(r.dtype == DType::F32 || r.dtype == DType::BF16 || r.dtype == DType::F16,
          std::string("dtype must be fp32, bf16 or fp16, got ") + dtype_name(r.dtype));
  require(r.head_dim >= 1 && r.head_dim <= 256 && r.head_dim_v >= 1 && r.head_dim_v <= 256,
          "head dims must be in 1..256");
  require(r.batch >= 1 && r.heads >= 1 && r.kv_heads >= 1 && r.heads % r.kv_heads == 0,
          "heads (" + std::to_string(r.heads) + ") must be a positive multiple of kv heads (" +
              std::to_string(r.kv_heads) + ") and the batch >= 1");
  require(r.lq >= 1 && r.lkv >= 1, "query and KV lengths must be >= 1");
  require(r.path == "prefill" || r.lq <= 16, "decode takes Lq <= 16, got " + std::to_string(r.lq));
  require(!r.paged || r.path == "decode", "paged caches have only the decode path");
  require(!r.paged || (r.page_size >= 1 && r.page_size <= 4096), "page size must be in 1..4096");
  require(r.reps >= 1 && r.reps <= 1000, "reps must be in 1..1000");
  require(r.threads >= 0, "threads must be >= 0 (0: all cores)");
}

int64_t lkv_top(const TuneRequest& r) { return tune_bucket(r).lkv_bucket(); }

DecodeShape decode_shape(const TuneRequest& r, int64_t lkv) {
  DecodeShape s;
  s.dtype = r.dtype;
  s.head_dim = r.head_dim;
  s.head_dim_v = r.head_dim_v;
  s.gqa_group = int(r.heads / r.kv_heads);
  s.lq = r.lq;
  const bool pack = s.gqa_group > 1;  // no mods: nothing differs by head
  s.rows = pack ? s.gqa_group * r.lq : r.lq;
  s.lkv = lkv;
  const int64_t heads = pack ? r.kv_heads : r.heads;
  s.engine = runtime::preferred_decode_engine(r.dtype, s.rows, r.paged, AttentionOptions{}, "tune");  // as the runtime does
  const int64_t per_item = runtime::decode_heads_per_item(r.paged, false, heads, s.rows, 0, s.engine);
  s.units = r.batch * ((heads + per_item - 1) / per_item);  // as runtime/decode.cpp counts them
  s.paged = r.paged;
  s.page_size = r.paged ? r.page_size : 0;
  AttentionOptions opt;
  opt.num_threads = r.threads;
  s.threads = runtime::planned_threads(opt);
  return s;
}

PrefillShape prefill_shape(const TuneRequest& r, int64_t lkv) {
  PrefillShape s;
  s.dtype = r.dtype;
  s.head_dim = r.head_dim;
  s.head_dim_v = r.head_dim_v;
  s.gqa_group = int(r.heads / r.kv_heads);
  s.lq = r.lq;
  s.lkv = lkv;
  s.pack_gqa = s.gqa_group > 1 && r.lq <= 16;
  s.units = r.batch * (s.pack_gqa ? r.kv_heads : r.heads);
  s.engine = preferred_prefill_engine(r.dtype, AttentionOptions{});
  AttentionOptions opt;
  opt.num_threads = r.threads;
  s.threads = runtime::planned_threads(opt);
  return s;
}

// The inputs of the tuned shape: random q, k, v at the bucket's top KV length; for a paged
// request the same keys in a cache of shuffled pages.
struct Inputs {
  OwnedTensor q, k, v, out, k_cache, v_cache, table, lens;
};

Inputs make_inputs(const TuneRequest& r, int64_t lq, int64_t lkv) {
  Inputs in;
  in.q = OwnedTensor::make("q", r.dtype, {r.batch, r.heads, lq, r.head_dim});
  in.out = OwnedTensor::make("out", r.dtype, {r.batch, r.heads, lq, r.head_dim_v});
  fill_random(in.q.view, 1);
  if (!r.paged) {
    in.k = OwnedTensor::make("k", r.dtype, {r.batch, r.kv_heads, lkv, r.head_dim});
    in.v = OwnedTensor::make("v", r.dtype, {r.batch, r.kv_heads, lkv, r.head_dim_v});
    fill_random(in.k.view, 2);
    fill_random(in.v.view, 3);
    return in;
  }
  const int64_t per_seq = (lkv + r.page_size - 1) / r.page_size, pages = r.batch * per_seq;
  in.k_cache = OwnedTensor::make("k_cache", r.dtype, {pages, r.page_size, r.kv_heads, r.head_dim});
  in.v_cache = OwnedTensor::make("v_cache", r.dtype, {pages, r.page_size, r.kv_heads, r.head_dim_v});
  fill_random(in.k_cache.view, 2);
  fill_random(in.v_cache.view, 3);
  in.table = OwnedTensor::make("block_table", DType::I32, {r.batch, per_seq});
  in.lens = OwnedTensor::make("seq_lens", DType::I32, {r.batch});
  std::vector<int32_t> order(static_cast<size_t>(pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(7));  // as a serving engine's allocator leaves them
  for (int64_t i = 0; i < pages; ++i) in.table.data<int32_t>()[i] = order[size_t(i)];
  for (int64_t b = 0; b < r.batch; ++b) in.lens.data<int32_t>()[b] = int32_t(lkv);
  return in;
}

// One call with the candidate's knobs as kernel options.
void run_once(const TuneRequest& r, Inputs& in, const TuneCandidate& c) {
  AttentionOptions opt;
  opt.enable_gqa = r.heads != r.kv_heads;
  opt.num_threads = r.threads;
  opt.block_m = c.block_m;
  opt.block_n = c.block_n;
  opt.partition_size = c.partition_size;
  opt.force_prefill = r.path == "prefill";
  if (r.path == "decode" && !c.engine.empty()) opt.use_amx = c.engine == runtime::decode_engine_name(PrefillEngine::Amx);
  ModSet none;
  if (r.paged)
    paged_flex_attention(in.q.view, in.k_cache.view, in.v_cache.view, in.table.view, in.lens.view, in.out.view,
                         nullptr, none, ModBindings{}, opt);
  else
    flex_attention(in.q.view, in.k.view, in.v.view, in.out.view, nullptr, none, ModBindings{}, nullptr, opt);
}

// Median microseconds of `reps` calls after one untimed call (compile, warm caches).
double time_candidate(const TuneRequest& r, Inputs& in, const TuneCandidate& c) {
  run_once(r, in, c);
  std::vector<double> us;
  for (int i = 0; i < r.reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    run_once(r, in, c);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

// Decode: BLOCK_N x PARTITION_SIZE, and where AMX can run (bf16 / fp16 on an AMX host) each on
// both engines, "dot" and "amx": the rows from which the tiles win were measured on one host
// (runtime/tuning.h); the winner's engine is stored with its knobs.
std::vector<TuneCandidate> decode_candidates(const TuneRequest& r, int64_t lkv) {
  std::vector<std::string> engines = {""};
  if (runtime::decode_amx_possible(r.dtype))
    engines = {runtime::decode_engine_name(PrefillEngine::Fma), runtime::decode_engine_name(PrefillEngine::Amx)};
  std::vector<TuneCandidate> out;
  for (int bn : {64, 128, 256}) {
    const int64_t quantum = r.paged ? std::lcm(int64_t(bn), r.page_size) : int64_t(bn);
    std::vector<int64_t> sizes;
    for (int64_t p = 128; p < lkv; p *= 2)
      if (p % quantum == 0 && (lkv + p - 1) / p <= 1024) sizes.push_back(p);
    sizes.push_back((lkv + quantum - 1) / quantum * quantum);  // one partition: no split
    for (int64_t p : sizes)
      for (const std::string& e : engines) out.push_back({0, bn, p, 0, "", e});
  }
  return out;
}

std::vector<TuneCandidate> prefill_candidates(const PrefillShape& s) {
  std::vector<TuneCandidate> out;
  for (int bm : {16, 32, 64, 128})
    for (int bn : {32, 64, 128, 256})
      if (s.engine != PrefillEngine::Amx || bn % 32 == 0) out.push_back({bm, bn, 0, 0, ""});
  // AMX streams K and V once per query tile, so taller tiles pay where the scratch fits: at D 128
  // L 4096 (2-core AMX host) 256 x 128 ran 4-7% (fp16) and 5-10% (bf16) faster than 128 x 128,
  // bf16 256 x 256 up to 14%. Calls with a BlockMask of 128-row blocks fall back to 128 (its gcd).
  if (s.engine == PrefillEngine::Amx && s.lq >= 256)
    for (int bn : {128, 256})
      if (runtime::tile_scratch_bound(s.dtype, s.head_dim, s.head_dim_v, 256, bn, s.engine) <= runtime::kTileScratchLimit)
        out.push_back({256, bn, 0, 0, ""});
  return out;
}

std::string now_iso8601() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

}  // namespace

runtime::TuningBucket tune_bucket(const TuneRequest& r) {
  check_request(r);
  return r.path == "decode" ? runtime::decode_bucket(decode_shape(r, r.lkv))
                            : runtime::prefill_bucket(prefill_shape(r, r.lkv));
}

TuneResult tune(const TuneRequest& r, const TuneProgress& progress) {
  check_request(r);
  const runtime::TuningBucket bucket = tune_bucket(r);
  const int64_t lkv = lkv_top(r);
  TuneResult res;
  res.bucket = bucket.key();

  // The cost model's choice, timed first and apart from the candidates (it may be one of them).
  TuneCandidate def;
  if (r.path == "decode") {
    const runtime::DecodeKnobs k = runtime::default_decode_knobs(decode_shape(r, lkv));
    def = {0, k.block_n, k.partition_size, 0, ""};
    res.candidates = decode_candidates(r, lkv);
  } else {
    const PrefillShape s = prefill_shape(r, lkv);
    const runtime::PrefillKnobs k = runtime::default_prefill_knobs(s);
    def = {k.block_m, k.block_n, 0, 0, ""};
    res.candidates = prefill_candidates(s);
  }
  // Prefill queries at their bucket's top too; decode rows are exact (they pick the kernel).
  Inputs in = make_inputs(r, r.path == "prefill" ? bucket.lq_bucket() : r.lq, lkv);
  const int total = int(res.candidates.size()) + 2;  // the default, the candidates, the playoff
  if (progress) progress(0, total, def);
  def.us = time_candidate(r, in, def);  // errors here are real errors: the default must run
  for (size_t i = 0; i < res.candidates.size(); ++i) {
    TuneCandidate& c = res.candidates[i];
    if (progress) progress(int(i) + 1, total, c);
    try {
      c.us = time_candidate(r, in, c);
    } catch (const Error& e) {  // e.g. blocks whose scratch does not fit: not a candidate
      c.us = -1;
      c.error = e.what();
    }
  }
  if (progress) progress(total - 1, total, def);

  // Playoff: the first pass times ~20 candidates a few calls each, so its fastest is partly the
  // luckiest (on a shared machine single timings move by 10-30%). The three fastest and the
  // cost model's choice are timed again, interleaved in rotating order over kRounds rounds, and
  // a candidate replaces the cost model's choice only when its median is >= 3% faster.
  std::vector<TuneCandidate> finals;
  for (const TuneCandidate& c : res.candidates)
    if (c.us >= 0) finals.push_back(c);
  std::sort(finals.begin(), finals.end(), [](const TuneCandidate& a, const TuneCandidate& b) { return a.us < b.us; });
  if (finals.size() > 3) finals.resize(3);
  finals.insert(finals.begin(), def);  // finals[0]: the cost model's choice
  constexpr int kRounds = 3;
  std::vector<std::vector<double>> samples(finals.size());
  for (int round = 0; round < kRounds; ++round)
    for (size_t j = 0; j < finals.size(); ++j) {
      const size_t i = (j + size_t(round)) % finals.size();
      samples[i].push_back(time_candidate(r, in, finals[i]));
    }
  for (size_t i = 0; i < finals.size(); ++i) {
    std::sort(samples[i].begin(), samples[i].end());
    finals[i].us = samples[i][samples[i].size() / 2];
  }
  size_t best = 0;
  for (size_t i = 1; i < finals.size(); ++i)
    if (finals[i].us < finals[best].us) best = i;
  if (best != 0 && finals[best].us > 0.97 * finals[0].us) best = 0;  // within noise: keep the model's
  if (progress) progress(total, total, def);
  const TuneCandidate& w = finals[best];
  res.best.block_m = w.block_m;
  res.best.block_n = w.block_n;
  res.best.partition_size = w.partition_size;
  res.best.engine = w.engine;
  res.best.us = w.us;
  res.best.default_us = finals[0].us;
  res.best.tuned_at = now_iso8601();
  res.best.detail = std::to_string(res.candidates.size()) + " candidates at Lkv=" + std::to_string(lkv) + ", " +
                    std::to_string(r.reps) + " reps; playoff of " + std::to_string(finals.size()) + " over " +
                    std::to_string(kRounds) + " rounds" + (best == 0 ? "; the cost model's choice kept" : "");
  if (r.store) {
    runtime::TuningDb::global().store(bucket, res.best);
    res.stored = true;
  }
  return res;
}

}  // namespace flexjit

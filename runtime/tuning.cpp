#include "runtime/tuning.h"

#include <tbb/info.h>

#include <algorithm>
#include <numeric>

#include "runtime/launch.h"

namespace flexjit::runtime {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

// The unit every partition size must be a multiple of.
int64_t partition_quantum(const DecodeShape& s, int block_n) {
  return s.paged && s.page_size > 0 ? std::lcm(int64_t(block_n), s.page_size) : int64_t(block_n);
}

}  // namespace

int decode_default_block_m(PrefillEngine engine, int64_t rows) {
  return int(std::min<int64_t>(rows, engine == PrefillEngine::Amx ? 128 : 64));
}

int decode_max_units(int block_m, PrefillEngine engine) {
  // decode_amx.h: kMP = round_up(BLOCK_M, 16); decode_dot.h: kRC = fjk_pick_rc(BLOCK_M),
  // kRP = round_up(BLOCK_M, kRC). kMaxUnits = clamp(128 / rows padded, 1, 16).
  auto rc_of = [](int m) {
    if (m <= 4) return m;
    int best = 8;
    if (round_up(m, 6) < round_up(m, best)) best = 6;
    if (round_up(m, 4) < round_up(m, best)) best = 4;
    return best;
  };
  const int rp = int(engine == PrefillEngine::Amx ? round_up(block_m, 16) : round_up(block_m, rc_of(block_m)));
  return std::clamp(128 / rp, 1, 16);
}

int64_t decode_heads_per_item(bool paged, bool mask_reads_h, int64_t heads, int64_t rows, int user_block_m,
                              PrefillEngine engine) {
  const int64_t bm = user_block_m ? std::min<int64_t>(user_block_m, rows) : decode_default_block_m(engine, rows);
  if (!paged || mask_reads_h || rows > bm) return 1;
  return std::min<int64_t>(heads, decode_max_units(int(bm), engine));
}

int64_t decode_amx_scratch_bytes(DType dtype, int64_t D, int64_t Dv, int64_t block_m, int64_t block_n) {
  // FjkDecTile: per unit q (VNNI pairs), o, m, l, alpha; per tile s, kb (32 keys), pb, vb, the
  // zero row and four row-pointer arrays.
  const int64_t mp = round_up(block_m, 16), dp = round_up(D, 32), dvp = round_up(Dv, 32);
  const int64_t halves = dtype == DType::F16 ? 2 : 1, units = decode_max_units(int(block_m), PrefillEngine::Amx);
  const int64_t per_unit = halves * 2 * dp * mp + 4 * mp * dvp + 3 * 4 * mp;
  return units * per_unit + 4 * block_n * mp + halves * (2 * 32 * dp + 2 * mp * block_n + 2 * block_n * dvp) +
         2 * std::max(dp, dvp) + 4 * 8 * block_n + 4096;
}

const char* decode_engine_name(PrefillEngine engine) { return engine == PrefillEngine::Amx ? "amx" : "dot"; }

bool decode_amx_possible(DType dtype) { return (dtype == DType::BF16 || dtype == DType::F16) && amx_available(); }

PrefillEngine preferred_decode_engine(DType dtype, int64_t rows, bool paged, const AttentionOptions& opt,
                                      const std::string& who) {
  const bool amx_dtype = dtype == DType::BF16 || dtype == DType::F16;
  const int64_t min_rows = dtype == DType::F16 ? kDecodeAmxMinRowsF16 : paged ? kDecodeAmxMinRowsPaged : kDecodeAmxMinRows;
  if (opt.use_amx == 0 || (opt.use_amx != 1 && (!amx_dtype || rows < min_rows))) return PrefillEngine::Fma;
  if (!amx_dtype)
    throw Error(who + ": USE_AMX=1 needs bf16 or fp16 inputs, got " + dtype_name(dtype));
  std::string no_amx;
  if (!amx_available(&no_amx)) {
    if (opt.use_amx == 1) throw Error(who + ": USE_AMX=1 but " + no_amx);
    return PrefillEngine::Fma;
  }
  return PrefillEngine::Amx;
}

PrefillEngine decode_engine_for_blocks(PrefillEngine preferred, DType dtype, int64_t D, int64_t Dv, int block_m,
                                       int block_n, const AttentionOptions& opt, const std::string& who) {
  if (preferred != PrefillEngine::Amx) return preferred;
  std::string why;
  if (block_n % 32 != 0)
    why = "the AMX decode engine needs BLOCK_N a multiple of 32, got " + std::to_string(block_n);
  else if (decode_amx_scratch_bytes(dtype, D, Dv, block_m, block_n) > kTileScratchLimit)
    why = "the AMX decode engine's scratch for D " + std::to_string(D) + ", Dv " + std::to_string(Dv) +
          ", BLOCK_M " + std::to_string(block_m) + ", BLOCK_N " + std::to_string(block_n) +
          " exceeds 1 MiB; pass a smaller BLOCK_N or BLOCK_M";
  if (why.empty()) return PrefillEngine::Amx;
  if (opt.use_amx == 1) throw Error(who + ": USE_AMX=1 but " + why);
  return PrefillEngine::Fma;
}

int planned_threads(const AttentionOptions& opt) {
  return opt.num_threads > 0 ? opt.num_threads : tbb::info::default_concurrency();
}

void finish_partitions(const DecodeShape& s, DecodeKnobs* k) {
  const int64_t q = partition_quantum(s, k->block_n);
  const int64_t lkv = std::max<int64_t>(s.lkv, 1);
  if (k->partition_size <= 0 || k->partition_size >= lkv) k->partition_size = round_up(lkv, q);
  k->partition_size = std::max(q, round_up(k->partition_size, q));
  k->num_partitions = ceil_div(lkv, k->partition_size);
}

DecodeKnobs default_decode_knobs(const DecodeShape& s) {
  DecodeKnobs k;
  k.block_m = decode_default_block_m(s.engine, s.rows);
  k.block_n = 128;
  k.tuning = "default";
  // Items = units x row blocks x partitions, each ~partition_size keys. With too few items some
  // threads idle (B = 1 and one KV head: one thread of many); with too many the per-partition
  // costs (packing Q, writing and merging a partial state) add up. Take the fewest partitions
  // (of at least 256 keys) whose items load the threads to >= 90% (items / (threads * rounds));
  // then, while partitions stay >= 1024 keys, more of them up to 4 items per thread, so that a
  // thread slowed down mid-call (a shared machine) leaves work the others can take.
  const int64_t units = std::max<int64_t>(1, s.units * ceil_div(s.rows, k.block_m));
  const int64_t threads = std::max(1, s.threads);
  const int64_t lkv = std::max<int64_t>(s.lkv, 1);
  const int64_t max_parts = std::max<int64_t>(1, lkv / std::max<int64_t>(256, partition_quantum(s, k.block_n)));
  auto load_of = [&](const DecodeKnobs& c) {
    const int64_t items = units * c.num_partitions;
    return double(items) / double(threads * ceil_div(items, threads));
  };
  DecodeKnobs best = k;
  best.partition_size = 0;
  finish_partitions(s, &best);  // one partition
  double best_load = load_of(best);
  for (int64_t parts = 2; parts <= max_parts && best_load < 0.9; ++parts) {
    DecodeKnobs c = k;
    c.partition_size = ceil_div(lkv, parts);
    finish_partitions(s, &c);  // rounding the size up may leave fewer partitions than asked
    if (load_of(c) > best_load + 1e-9) best = c, best_load = load_of(c);
  }
  for (int64_t parts = best.num_partitions + 1;
       units * best.num_partitions < 4 * threads && parts <= max_parts && lkv / parts >= 1024; ++parts) {
    DecodeKnobs c = k;
    c.partition_size = ceil_div(lkv, parts);
    finish_partitions(s, &c);
    if (c.num_partitions > best.num_partitions && load_of(c) >= 0.9) best = c;
  }
  return best;
}

TuningBucket decode_bucket(const DecodeShape& s) {
  TuningBucket b;
  b.path = "decode";
  b.dtype = s.dtype;
  b.head_dim = s.head_dim;
  b.head_dim_v = s.head_dim_v;
  b.gqa_group = s.gqa_group;
  b.lq = s.lq;
  b.lkv = s.lkv;
  b.work = s.units;
  b.paged = s.paged;
  b.threads = s.threads;
  b.engine = decode_engine_name(s.engine);
  return b;
}

DecodeKnobs plan_decode(const DecodeShape& s, const AttentionOptions& opt) {
  if (opt.block_n && (opt.block_n % 16 || opt.block_n < 16 || opt.block_n > 512))
    throw Error("the decode kernel needs BLOCK_N a multiple of 16 in 16..512, got " + std::to_string(opt.block_n) +
                " (or pass FORCE_USE_FLEX_ATTENTION to run the prefill kernel)");
  if (opt.block_m && (opt.block_m < 1 || opt.block_m > 128))
    throw Error("the decode kernel takes BLOCK_M (query rows per work item) in 1..128, got " +
                std::to_string(opt.block_m));
  DecodeKnobs k = default_decode_knobs(s);
  if (opt.partition_size == 0 && !opt.block_n && opt.use_tuning) {
    if (auto t = TuningDb::global().lookup(decode_bucket(s))) {
      if (t->block_n % 16 == 0 && t->block_n >= 16 && t->block_n <= 512 && t->partition_size > 0) {
        k.block_n = t->block_n;
        k.partition_size = t->partition_size;
        k.tuning = "tuned";
        if (t->engine == decode_engine_name(PrefillEngine::Fma) || t->engine == decode_engine_name(PrefillEngine::Amx))
          k.engine = t->engine;
        finish_partitions(s, &k);
      }
    }
  }
  if (opt.block_m) k.block_m = opt.block_m;
  if (opt.block_n || opt.partition_size) {
    k.tuning = "user";
    if (opt.block_n) {
      k.block_n = opt.block_n;
    } else if (opt.partition_size % k.block_n) {
      // A PARTITION_SIZE alone brings blocks that tile it: the largest multiple of 16 dividing both.
      k.block_n = int(std::gcd(int64_t(k.block_n), opt.partition_size));
      if (k.block_n % 16)
        throw Error("PARTITION_SIZE must be a positive multiple of 16 (the decode kernel's key blocks), got " +
                    std::to_string(opt.partition_size));
    }
    const int64_t q = partition_quantum(s, k.block_n);
    if (opt.partition_size) {
      if (opt.partition_size < 0 || opt.partition_size % q)
        throw Error("PARTITION_SIZE must be a positive multiple of " + std::to_string(q) + " (BLOCK_N = " +
                    std::to_string(k.block_n) +
                    (s.paged ? ", page size " + std::to_string(s.page_size) : std::string()) + "), got " +
                    std::to_string(opt.partition_size));
      k.partition_size = opt.partition_size;
    } else if (k.partition_size % q) {
      k.partition_size = round_up(k.partition_size, q);
    }
    finish_partitions(s, &k);
  }
  return k;
}

TuningBucket prefill_bucket(const PrefillShape& s) {
  TuningBucket b;
  b.path = "prefill";
  b.dtype = s.dtype;
  b.head_dim = s.head_dim;
  b.head_dim_v = s.head_dim_v;
  b.gqa_group = s.gqa_group;
  b.lq = s.lq;
  b.lkv = s.lkv;
  b.work = s.units;
  b.threads = s.threads;
  b.engine = engine_name(s.engine);
  return b;
}

PrefillKnobs default_prefill_knobs(const PrefillShape& s) {
  PrefillKnobs k;
  flexjit::default_blocks(s.head_dim, s.dtype, s.lq, &k.block_m, &k.block_n, s.engine);
  if (s.pack_gqa) {  // the tile holds group * Lq rows: pad them to one, two or four vectors
    const int64_t rows = s.gqa_group * s.lq;
    k.block_m = rows <= 16 ? 16 : rows <= 32 ? 32 : 64;
  }
  k.tuning = "default";
  return k;
}

PrefillKnobs plan_prefill(const PrefillShape& s, const AttentionOptions& opt) {
  PrefillKnobs k = default_prefill_knobs(s);
  if (!opt.block_m && !opt.block_n && opt.use_tuning) {
    if (auto t = TuningDb::global().lookup(prefill_bucket(s))) {
      const bool ok = t->block_m >= 1 && t->block_m <= 256 && t->block_n >= 1 && t->block_n <= 512 &&
                      (s.engine != PrefillEngine::Amx || t->block_n % 32 == 0);
      if (ok) {
        k.block_m = t->block_m;
        k.block_n = t->block_n;
        k.tuning = "tuned";
      }
    }
  }
  if (opt.block_m || opt.block_n) k.tuning = "user";
  if (opt.block_m) k.block_m = opt.block_m;
  if (opt.block_n) k.block_n = opt.block_n;
  return k;
}

}  // namespace flexjit::runtime

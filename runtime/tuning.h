// Where a call's kernel knobs come from: the user (kernel options), the tuning database
// (`flexjit tune`, runtime/tuning_db.h) or the cost model below. The planners here are the
// database's only readers; `flexjit tune` (runtime/autotune.h) is its only writer.
#pragma once

#include <cstdint>
#include <string>

#include "jit/types.h"
#include "runtime/attention.h"
#include "runtime/tuning_db.h"

namespace flexjit::runtime {

// What the decode planner needs to know of a call.
struct DecodeShape {
  DType dtype = DType::F32;
  int head_dim = 64, head_dim_v = 64, gqa_group = 1;
  int64_t lq = 1;           // query rows per sequence
  int64_t rows = 1;         // query rows per (b, head) work unit: GQA_GROUP * Lq when packed, else Lq
  int64_t lkv = 1;          // keys of the longest sequence
  int64_t units = 1;        // independent work units: B * head chunks (decode_heads_per_item)
  bool paged = false;
  int64_t page_size = 0;    // paged only: PARTITION_SIZE must be a multiple of it
  int threads = 1;
  // The decode kernel's engine: Fma = the dot engine (templates/cpu/decode_dot.h), Amx = AMX
  // tiles (templates/cpu/decode_amx.h; BLOCK_N a multiple of 32). See preferred_decode_engine.
  PrefillEngine engine = PrefillEngine::Fma;
};

struct DecodeKnobs {
  int block_m = 0;              // query rows per work item
  int block_n = 0;              // keys per block (multiple of 16)
  int64_t partition_size = 0;   // keys per partition (multiple of BLOCK_N and of the page size)
  int64_t num_partitions = 1;
  std::string tuning;           // "user", "tuned" or "default": where PARTITION_SIZE and BLOCK_N came from
  // A tuned entry's engine ("dot" or "amx": `flexjit tune` times both where AMX can run); "" =
  // the runtime's choice (preferred_decode_engine). Honoured unless USE_AMX is given.
  std::string engine;
};

// The decode knobs of a call: kernel options first (opt.partition_size, opt.block_m, opt.block_n),
// then the tuning database's entry for the shape's bucket, then the cost model. Throws
// flexjit::Error for user choices that cannot work (not a multiple of 16 / the page size, ...).
DecodeKnobs plan_decode(const DecodeShape& s, const AttentionOptions& opt);

// The cost model alone: BLOCK_N = 128; the fewest partitions (each >= 256 keys) that keep every
// thread busy to within ~10% (work items = units x partitions spread over `threads`), then more
// (each >= 1024 keys) up to 4 items per thread.
DecodeKnobs default_decode_knobs(const DecodeShape& s);

// Rounds a requested PARTITION_SIZE to what the shape allows (a multiple of BLOCK_N and the page
// size, at least one block) and fills num_partitions.
void finish_partitions(const DecodeShape& s, DecodeKnobs* k);

// The tuning database bucket of a decode shape (engine "dot" or "amx").
TuningBucket decode_bucket(const DecodeShape& s);

// Query rows per decode work item (BLOCK_M) unless the user sets it: up to 64 on the dot engine
// (its register tiles gain nothing from more), up to 128 on AMX, whose tiles take more rows at
// no extra cost per key while every extra row block reads K and V again (GQA 8 x Lq 16, bf16,
// KV 16k: 128-row items 1.21x 64-row ones on the AMX host).
int decode_default_block_m(PrefillEngine engine, int64_t rows);

// How many head units one decode work item can hold for a kernel of BLOCK_M rows per unit: the
// decode kernel's kMaxUnits (templates/cpu/decode_dot.h: a unit's rows padded to its register
// tile; decode_amx.h: to whole 16-row tiles; 128 rows and 16 units at most). Must match the
// templates; the decode tests run items of the most units each BLOCK_M allows.
int decode_max_units(int block_m, PrefillEngine engine = PrefillEngine::Fma);

// Head units per decode work item: more than one for paged caches (whose slots interleave the
// KV heads, so an item reads each page once for all its heads) when a unit's `rows` fit one
// row block (BLOCK_M: the user's, else up to 64, 128 on the AMX engine) and the mask does not
// differ by head.
int64_t decode_heads_per_item(bool paged, bool mask_reads_h, int64_t heads, int64_t rows, int user_block_m,
                              PrefillEngine engine = PrefillEngine::Fma);

// The AMX decode engine's per-thread scratch (bytes; templates/cpu/decode_amx.h FjkDecTile, an
// upper bound, with the most head units an item of BLOCK_M rows holds); the kernel allows
// kTileScratchLimit.
int64_t decode_amx_scratch_bytes(DType dtype, int64_t D, int64_t Dv, int64_t block_m, int64_t block_n);

// Query rows per decode work unit from which the AMX engine is the default where it can run
// (bf16 contiguous / bf16 paged / fp16): below it decoding is bound by reading K and V and the
// dot engine reads them faster. Measured on the AMX host (bench/decode_engines.py: D 128, KV
// 16k-32k, caches flushed), AMX over dot, bf16: contiguous 0.76-0.77x at 1-2 rows, 0.88-0.89x
// at 4, 1.14-1.19x at 8, 1.8-1.9x at 16-32; paged (pages of 16) 0.79x at 1 row, 1.06x at 2,
// 1.15-1.30x at 4, 1.7-1.85x at 8, 2.45x at 16. fp16 (three tile products per product, K always
// packed) crosses later: 0.77x / 1.0x at 8 rows contiguous / paged, 1.17x / 1.21x at 16.
constexpr int64_t kDecodeAmxMinRows = 8, kDecodeAmxMinRowsPaged = 4, kDecodeAmxMinRowsF16 = 16;

// "amx" or "dot": the decode engine's name in --report, tuning buckets and tuned entries.
const char* decode_engine_name(PrefillEngine engine);

// Whether the AMX decode engine can run a call of this dtype here (bf16 / fp16, amx_available);
// preferred_decode_engine checks the same, with the reason, where USE_AMX=1 asks for it.
bool decode_amx_possible(DType dtype);

// The decode kernel's engine for a call with `rows` query rows per unit: AMX tiles for bf16 and
// fp16 where the host allows them (amx_available) and opt.use_amx is 1, or -1 with rows >=
// kDecodeAmxMinRows (bf16 paged: kDecodeAmxMinRowsPaged; fp16: kDecodeAmxMinRowsF16); else the
// dot engine (Fma). Throws flexjit::Error, prefixed by `who`, when
// USE_AMX=1 cannot be honoured (dtype, host). BLOCK_N and the scratch are checked once the
// blocks are known (decode_engine_for_blocks).
PrefillEngine preferred_decode_engine(DType dtype, int64_t rows, bool paged, const AttentionOptions& opt,
                                      const std::string& who);

// `preferred` for the chosen blocks: AMX needs BLOCK_N a multiple of 32 and its scratch within
// kTileScratchLimit; otherwise the dot engine, or an error (prefixed by `who`) under USE_AMX=1.
PrefillEngine decode_engine_for_blocks(PrefillEngine preferred, DType dtype, int64_t D, int64_t Dv, int block_m,
                                       int block_n, const AttentionOptions& opt, const std::string& who);

// The threads a call runs on: opt.num_threads if set, else TBB's default concurrency.
int planned_threads(const AttentionOptions& opt);

// What the prefill planner needs to know of a call.
struct PrefillShape {
  DType dtype = DType::F32;
  int head_dim = 64, head_dim_v = 64, gqa_group = 1;
  int64_t lq = 1, lkv = 1;
  int64_t units = 1;      // B * (Hkv if the GQA group shares a tile, else Hq)
  bool pack_gqa = false;  // a tile holds a GQA group's (head, query) rows
  // The preferred engine (preferred_prefill_engine); Amx needs BLOCK_N a multiple of 32.
  PrefillEngine engine = PrefillEngine::Fma;
  int threads = 1;
};

struct PrefillKnobs {
  int block_m = 0, block_n = 0;
  std::string tuning;  // "user", "tuned" or "default"
};

// BLOCK_M x BLOCK_N of a prefill call: kernel options (each alone), else the tuning database's
// entry for the bucket, else the cost model (default_blocks; packed GQA tiles sized to the rows).
PrefillKnobs plan_prefill(const PrefillShape& s, const AttentionOptions& opt);
// The cost model alone (what plan_prefill uses without options or a database entry).
PrefillKnobs default_prefill_knobs(const PrefillShape& s);
TuningBucket prefill_bucket(const PrefillShape& s);

}  // namespace flexjit::runtime

// paged_flex_attention: validates a paged-KV decode call, then runs the decode path
// (runtime/decode.h). Every page index a call can reach is checked here, because the kernel
// trusts the tables.
#include <cmath>
#include <string>

#include "runtime/attention.h"
#include "runtime/bound_mods.h"
#include "runtime/decode.h"

namespace flexjit {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error("paged_flex_attention: " + msg); }

// Checks run on every call: the message (string building, shape printing) is made only on failure.
#define REQUIRE(cond, msg) \
  do {                      \
    if (!(cond)) fail(msg);  \
  } while (0)

std::string num(int64_t x) { return std::to_string(x); }

}  // namespace

void paged_flex_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                          const TensorView& block_table, const TensorView& seq_lens, const TensorView& out,
                          const TensorView* lse, const ModSet& mods, const ModBindings& bind,
                          const AttentionOptions& opt, AttentionReport* report) {
  REQUIRE(q.rank == 4, "q must be 4-D [B, Hq, Lq, D], got " + q.shape_str());
  REQUIRE(k_cache.rank == 4 && v_cache.rank == 4,
          "k_cache and v_cache must be 4-D [num_pages, page_size, Hkv, D], got " + k_cache.shape_str() + " and " +
              v_cache.shape_str());
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&out, "out"}}) {
    REQUIRE(t->data != nullptr || t->numel() == 0, std::string(name) + " has no data");
    for (int i = 0; i < t->rank; ++i) REQUIRE(t->sizes[i] >= 1, std::string(name) + " has an empty dim: " + t->shape_str());
  }
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
  const int64_t pages = k_cache.sizes[0], page_size = k_cache.sizes[1], Hkv = k_cache.sizes[2], Dv = v_cache.sizes[3];
  REQUIRE(q.dtype == DType::F32 || q.dtype == DType::BF16 || q.dtype == DType::F16,
          std::string("q has dtype ") + dtype_name(q.dtype) + "; supported: fp32, bf16, fp16");
  REQUIRE(k_cache.dtype == q.dtype && v_cache.dtype == q.dtype && out.dtype == q.dtype,
          std::string("q, k_cache, v_cache and out must share a dtype, got ") + dtype_name(q.dtype) + ", " +
              dtype_name(k_cache.dtype) + ", " + dtype_name(v_cache.dtype) + ", " + dtype_name(out.dtype));
  REQUIRE(Lq <= 16, "paged attention runs the decode kernel, for up to 16 query rows per sequence (decoding, "
                    "speculative verification); got Lq=" + num(Lq) + ". Run longer queries (prefill) with "
                    "flex_attention on contiguous K/V");
  REQUIRE(!opt.force_prefill, "FORCE_USE_FLEX_ATTENTION has no paged form: the prefill kernel reads contiguous K/V");
  REQUIRE(k_cache.sizes[3] == D, "k_cache head dim " + num(k_cache.sizes[3]) + " differs from q's " + num(D));
  REQUIRE(v_cache.sizes[0] == pages && v_cache.sizes[1] == page_size && v_cache.sizes[2] == Hkv,
          "v_cache must match k_cache in [num_pages, page_size, Hkv]: k_cache " + k_cache.shape_str() + ", v_cache " +
              v_cache.shape_str());
  REQUIRE(D <= 256 && Dv <= 256, "head dims up to 256 are supported on CPU, got D=" + num(D) + " Dv=" + num(Dv));
  REQUIRE(k_cache.strides[3] == 1 && v_cache.strides[3] == 1,
          "k_cache and v_cache must be contiguous in their last (head) dim; call .contiguous() on them");
  runtime::check_mod_index_range(B, Hq, Lq, 1, "paged_flex_attention");  // positions: int32 seq_lens
  REQUIRE(Hq % Hkv == 0, "query heads (" + num(Hq) + ") must be a multiple of KV heads (" + num(Hkv) + ")");
  REQUIRE(Hq == Hkv || opt.enable_gqa,
          "q has " + num(Hq) + " heads but the caches have " + num(Hkv) + "; pass enable_gqa=true for GQA/MQA");
  REQUIRE(out.rank == 4 && out.sizes[0] == B && out.sizes[1] == Hq && out.sizes[2] == Lq && out.sizes[3] == Dv,
          "out must be [B, Hq, Lq, Dv] = [" + num(B) + ", " + num(Hq) + ", " + num(Lq) + ", " + num(Dv) + "], got " +
              out.shape_str());
  if (lse)
    REQUIRE(lse->rank == 3 && lse->dtype == DType::F32 && lse->sizes[0] == B && lse->sizes[1] == Hq &&
                lse->sizes[2] == Lq,
            "lse must be fp32 [B, Hq, Lq], got " + std::string(dtype_name(lse->dtype)) + " " + lse->shape_str());
  if (opt.scale) REQUIRE(std::isfinite(*opt.scale), "scale must be finite");

  REQUIRE(block_table.rank == 2 && block_table.dtype == DType::I32 && block_table.sizes[0] == B,
          "block_table must be int32 [B, max_pages] with B=" + num(B) + ", got " +
              std::string(dtype_name(block_table.dtype)) + " " + block_table.shape_str());
  REQUIRE(block_table.strides[1] == 1, "block_table must be contiguous in its last dim; call .contiguous() on it");
  REQUIRE(seq_lens.rank == 1 && seq_lens.dtype == DType::I32 && seq_lens.sizes[0] == B,
          "seq_lens must be int32 [B] with B=" + num(B) + ", got " + std::string(dtype_name(seq_lens.dtype)) + " " +
              seq_lens.shape_str());
  REQUIRE(block_table.data != nullptr && seq_lens.data != nullptr, "block_table and seq_lens need data");
  if (opt.partition_size)
    REQUIRE(opt.partition_size % page_size == 0, "PARTITION_SIZE " + num(opt.partition_size) +
                                                     " must be a multiple of the page size " + num(page_size));

  // The tables: every page a sequence uses must exist; pages past its length are never read.
  const int64_t max_pages = block_table.sizes[1];
  const auto* lens = static_cast<const int32_t*>(seq_lens.data);
  const auto* table = static_cast<const int32_t*>(block_table.data);
  // (Messages are built only on failure: this runs on every decode step, over every page.)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b * seq_lens.strides[0]];
    if (len != 0 && len < Lq)
      fail("seq_lens[" + num(b) + "] = " + num(len) + " is less than the query length Lq=" + num(Lq) +
                         ": seq_lens counts a sequence's keys including its Lq new tokens (0 marks an unused "
                         "batch slot)");
    if (len > max_pages * page_size || len < 0)
      fail("seq_lens[" + num(b) + "] = " + num(len) + " needs " + num((len + page_size - 1) / page_size) +
                         " pages but block_table has " + num(max_pages) + " per sequence");
    const int32_t* row = table + b * block_table.strides[0];
    for (int64_t p = 0; p < (len + page_size - 1) / page_size; ++p)
      if (row[p] < 0 || row[p] >= pages)
        fail("block_table[" + num(b) + ", " + num(p) + "] = " + num(row[p]) +
                           " is not a page of the cache (0.." + num(pages - 1) + ")");
  }
  validate(mods);
  runtime::DecodeKv kv;
  kv.k = &k_cache;
  kv.v = &v_cache;
  kv.block_table = &block_table;
  kv.seq_lens = &seq_lens;
  runtime::run_decode(q, kv, out, lse, mods, bind, nullptr, opt, report);
}

}  // namespace flexjit

#include "runtime/torch/block_mask_interop.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "jit/types.h"

namespace flexjit {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

[[noreturn]] void fail(const std::string& msg) { throw Error("block_mask: " + msg); }

// The index tensors as contiguous int64, after checking device, dtype and rank.
at::Tensor checked(const at::Tensor& t, const char* name, int64_t rank) {
  if (!t.defined()) fail(std::string(name) + " is missing");
  if (!t.device().is_cpu())
    fail(std::string(name) + " is on " + t.device().str() +
         "; flexjit runs on CPU: move the BlockMask with .to('cpu')");
  if (t.scalar_type() != at::kInt && t.scalar_type() != at::kLong)
    fail(std::string(name) + " has dtype " + c10::toString(t.scalar_type()) +
         "; block indices must be int32 (or int64)");
  if (t.dim() != rank)
    fail(std::string(name) + " must be " + std::to_string(rank) + "-D " +
         (rank == 3 ? "[B, H, QB]" : "[B, H, QB, KVB]") + ", got shape " + shape_of(t));
  return t.to(at::kLong).contiguous();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

runtime::BlockMask from_torch_block_mask(const TorchBlockMaskTensors& t, int64_t Lq, int64_t Lkv) {
  const int64_t qbs = t.q_block_size, kvbs = t.kv_block_size;
  if (qbs < 1 || kvbs < 1)
    fail("BLOCK_SIZE must be positive, got (" + std::to_string(qbs) + ", " + std::to_string(kvbs) +
         ")");
  if (Lq < 1 || Lkv < 1)
    fail("sequence lengths must be >= 1, got Lq=" + std::to_string(Lq) +
         " Lkv=" + std::to_string(Lkv));
  const bool has_full = t.full_kv_num_blocks.defined() || t.full_kv_indices.defined();
  if (has_full && !(t.full_kv_num_blocks.defined() && t.full_kv_indices.defined()))
    fail("full_kv_num_blocks and full_kv_indices must be given together (or both left out)");

  at::Tensor num = checked(t.kv_num_blocks, "kv_num_blocks", 3),
             idx = checked(t.kv_indices, "kv_indices", 4);
  at::Tensor fnum, fidx;
  if (has_full) {
    fnum = checked(t.full_kv_num_blocks, "full_kv_num_blocks", 3);
    fidx = checked(t.full_kv_indices, "full_kv_indices", 4);
  }
  const int64_t B = num.size(0), H = num.size(1), QB = num.size(2), KVB = idx.size(3);
  if (B < 1 || H < 1 || QB < 1 || KVB < 1)
    fail("kv_num_blocks / kv_indices have an empty dim: " + shape_of(idx));
  if (idx.size(0) != B || idx.size(1) != H || idx.size(2) != QB)
    fail("kv_indices " + shape_of(idx) + " does not start with kv_num_blocks' shape " +
         shape_of(num));
  if (has_full && (!fnum.sizes().equals(num.sizes()) || !fidx.sizes().equals(idx.sizes())))
    fail("full_kv_num_blocks " + shape_of(fnum) + " / full_kv_indices " + shape_of(fidx) +
         " must have the shapes of kv_num_blocks " + shape_of(num) + " / kv_indices " +
         shape_of(idx));
  if (QB != ceil_div(Lq, qbs) || KVB != ceil_div(Lkv, kvbs))
    fail("it has " + std::to_string(QB) + "x" + std::to_string(KVB) + " blocks of " +
         std::to_string(qbs) + "x" + std::to_string(kvbs) + " but the call has Lq=" +
         std::to_string(Lq) + ", Lkv=" + std::to_string(Lkv) + ", which needs " +
         std::to_string(ceil_div(Lq, qbs)) + "x" + std::to_string(ceil_div(Lkv, kvbs)) +
         "; create the BlockMask for these lengths (and this BLOCK_SIZE)");

  runtime::BlockMask m = runtime::make_geometry(B, H, Lq, Lkv, qbs, kvbs);
  const int64_t rows = B * H * QB;
  const int64_t* pn = num.data_ptr<int64_t>();
  const int64_t* pi = idx.data_ptr<int64_t>();
  const int64_t* fn = has_full ? fnum.data_ptr<int64_t>() : nullptr;
  const int64_t* fi = has_full ? fidx.data_ptr<int64_t>() : nullptr;

  // The kernel trusts these lists: a bad count or index would read out of bounds, and a block
  // listed twice would be added into the softmax twice, so check every listed entry once here.
  auto where = [&](int64_t r) {
    return "row (b=" + std::to_string(r / (H * QB)) + ", h=" + std::to_string(r / QB % H) +
           ", q_block=" + std::to_string(r % QB) + ")";
  };
  std::vector<int64_t> seen(KVB, -1);
  int64_t max_p = 0, max_f = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int pass = 0; pass < (has_full ? 2 : 1); ++pass) {
      const char* name = pass ? "full_kv_indices" : "kv_indices";
      int64_t n = pass ? fn[r] : pn[r];
      if (n < 0 || n > KVB)
        fail(std::string(pass ? "full_kv_num_blocks" : "kv_num_blocks") + " " + where(r) + " is " +
             std::to_string(n) + "; it must be in 0.." + std::to_string(KVB));
      const int64_t* row = (pass ? fi : pi) + r * KVB;
      for (int64_t j = 0; j < n; ++j) {
        if (row[j] < 0 || row[j] >= KVB)
          fail(std::string(name) + " " + where(r) + " lists block " + std::to_string(row[j]) +
               "; indices must be in 0.." + std::to_string(KVB - 1));
        if (seen[row[j]] == r)
          fail(
              where(r) + " lists KV block " + std::to_string(row[j]) +
              " twice (across kv_indices and full_kv_indices); each block may appear once per row");
        seen[row[j]] = r;
      }
      (pass ? max_f : max_p) = std::max(pass ? max_f : max_p, n);
    }
  }

  // Our rows are only as wide as the fullest row needs (at least 1).
  auto pack = [&](const int64_t* counts, const int64_t* index, int64_t stride,
                  std::vector<int32_t>* out_num, std::vector<int32_t>* out_idx) {
    out_num->assign(rows, 0);
    out_idx->assign(rows * stride, 0);
    for (int64_t r = 0; r < rows; ++r) {
      (*out_num)[r] = int32_t(counts[r]);
      for (int64_t j = 0; j < counts[r]; ++j)
        (*out_idx)[r * stride + j] = int32_t(index[r * KVB + j]);
    }
  };
  m.kv_stride = std::max<int64_t>(1, max_p);
  pack(pn, pi, m.kv_stride, &m.kv_num_blocks, &m.kv_indices);
  if (has_full) {
    m.full_kv_stride = std::max<int64_t>(1, max_f);
    pack(fn, fi, m.full_kv_stride, &m.full_kv_num_blocks, &m.full_kv_indices);
  }
  return m;
}

TorchBlockMaskTensors to_torch_block_mask(const runtime::BlockMask& m) {
  const int64_t B = m.B, H = m.H, QB = m.num_q_blocks, KVB = m.num_kv_blocks, rows = B * H * QB;
  FLEXJIT_CHECK(
      int64_t(m.kv_num_blocks.size()) == rows && int64_t(m.kv_indices.size()) == rows * m.kv_stride,
      "BlockMask partial arrays are [B, H, QB] and [B, H, QB, kv_stride]");
  FLEXJIT_CHECK(m.full_kv_num_blocks.empty() ||
                    (int64_t(m.full_kv_num_blocks.size()) == rows &&
                     int64_t(m.full_kv_indices.size()) == rows * m.full_kv_stride),
                "BlockMask full arrays are empty or [B, H, QB] and [B, H, QB, full_kv_stride]");
  auto unpack = [&](const std::vector<int32_t>& counts, const std::vector<int32_t>& index,
                    int64_t stride, at::Tensor* out_num, at::Tensor* out_idx) {
    *out_num = at::zeros({B, H, QB}, at::kInt);
    *out_idx = at::zeros({B, H, QB, KVB}, at::kInt);
    if (counts.empty()) return;
    int32_t* pn = out_num->data_ptr<int32_t>();
    int32_t* pi = out_idx->data_ptr<int32_t>();
    std::memcpy(pn, counts.data(), sizeof(int32_t) * rows);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(pi + r * KVB, index.data() + r * stride, sizeof(int32_t) * counts[r]);
  };
  TorchBlockMaskTensors t;
  t.q_block_size = m.q_block_size;
  t.kv_block_size = m.kv_block_size;
  unpack(m.kv_num_blocks, m.kv_indices, m.kv_stride, &t.kv_num_blocks, &t.kv_indices);
  unpack(m.full_kv_num_blocks, m.full_kv_indices, m.full_kv_stride, &t.full_kv_num_blocks,
         &t.full_kv_indices);
  return t;
}

}  // namespace flexjit

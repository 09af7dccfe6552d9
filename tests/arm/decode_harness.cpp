// Runs one cross-compiled decode kernel (paged KV) with its mods kernel on an aarch64 machine
// (QEMU's user-mode emulator) against a float64 reference: see prefill_harness.cpp, whose
// conventions it shares. The cache is paged (pages of 16 keys, shuffled page table, 3 sequences
// of different lengths), Lq = 2 queries at absolute positions seq_len - 2 + i (speculative
// decoding), GQA packed (pack_gqa), one partition; mods ALiBi + causal at those positions.
#include "tests/arm/harness_common.h"

extern "C" void ENTRY(const struct FlexDecodeArgs*, fj_i64, fj_i64);
extern "C" void MODS_ENTRY(struct FlexModKernels*);

using namespace arm_harness;

namespace {
constexpr int kB = 3, kHkv = 2, kHq = kHkv * GQA_GROUP, kLq = 2, kD = HEAD_DIM, kDv = HEAD_DIM_V, kPage = 16;
constexpr int kSeq[kB] = {2, 97, 130};  // keys per sequence, its kLq new tokens included
}  // namespace

int main() {
  int max_len = 0, pages_per_seq = 0;
  for (int b = 0; b < kB; ++b) max_len = kSeq[b] > max_len ? kSeq[b] : max_len;
  pages_per_seq = (max_len + kPage - 1) / kPage;
  const int num_pages = kB * pages_per_seq + 1;
  std::vector<int> table(size_t(kB) * pages_per_seq), seq_lens(kSeq, kSeq + kB);
  for (int i = 0; i < kB * pages_per_seq; ++i) table[i] = (i * 5 + 3) % num_pages;  // shuffled (5, num_pages coprime)
  std::vector<elem> q, kc, vc, out(size_t(kB) * kHq * kLq * kDv);
  std::vector<float> qx, kx, vx, lse(size_t(kB) * kHq * kLq);
  fill(&q, &qx, size_t(kB) * kHq * kLq * kD);
  fill(&kc, &kx, size_t(num_pages) * kPage * kHkv * kD);
  fill(&vc, &vx, size_t(num_pages) * kPage * kHkv * kDv);
  Mods mods(kHq, MODS_ENTRY);
  if (!mods.ok) return 2;
  const std::vector<float>& slopes = mods.slopes;
  const float scale = 1.0f / std::sqrt(float(kD));

  struct FlexDecodeArgs a;
  std::memset(&a, 0, sizeof a);
  set_tensors(&a, q.data(), {kB, kHq, kLq, kD}, kc.data(), {num_pages, kPage, kHkv, kD}, vc.data(),
              {num_pages, kPage, kHkv, kDv}, out.data(), {kB, kHq, kLq, kDv}, lse.data(), {kB, kHq, kLq});
  a.B = kB, a.Hq = kHq, a.Hkv = kHkv, a.Lq = kLq, a.Lkv = max_len, a.Bkv = 1;
  a.scale = scale;
  a.block_table = table.data();
  a.block_table_stride = pages_per_seq;
  a.page_size = kPage;
  a.seq_lens = seq_lens.data();
  a.partition_size = fj_i64(pages_per_seq) * kPage;  // one partition: out and lse written directly
  a.num_partitions = 1;
  a.heads_per_item = 1;
  mods.bind(&a);
  a.pack_gqa = 1;
  const int rows = GQA_GROUP * kLq;
  const fj_i64 items = fj_i64(kB) * kHkv * ((rows + BLOCK_M - 1) / BLOCK_M);
  ENTRY(&a, 0, items);
  if (mods.error_flag) {
    std::printf("harness: the mods raised their error flag\n");
    return 2;
  }

  Errors err;
  for (int b = 0; b < kB; ++b)
    for (int h = 0; h < kHq; ++h) {
      const int hk = h / GQA_GROUP;
      for (int i = 0; i < kLq; ++i) {
        const int qpos = kSeq[b] - kLq + i;
        std::vector<double> s(size_t(kSeq[b]));
        double m = -INFINITY;
        for (int j = 0; j < kSeq[b]; ++j) {
          const size_t row = (size_t(table[size_t(b) * pages_per_seq + j / kPage]) * kPage + j % kPage) * kHkv + hk;
          double dot = 0;
          for (int d = 0; d < kD; ++d) dot += double(qx[((size_t(b) * kHq + h) * kLq + i) * kD + d]) * kx[row * kD + d];
          s[j] = qpos >= j ? dot * scale + double(slopes[h]) * double(j - qpos) : -INFINITY;
          m = std::fmax(m, s[j]);
        }
        double l = 0;
        for (int j = 0; j < kSeq[b]; ++j) l += s[j] == -INFINITY ? 0 : std::exp(s[j] - m);
        for (int e = 0; e < kDv; ++e) {
          double o = 0;
          for (int j = 0; j < kSeq[b]; ++j) {
            if (s[j] == -INFINITY) continue;
            const size_t row = (size_t(table[size_t(b) * pages_per_seq + j / kPage]) * kPage + j % kPage) * kHkv + hk;
            o += std::exp(s[j] - m) * vx[row * kDv + e];
          }
          err.add_out(load(out[((size_t(b) * kHq + h) * kLq + i) * kDv + e]), l > 0 ? o / l : 0.0);
        }
        err.add_lse(lse[(size_t(b) * kHq + h) * kLq + i], l > 0 ? m + std::log(l) : -INFINITY);
      }
    }
  return err.report();
}

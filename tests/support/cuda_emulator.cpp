// The CPU emulator of CUDA kernels (see cuda_emulator.h). The extern "C" fjemu_* functions at
// the end are what templates/cuda/emulate.cuh calls from JIT-compiled kernel code; the test
// executables that use them export their symbols (CMake ENABLE_EXPORTS) so the JIT finds them.
#include "tests/support/cuda_emulator.h"

#include <sys/mman.h>

#include <boost/context/detail/fcontext.hpp>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>

namespace ctx = boost::context::detail;

namespace flexjit::testing::cuda_emulator {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread; a guard page below
constexpr size_t kGuardBytes = 4096;
constexpr size_t kStaticSmem = 16;  // shared bytes before the dynamic ones

enum class Op { None, Ldmatrix, Mma, Shfl, SyncWarp, Sync, Wgmma, WgmmaFence, WgmmaCommit, WgmmaWait };
const char* op_name(Op op) {
  switch (op) {
    case Op::None: return "nothing";
    case Op::Ldmatrix: return "ldmatrix";
    case Op::Mma: return "mma.sync";
    case Op::Shfl: return "shfl.sync";
    case Op::SyncWarp: return "__syncwarp";
    case Op::Sync: return "__syncthreads";
    case Op::Wgmma: return "wgmma.mma_async";
    case Op::WgmmaFence: return "wgmma.fence";
    case Op::WgmmaCommit: return "wgmma.commit_group";
    case Op::WgmmaWait: return "wgmma.wait_group";
  }
  return "?";
}

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes, size;
};

struct Lane {
  ctx::fcontext_t fiber = nullptr;
  unsigned tid = 0;
  bool done = false;
  Op waiting = Op::None;  // blocked at this collective
  std::vector<std::vector<Copy>> committed;  // cp.async groups, oldest first
  std::vector<Copy> open;                    // issued, not yet committed
  unsigned out[4] = {0, 0, 0, 0};            // a warp collective's result for this lane
  // cp.async data landed (generic proxy) that this thread has not yet fenced into the async proxy
  // (fence.proxy.async.shared::cta), which wgmma reads shared memory through.
  bool unfenced_copies = false;
};

// The collective a warp's lanes are arriving at, with each lane's operands.
struct WarpOp {
  Op op = Op::None;
  int arrived = 0;
  int num = 0, dtype = 0;
  bool trans = false;
  const void* addr[32];
  unsigned a[32][4], b[32][2], val[32];
  float c[32][4];
  int lane_mask[32];
};

// One wgmma.mma_async of a warpgroup, from issue to completion (wgmma.wait_group): its operands
// as read at issue (the values the result is computed from) and where they were, so that the
// completion can check shared memory still holds them (hardware may read it any time up to the
// wait), and each thread's accumulator registers (NaN from issue to completion).
struct WgmmaInFlight {
  int n = 0, scale_d = 0;
  std::vector<float> a, b;                          // 64 x 16, 16 x n (row-major)
  std::vector<std::pair<const unsigned char*, unsigned short>> smem;  // what was read, where
  float* d[128] = {};
  std::vector<float> d_in;                          // 128 x n / 2 (when not chained)
  bool chained[128] = {};                           // input = an earlier in-flight op's result
};

// The warpgroup collective its 128 threads are arriving at, with each thread's operands, and the
// warpgroup's wgmma.mma_async groups in flight.
struct GroupOp {
  Op op = Op::None;
  int arrived = 0;
  int n = 0, scale_d = 0, trans_b = 0, dtype = 0, pending = 0;
  bool regs_a = false;
  unsigned long long desc_a[128], desc_b[128];
  float* d[128];
  unsigned a[128][4];
  bool fenced = false;  // a wgmma.fence since the last wgmma.wait_group
  std::vector<WgmmaInFlight> open;                    // issued, not committed
  std::vector<std::vector<WgmmaInFlight>> committed;  // oldest first
};

struct Stack {
  void* base = nullptr;
  size_t bytes = 0;
};

struct State {
  std::mutex one_launch;
  const Launch* launch = nullptr;
  const std::function<void()>* body = nullptr;
  unsigned block[3] = {0, 0, 0};
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Lane> lanes;
  std::vector<WarpOp> warps;
  std::vector<GroupOp> groups;  // warpgroups (4 consecutive warps), when the block has whole ones
  unsigned char* smem_window = nullptr;  // shared address 0 (1024-byte aligned)
  int sync_arrived = 0;
  Lane* cur = nullptr;
  ctx::fcontext_t scheduler = nullptr;
  std::string error;
  Stats stats;
  std::vector<Stack> stacks;
};
State& st() {
  static State* s = new State;  // never destroyed: fibers may be abandoned mid-kernel
  return *s;
}

std::string where() {
  const State& s = st();
  std::ostringstream os;
  os << "block (" << s.block[0] << ", " << s.block[1] << ", " << s.block[2] << ") thread " << s.cur->tid;
  return os.str();
}

void yield() {
  State& s = st();
  ctx::transfer_t t = ctx::jump_fcontext(s.scheduler, nullptr);
  s.scheduler = t.fctx;
}

// Records the error and parks this fiber for good: the scheduler stops the launch.
[[noreturn]] void fail(const std::string& what) {
  State& s = st();
  if (s.error.empty()) s.error = what + " (" + where() + ")";
  for (;;) yield();
}

void lane_main(ctx::transfer_t t) {
  State& s = st();
  s.scheduler = t.fctx;
  (*s.body)();
  s.cur->done = true;
  yield();  // never resumed
  std::abort();
}

bool in_smem(const void* p, size_t n) {
  const State& s = st();
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= s.smem && c + n <= s.smem + s.smem_bytes;
}

void check_smem_address(const void* p, size_t n, const char* what) {
  if (!in_smem(p, n)) {
    std::ostringstream os;
    os << what << ": address " << p << " (+" << n << " bytes) is outside the block's " << st().smem_bytes
       << " bytes of dynamic shared memory";
    fail(os.str());
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::ostringstream os;
    os << what << ": shared address " << p << " is not 16-byte aligned";
    fail(os.str());
  }
}

// A lane arrives at a warp collective; the last to arrive computes everyone's result.
WarpOp& join(Op op) {
  State& s = st();
  WarpOp& w = s.warps[s.cur->tid / 32];
  if (w.arrived > 0 && w.op != op)
    fail(std::string("warp divergence: lane reached ") + op_name(op) + " while its warp waits at " +
         op_name(w.op));
  w.op = op;
  return w;
}
// kWidth threads (a warp: 32, a warpgroup: 128) arrive at collective w; the last to arrive computes
// everyone's result and releases them.
template <unsigned kWidth, class Collective, class Compute>
void arrive_all(Collective& w, Compute&& compute) {
  State& s = st();
  Lane& me = *s.cur;
  if (++w.arrived < static_cast<int>(kWidth)) {
    me.waiting = w.op;
    yield();
    return;
  }
  compute();
  const unsigned first = me.tid / kWidth * kWidth;
  for (unsigned i = first; i < first + kWidth; ++i) s.lanes[i].waiting = Op::None;
  w.arrived = 0;
  w.op = Op::None;
  ++s.stats.collectives;
}
template <class Compute>
void arrive(WarpOp& w, Compute&& compute) {
  arrive_all<32>(w, std::forward<Compute>(compute));
}

// The same for a warpgroup collective (wgmma.*): 4 consecutive warps from a warp index divisible
// by 4, every thread arriving.
GroupOp& join_group(Op op) {
  State& s = st();
  const unsigned g = s.cur->tid / 128;
  if (g >= s.groups.size())
    fail(std::string(op_name(op)) + ": the block's threads are not whole warpgroups of 128");
  GroupOp& w = s.groups[g];
  if (w.arrived > 0 && w.op != op)
    fail(std::string("warpgroup divergence: thread reached ") + op_name(op) + " while its warpgroup waits at " +
         op_name(w.op));
  w.op = op;
  return w;
}
template <class Compute>
void arrive_group(GroupOp& w, Compute&& compute) {
  arrive_all<128>(w, std::forward<Compute>(compute));
}

float elem_to_float(unsigned short x, int dtype) {
  if (dtype == 1) {
    const unsigned u = unsigned(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &x, 2);
  return float(h);
}

void describe_deadlock() {
  State& s = st();
  std::ostringstream os;
  os << "deadlock in block (" << s.block[0] << ", " << s.block[1] << ", " << s.block[2] << "): ";
  int exited = 0, at_sync = 0;
  for (const Lane& l : s.lanes) exited += l.done, at_sync += l.waiting == Op::Sync;
  os << exited << " threads exited, " << at_sync << " wait at __syncthreads";
  for (size_t w = 0; w < s.warps.size(); ++w)
    if (s.warps[w].arrived > 0)
      os << "; warp " << w << ": " << s.warps[w].arrived << " of 32 lanes at " << op_name(s.warps[w].op);
  for (size_t g = 0; g < s.groups.size(); ++g)
    if (s.groups[g].arrived > 0)
      os << "; warpgroup " << g << ": " << s.groups[g].arrived << " of 128 threads at " << op_name(s.groups[g].op);
  if (s.error.empty()) s.error = os.str();
}

bool run_block(State& s) {
  const unsigned n = s.launch->block_threads;
  std::memset(s.smem, 0xff, s.smem_bytes);  // NaN in bf16 / fp16 / fp32: unloaded reads show
  s.sync_arrived = 0;
  for (WarpOp& w : s.warps) w.arrived = 0, w.op = Op::None;
  for (GroupOp& g : s.groups) g = GroupOp{};
  for (unsigned i = 0; i < n; ++i) {
    Lane& l = s.lanes[i];
    l.tid = i;
    l.done = false;
    l.waiting = Op::None;
    l.committed.clear();
    l.open.clear();
    l.unfenced_copies = false;
    Stack& st_ = s.stacks[i];
    l.fiber = ctx::make_fcontext(static_cast<char*>(st_.base) + st_.bytes, st_.bytes - kGuardBytes, lane_main);
  }
  // Each warp runs as far as it can (to a __syncthreads, or its end) before the next one starts:
  // the most skewed schedule hardware could pick, so a missing barrier shows up as one warp
  // reading a tile another has not loaded, or loading over one another still reads. Odd blocks
  // go from the last warp to the first.
  const unsigned warps = n / 32;
  const bool descending = (s.block[0] + s.block[1] + s.block[2]) % 2 == 1;
  for (;;) {
    bool progress = false;
    for (unsigned wi = 0; wi < warps; ++wi) {
      const unsigned w = descending ? warps - 1 - wi : wi;
      for (bool ran = true; ran;) {
        ran = false;
        for (unsigned i = w * 32; i < w * 32 + 32; ++i) {
          Lane& l = s.lanes[i];
          if (l.done || l.waiting != Op::None) continue;
          ran = progress = true;
          s.cur = &l;
          ctx::transfer_t t = ctx::jump_fcontext(l.fiber, nullptr);
          l.fiber = t.fctx;
          ++s.stats.switches;
          if (!s.error.empty()) return false;
        }
      }
    }
    bool all_done = true;
    for (unsigned i = 0; i < n; ++i) all_done = all_done && s.lanes[i].done;
    if (all_done) {
      for (const GroupOp& g : s.groups)
        if (!g.open.empty() || !g.committed.empty()) {
          s.error = "wgmma.mma_async still in flight when the block's threads exited (no wgmma.wait_group for it)";
          return false;
        }
      break;
    }
    if (!progress) {
      describe_deadlock();
      return false;
    }
  }
  ++s.stats.ctas;
  return true;
}

}  // namespace

std::string run(const Launch& launch, const std::function<void()>& thread_body, Stats* stats) {
  State& s = st();
  std::lock_guard<std::mutex> lock(s.one_launch);
  if (launch.block_threads == 0 || launch.block_threads % 32 != 0 || launch.block_threads > 1024)
    return "cuda emulator: block_threads must be a multiple of 32 in 32..1024, got " +
           std::to_string(launch.block_threads);
  s.launch = &launch;
  s.body = &thread_body;
  s.error.clear();
  s.stats = Stats{};
  s.lanes.assign(launch.block_threads, Lane{});
  s.warps.assign(launch.block_threads / 32, WarpOp{});
  s.groups.assign(launch.block_threads / 128, GroupOp{});
  while (s.stacks.size() < launch.block_threads) {
    Stack k;
    k.bytes = kStackBytes;
    k.base = mmap(nullptr, k.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (k.base == MAP_FAILED) return "cuda emulator: out of memory for thread stacks";
    mprotect(k.base, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
    s.stacks.push_back(k);
  }
  s.smem_bytes = static_cast<size_t>(launch.smem_bytes);
  // The shared window starts 1024-byte aligned; dynamic shared memory starts 16 bytes into it, as
  // if a kernel's static __shared__ variables came first: a kernel that needs 1024-byte aligned
  // tiles (wgmma's swizzled layouts) must align them itself, as on hardware.
  std::unique_ptr<unsigned char, void (*)(void*)> smem(
      static_cast<unsigned char*>(std::aligned_alloc(1024, (s.smem_bytes + kStaticSmem + 1023) / 1024 * 1024 + 1024)),
      std::free);
  s.smem_window = smem.get();
  s.smem = smem.get() + kStaticSmem;
  bool ok = true;
  for (unsigned z = 0; ok && z < launch.grid[2]; ++z)
    for (unsigned y = 0; ok && y < launch.grid[1]; ++y)
      for (unsigned x = 0; ok && x < launch.grid[0]; ++x) {
        s.block[0] = x, s.block[1] = y, s.block[2] = z;
        ok = run_block(s);
      }
  if (stats) *stats = s.stats;
  s.smem = nullptr;
  s.smem_window = nullptr;
  s.cur = nullptr;
  return s.error;
}

}  // namespace flexjit::testing::cuda_emulator

// ---- what emulated kernel code calls (templates/cuda/emulate.cuh declares these) ----
using namespace flexjit::testing::cuda_emulator;

namespace {

// Where element (row, k) of a K-major operand, or (k, col) of an MN-major one, lies: the PTX ISA's
// canonical layouts with the 128-byte swizzle (see templates/cuda/wgmma.cuh), applied to the
// shared address.
struct Descriptor {
  unsigned start, lbo, sbo;
};
Descriptor decode(unsigned long long desc, const char* which) {
  const unsigned swizzle = static_cast<unsigned>(desc >> 62), base_offset = static_cast<unsigned>((desc >> 49) & 7);
  if (swizzle != 1 || base_offset != 0)
    fail(std::string("wgmma: the emulator models 128-byte-swizzled operands at base offset 0 only; descriptor ") +
         which + " has swizzle mode " + std::to_string(swizzle) + ", base offset " + std::to_string(base_offset));
  return {static_cast<unsigned>(desc & 0x3fff) << 4, static_cast<unsigned>((desc >> 16) & 0x3fff) << 4,
          static_cast<unsigned>((desc >> 32) & 0x3fff) << 4};
}
const unsigned char* swizzled(unsigned addr) {
  State& s = st();
  const unsigned phys = addr ^ (((addr >> 7) & 7u) << 4);
  const unsigned char* p = s.smem_window + phys;
  if (!in_smem(p, 2)) {
    std::ostringstream os;
    os << "wgmma: operand element at shared address " << phys << " is outside the block's dynamic shared memory ("
       << kStaticSmem << " .. " << kStaticSmem + s.smem_bytes << ")";
    fail(os.str());
  }
  return p;
}
float read_operand(WgmmaInFlight& op, unsigned addr, int dtype) {
  const unsigned char* p = swizzled(addr);
  unsigned short v;
  std::memcpy(&v, p, 2);
  op.smem.emplace_back(p, v);
  return elem_to_float(v, dtype);
}

}  // namespace

extern "C" {

struct fjemu_dim3 {
  unsigned x, y, z;
};

fjemu_dim3 fjemu_thread_idx() { return {st().cur->tid, 0, 0}; }
fjemu_dim3 fjemu_block_idx() {
  const State& s = st();
  return {s.block[0], s.block[1], s.block[2]};
}
fjemu_dim3 fjemu_block_dim() { return {st().launch->block_threads, 1, 1}; }
fjemu_dim3 fjemu_grid_dim() {
  const Launch& l = *st().launch;
  return {l.grid[0], l.grid[1], l.grid[2]};
}
void* fjemu_dynamic_smem() { return st().smem; }

void fjemu_syncthreads() {
  State& s = st();
  Lane& me = *s.cur;
  if (++s.sync_arrived < static_cast<int>(s.launch->block_threads)) {
    me.waiting = Op::Sync;
    yield();
    return;
  }
  s.sync_arrived = 0;
  for (Lane& l : s.lanes) l.waiting = Op::None;
  ++s.stats.collectives;
}

void fjemu_syncwarp(unsigned member_mask) {
  if (member_mask != 0xffffffffu) fail("__syncwarp: the emulator supports the full member mask only");
  WarpOp& w = join(Op::SyncWarp);
  arrive(w, [] {});
}

unsigned fjemu_shfl_xor(unsigned member_mask, unsigned value, int lane_mask) {
  State& s = st();
  Lane& me = *s.cur;
  const unsigned lane = me.tid % 32;
  if (member_mask != 0xffffffffu) fail("shfl.sync: the emulator supports the full member mask only");
  if (lane_mask < 0 || lane_mask > 31) fail("shfl.sync.bfly: lane mask " + std::to_string(lane_mask) + " is not in 0..31");
  WarpOp& w = join(Op::Shfl);
  w.val[lane] = value;
  w.lane_mask[lane] = lane_mask;
  arrive(w, [&] {
    const unsigned first = me.tid / 32 * 32;
    for (unsigned l = 0; l < 32; ++l) s.lanes[first + l].out[0] = w.val[l ^ static_cast<unsigned>(w.lane_mask[l])];
  });
  return me.out[0];
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i; lane l receives, per matrix, row l/4's elements 2(l%4) and 2(l%4)+1 (low half
// first), or with .trans the transposed matrix's.
void fjemu_ldmatrix(unsigned* r, const void* row_address, int num, int trans) {
  State& s = st();
  Lane& me = *s.cur;
  const unsigned lane = me.tid % 32;
  if (num != 1 && num != 2 && num != 4) fail("ldmatrix: .x" + std::to_string(num) + " is not a shape");
  WarpOp& w = join(Op::Ldmatrix);
  if (w.arrived > 0 && (w.num != num || w.trans != (trans != 0))) fail("ldmatrix: lanes disagree on .num / .trans");
  w.num = num;
  w.trans = trans != 0;
  w.addr[lane] = row_address;
  arrive(w, [&] {
    unsigned short m[4][8][8];
    for (int i = 0; i < w.num; ++i) {
      for (int row = 0; row < 8; ++row) {
        const void* p = w.addr[8 * i + row];
        check_smem_address(p, 16, "ldmatrix");
        std::memcpy(m[i][row], p, 16);
      }
      // Bank conflicts of this matrix's phase: distinct rows per group of 4 banks.
      uintptr_t chunk[8];  // 16-byte chunk index of each row; rows on one chunk are one access
      for (int row = 0; row < 8; ++row)
        chunk[row] = static_cast<uintptr_t>(static_cast<const unsigned char*>(w.addr[8 * i + row]) - s.smem_window) / 16;
      unsigned ways = 1;
      for (int row = 0; row < 8; ++row) {
        unsigned distinct = 0;  // distinct chunks on row's banks among rows 0..row, row's own included
        for (int other = 0; other <= row; ++other) {
          bool first = chunk[other] % 8 == chunk[row] % 8;
          for (int prev = 0; first && prev < other; ++prev) first = chunk[prev] != chunk[other];
          distinct += first ? 1 : 0;
        }
        ways = std::max(ways, distinct);
      }
      ++s.stats.ldmatrix_phases;
      if (ways > 1) ++s.stats.ldmatrix_conflicted_phases;
      s.stats.ldmatrix_worst_ways = std::max(s.stats.ldmatrix_worst_ways, ways);
    }
    const unsigned first = me.tid / 32 * 32;
    for (unsigned l = 0; l < 32; ++l)
      for (int i = 0; i < w.num; ++i) {
        const unsigned g = l / 4, c = 2 * (l % 4);
        const unsigned short lo = w.trans ? m[i][c][g] : m[i][g][c];
        const unsigned short hi = w.trans ? m[i][c + 1][g] : m[i][g][c + 1];
        s.lanes[first + l].out[i] = unsigned(lo) | (unsigned(hi) << 16);
      }
  });
  for (int i = 0; i < num; ++i) r[i] = me.out[i];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D = A B + C with, for lane l,
// g = l/4 and t = l%4: A (16x16) a0 = rows g, cols 2t..2t+1; a1 = rows g+8; a2 = cols +8;
// a3 = rows g+8, cols +8. B (16x8, k x n) b0 = k 2t..2t+1, col g; b1 = k +8. C, D: c0,c1 =
// row g, cols 2t, 2t+1; c2,c3 = row g+8. dtype 1 = bf16, 2 = fp16; fp32 accumulation.
void fjemu_mma_m16n8k16(float* c, const unsigned* a, unsigned b0, unsigned b1, int dtype) {
  State& s = st();
  Lane& me = *s.cur;
  const unsigned lane = me.tid % 32;
  WarpOp& w = join(Op::Mma);
  if (w.arrived > 0 && w.dtype != dtype) fail("mma.sync: lanes disagree on the operand type");
  w.dtype = dtype;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i], w.c[lane][i] = c[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  arrive(w, [&] {
    float A[16][16], B[16][8], C[16][8];
    auto lo = [&](unsigned x) { return elem_to_float(static_cast<unsigned short>(x & 0xffff), w.dtype); };
    auto hi = [&](unsigned x) { return elem_to_float(static_cast<unsigned short>(x >> 16), w.dtype); };
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = l / 4, t = 2 * (l % 4);
      for (int q = 0; q < 4; ++q) {
        const unsigned row = g + (q % 2) * 8, col = t + (q / 2) * 8;
        A[row][col] = lo(w.a[l][q]);
        A[row][col + 1] = hi(w.a[l][q]);
      }
      for (int q = 0; q < 2; ++q) {
        B[t + 8 * q][g] = lo(w.b[l][q]);
        B[t + 8 * q + 1][g] = hi(w.b[l][q]);
      }
      for (int q = 0; q < 4; ++q) C[g + (q / 2) * 8][t + q % 2] = w.c[l][q];
    }
    const unsigned first = me.tid / 32 * 32;
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = l / 4, t = 2 * (l % 4);
      for (int q = 0; q < 4; ++q) {
        const unsigned row = g + (q / 2) * 8, col = t + q % 2;
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        std::memcpy(&s.lanes[first + l].out[q], &acc, 4);
      }
    }
  });
  for (int q = 0; q < 4; ++q) std::memcpy(&c[q], &me.out[q], 4);
}

// cp.async.{ca,cg}.shared.global [dst], [src], size, src_bytes: copies src_bytes and zero-fills
// the rest of `size`. Here: NaN into dst at once, the data when this thread waits for the group.
void fjemu_cp_async(void* dst, const void* src, int src_bytes, int size) {
  State& s = st();
  Lane& me = *s.cur;
  if (size != 4 && size != 8 && size != 16) fail("cp.async: size " + std::to_string(size) + " is not 4, 8 or 16");
  if (src_bytes < 0 || src_bytes > size) fail("cp.async: src-size " + std::to_string(src_bytes) + " is out of range");
  check_smem_address(dst, static_cast<size_t>(size), "cp.async destination");
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(size) != 0) {
      std::ostringstream os;
      os << "cp.async: global source " << src << " is not " << size << "-byte aligned";
      fail(os.str());
    }
    const auto* p = static_cast<const unsigned char*>(src);
    bool inside = s.launch->readable.empty();
    for (const Range& r : s.launch->readable) {
      const auto* b = static_cast<const unsigned char*>(r.data);
      inside = inside || (p >= b && p + src_bytes <= b + r.bytes);
    }
    if (!inside) {
      std::ostringstream os;
      os << "cp.async: global source " << src << " (+" << src_bytes << " bytes) is outside every tensor of the launch";
      fail(os.str());
    }
  }
  std::memset(dst, 0xff, static_cast<size_t>(size));
  me.open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes, size});
}

void fjemu_cp_async_commit() {
  Lane& me = *st().cur;
  me.committed.push_back(std::move(me.open));
  me.open.clear();
}

void fjemu_cp_async_wait(int pending) {
  Lane& me = *st().cur;
  while (me.committed.size() > static_cast<size_t>(pending < 0 ? 0 : pending)) {
    for (const Copy& c : me.committed.front()) {
      me.unfenced_copies = true;
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
      std::memset(c.dst + c.src_bytes, 0, static_cast<size_t>(c.size - c.src_bytes));
    }
    me.committed.erase(me.committed.begin());
  }
}

// ---- sm_90a warpgroup MMA (templates/cuda/wgmma.cuh) ----
// The shared address of a pointer into the block's shared memory (cvta.to.shared).
unsigned fjemu_smem_address(const void* p) {
  State& s = st();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < s.smem || c > s.smem + s.smem_bytes) fail("cvta.to.shared: the pointer is not into the block's shared memory");
  return static_cast<unsigned>(c - s.smem_window);
}

void fjemu_fence_proxy_async() { st().cur->unfenced_copies = false; }

void fjemu_wgmma_fence() {
  GroupOp& w = join_group(Op::WgmmaFence);
  arrive_group(w, [&] { w.fenced = true; });
}

void fjemu_wgmma_commit() {
  GroupOp& w = join_group(Op::WgmmaCommit);
  arrive_group(w, [&] {
    w.committed.push_back(std::move(w.open));
    w.open.clear();
  });
}


// wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{bf16,f16}: D (64 x n) = A (64 x 16) B (16 x n)
// + (scale_d ? D : 0). A: K-major through desc_a, or registers (a != null; per warp the
// mma.m16n8k16 A fragment of rows 16 w ..); B through desc_b, K-major or (trans_b) MN-major.
void fjemu_wgmma(float* d, int n, const unsigned* a, unsigned long long desc_a, unsigned long long desc_b, int scale_d,
                 int trans_b, int dtype) {
  State& s = st();
  Lane& me = *s.cur;
  const unsigned i = me.tid % 128;
  if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma: N = " + std::to_string(n) + " is not a multiple of 8 in 8..256");
  GroupOp& w = join_group(Op::Wgmma);
  if (!w.fenced && w.arrived == 0)
    fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group (its registers were in use)");
  w.d[i] = d;
  w.desc_a[i] = desc_a;
  w.desc_b[i] = desc_b;
  if (a) std::memcpy(w.a[i], a, sizeof w.a[i]);
  if (w.arrived == 0) {
    w.n = n, w.scale_d = scale_d, w.trans_b = trans_b, w.dtype = dtype, w.regs_a = a != nullptr;
  } else if (w.n != n || w.scale_d != (scale_d) || w.trans_b != trans_b || w.dtype != dtype ||
             w.regs_a != (a != nullptr)) {
    fail("wgmma: the warpgroup's threads disagree on the shape, scale-d, transpose, type or A operand");
  }
  arrive_group(w, [&] {
    for (int t = 1; t < 128; ++t)
      if (w.desc_b[t] != w.desc_b[0] || (!w.regs_a && w.desc_a[t] != w.desc_a[0]))
        fail("wgmma: the warpgroup's threads give different matrix descriptors");
    // Stricter than the memory model (which asks it only of the bytes this MMA reads), and what the
    // templates do: every thread fences its landed copies before the barrier that publishes them.
    for (const Lane& l : s.lanes)
      if (l.unfenced_copies)
        fail("wgmma reads shared memory while thread " + std::to_string(l.tid) +
             " has cp.async data it has not fenced into the async proxy (fence.proxy.async.shared::cta "
             "after cp.async.wait_group, before the barrier)");
    WgmmaInFlight op;
    op.n = w.n;
    op.scale_d = w.scale_d;
    op.a.assign(64 * 16, 0.0f);
    op.b.assign(static_cast<size_t>(16 * w.n), 0.0f);
    if (w.regs_a) {
      for (unsigned t = 0; t < 128; ++t) {
        const unsigned wp = t / 32, g = (t % 32) / 4, c = 2 * (t % 4);
        for (int q = 0; q < 4; ++q) {
          const unsigned row = 16 * wp + g + (q % 2) * 8, col = c + (q / 2) * 8;
          op.a[row * 16 + col] = elem_to_float(static_cast<unsigned short>(w.a[t][q] & 0xffff), w.dtype);
          op.a[row * 16 + col + 1] = elem_to_float(static_cast<unsigned short>(w.a[t][q] >> 16), w.dtype);
        }
      }
    } else {
      const Descriptor da = decode(w.desc_a[0], "A");
      for (unsigned row = 0; row < 64; ++row)
        for (unsigned k = 0; k < 16; ++k)
          op.a[row * 16 + k] = read_operand(op, da.start + (row / 8) * da.sbo + (row % 8) * 128 + k * 2, w.dtype);
    }
    const Descriptor db = decode(w.desc_b[0], "B");
    for (unsigned k = 0; k < 16; ++k)
      for (unsigned col = 0; col < static_cast<unsigned>(w.n); ++col) {
        const unsigned addr = w.trans_b ? db.start + (col / 64) * db.lbo + (col % 64) * 2 + (k / 8) * db.sbo + (k % 8) * 128
                                        : db.start + (col / 8) * db.sbo + (col % 8) * 128 + k * 2;
        op.b[k * w.n + col] = read_operand(op, addr, w.dtype);
      }
    const int regs = w.n / 2;
    op.d_in.assign(static_cast<size_t>(128 * regs), 0.0f);
    for (unsigned t = 0; t < 128; ++t) {
      op.d[t] = w.d[t];
      bool chained = false;
      for (const WgmmaInFlight& o : w.open) chained = chained || o.d[t] == w.d[t];
      for (const auto& grp : w.committed)
        for (const WgmmaInFlight& o : grp) chained = chained || o.d[t] == w.d[t];
      op.chained[t] = chained;
      if (!chained) std::memcpy(&op.d_in[t * regs], w.d[t], sizeof(float) * regs);
      for (int e = 0; e < regs; ++e) w.d[t][e] = std::numeric_limits<float>::quiet_NaN();  // until the wait
    }
    w.open.push_back(std::move(op));
  });
}

void fjemu_wgmma_wait(int pending) {
  GroupOp& w = join_group(Op::WgmmaWait);
  arrive_group(w, [&] {
    w.fenced = false;
    while (w.committed.size() > static_cast<size_t>(pending < 0 ? 0 : pending)) {
      for (WgmmaInFlight& op : w.committed.front()) {
        for (const auto& [p, v] : op.smem) {
          unsigned short now;
          std::memcpy(&now, p, 2);
          if (now != v)
            fail("wgmma: shared memory an in-flight wgmma.mma_async reads was overwritten before its "
                 "wgmma.wait_group");
        }
        const int regs = op.n / 2;
        for (unsigned t = 0; t < 128; ++t) {
          const unsigned wp = t / 32, g = (t % 32) / 4, c = 2 * (t % 4);
          float out[128];
          for (int e = 0; e < regs; ++e) {
            const unsigned j = e / 4, q = e % 4;
            const unsigned row = 16 * wp + g + (q / 2) * 8, col = 8 * j + c + q % 2;
            float acc = op.scale_d ? (op.chained[t] ? op.d[t][e] : op.d_in[t * regs + e]) : 0.0f;
            for (int k = 0; k < 16; ++k) acc += op.a[row * 16 + k] * op.b[k * op.n + col];
            out[e] = acc;
          }
          std::memcpy(op.d[t], out, sizeof(float) * regs);
        }
      }
      w.committed.erase(w.committed.begin());
    }
  });
}

}  // extern "C"

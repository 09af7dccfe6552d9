// A CPU emulator for flexjit's CUDA kernels, for tests on machines without a GPU.
//
// The kernel's own source (the NVRTC text, mods inlined) is compiled for the host by the CPU JIT
// with templates/cuda/emulate.cuh in front: CUDA's built-ins and the templates' PTX wrappers
// (cp.async, ldmatrix, mma.sync, shfl, cvt) become calls into this emulator. Every CUDA thread
// runs as a fiber (Boost.Context); the threads of a CTA interleave until each reaches a
// collective operation, which completes when every participant has arrived:
//   - warp-wide (ldmatrix, mma.sync, shfl.sync, __syncwarp): the 32 lanes must arrive at the
//     same kind of operation; the result is computed from their registers with the fragment
//     layouts of the PTX ISA (mma.m16n8k16 .row.col, ldmatrix .m8n8 .x1/.x2/.x4 [.trans]);
//   - CTA-wide (__syncthreads): every thread of the block.
// A lane that reaches a different operation than its warp, threads that exit while others wait
// at a barrier, or a CTA in which nobody can proceed are errors, not hangs.
//
// Schedule: each warp runs as far as it can (to a __syncthreads or its end) before the next
// starts, first to last warp in even blocks, last to first in odd ones: the most skewed order
// hardware could pick, so a missing barrier is seen rather than hidden by lockstep.
// What it checks beyond the arithmetic:
//   - shared memory starts as NaN bytes (0xff) each CTA: a read of a tile never loaded shows;
//   - cp.async writes NaN into its destination when issued and the data only when the issuing
//     thread waits for its group (cp.async.wait_group), the two ends of what hardware may do:
//     a read before the wait (+ barrier), or a new load into a stage another warp still reads,
//     shows as NaN in the output;
//   - every ldmatrix and cp.async address lies inside the CTA's dynamic shared memory and is
//     16-byte aligned; a cp.async source lies inside one of the launch's readable ranges;
//   - ldmatrix's shared-memory bank conflicts are counted (Stats), for tests that require none.
// What it does not model: timing, bank conflicts, register pressure, the exact rounding of
// tensor-core accumulation (fp32 here) and of CUDA's math functions (the host's libm here).
// Passing here means the kernel's logic and data layouts are right as the PTX ISA describes
// them; only a GPU run shows the rest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace flexjit::testing::cuda_emulator {

struct Range {
  const void* data;
  size_t bytes;
};

struct Launch {
  unsigned grid[3] = {1, 1, 1};
  unsigned block_threads = 0;  // a multiple of 32, at most 1024
  int smem_bytes = 0;          // dynamic shared memory
  std::vector<Range> readable;  // global memory cp.async may read (empty: not checked)
};

struct Stats {
  uint64_t ctas = 0, collectives = 0, switches = 0;
  // Shared-memory bank conflicts of ldmatrix: each 8 x 8 matrix is one phase whose 8 row addresses
  // (16 bytes each) hit banks 4 ((addr / 16) % 8) .. +3; a phase with two distinct rows on one
  // group of banks is conflicted, and takes `ways` passes (the most distinct rows on one group).
  uint64_t ldmatrix_phases = 0, ldmatrix_conflicted_phases = 0;
  unsigned ldmatrix_worst_ways = 0;
};

// Runs `thread_body` once per CUDA thread of every CTA (CTAs one after another; in each, the
// threads as fibers), on the calling OS thread. Returns "" on success, else what went wrong
// (the first error; the launch stops there). One launch at a time per process.
std::string run(const Launch& launch, const std::function<void()>& thread_body, Stats* stats = nullptr);

}  // namespace flexjit::testing::cuda_emulator

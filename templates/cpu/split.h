// Split compilation: the macros a kernel template uses to be compiled in parts (included right
// after cpu/common.h, outside its include guard and outside the precompiled prefix of a mods
// kernel, since FLEXJIT_PART differs between the parts).
// A kernel template may define FLEXJIT_PARTS 2: jit/compile.h then compiles its text twice side
// by side, with FLEXJIT_PART 1 and 2, halving the critical path of a cold compile (what the
// first call of a new shape waits for). Part 1 holds the heavy per-block function, part 2 the
// rest, which calls it; it is extern "C" and named after the kernel's entry then. Compiled
// without FLEXJIT_PART (a plain compile of the same text) the kernel is one object as before.
#ifndef FLEXJIT_PART
#define FLEXJIT_PART 0
#endif
#define FJK_PASTE2(a, b) a##b
#define FJK_PASTE(a, b) FJK_PASTE2(a, b)
#if FLEXJIT_PART == 0
#define FJK_SPLIT_LINKAGE static
#else
#define FJK_SPLIT_LINKAGE extern "C"
#endif

// The kernel's element type, from the FLEXJIT_DTYPE spec macro: what q, k, v and out hold in
// memory (accumulation is always fp32). Shared by the prefill and decode kernels.
#if !defined(FLEXJIT_DTYPE)
#error "elem.h needs FLEXJIT_DTYPE defined before it"
#endif

#if FLEXJIT_DTYPE == 0
typedef float fjk_elem;
#elif FLEXJIT_DTYPE == 1
typedef unsigned short fjk_elem;  // bf16 bits
#elif FLEXJIT_DTYPE == 2
typedef _Float16 fjk_elem;
#else
#error "FLEXJIT_DTYPE must be 0 (fp32), 1 (bf16) or 2 (fp16)"
#endif

static constexpr int fjk_round_up(int x, int g) { return (x + g - 1) / g * g; }

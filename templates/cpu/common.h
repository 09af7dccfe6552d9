// Shared helpers for the CPU kernel templates: 16-lane fp32 vectors, element conversion,
// exp2 and log2. Included after mod_abi.h and before the generated mod body, so it must
// not depend on the spec macros (the classify TU defines only FLEXJIT_ENTRY) and must not
// use the generated mod's helper names (fj_flag, fj_iadd, ..., fj_bf16_to_f32): every
// function here is spelled fjk_*.
//
// No system headers (each costs 150-500 ms of compile time): Clang vector extensions and
// builtins only. The TU is built without -ffast-math, so +-inf and NaN behave per IEEE;
// -fassociative-math is on, so no "magic constant" rounding tricks ((x + C) - C may fold).
#ifndef FLEXJIT_CPU_COMMON_H
#define FLEXJIT_CPU_COMMON_H

// 16-lane vectors are passed between (always inlined) helpers; on a host without AVX-512 Clang
// warns that this would change a call ABI, which cannot matter for static inline code.
#pragma clang diagnostic ignored "-Wpsabi"

typedef float fj_v16f __attribute__((vector_size(64)));                  // 16 x fp32
typedef int fj_v16i __attribute__((vector_size(64)));                    // 16 x i32 / masks
typedef unsigned fj_v16u __attribute__((vector_size(64)));               // 16 x u32
typedef unsigned short fj_v16h __attribute__((vector_size(32)));         // 16 x bf16 bits
typedef _Float16 fj_v16e __attribute__((vector_size(32)));               // 16 x fp16
// Unaligned views (alignment 1 element) for loads/stores from user tensors.
typedef float fj_v16f_u __attribute__((vector_size(64), aligned(4)));
typedef unsigned short fj_v16h_u __attribute__((vector_size(32), aligned(2)));
typedef _Float16 fj_v16e_u __attribute__((vector_size(32), aligned(2)));

#define FJK_NEG_INF (-__builtin_inff())
// Loop hints that keep compile time down (every kernel is compiled at first use): a loop that
// gains nothing from the vectoriser or unroller (strided scalar copies done once per work
// item, loops around an already register-blocked body) says so.
#define FJK_SCALAR_LOOP _Pragma("clang loop vectorize(disable) interleave(disable) unroll(disable)")
#define FJK_ROLLED_LOOP _Pragma("clang loop unroll(disable)")
// The mods kernels' loops over one unit-stride run of scores: a predicated vector tail where the
// target has cheap masked loads and stores (AVX-512 mask registers, SVE predicates), which halves
// their code so a new mod compiles sooner; elsewhere a plain vector body and a scalar tail (AVX2's
// masked store, vmaskmovps, is microcoded: on Zen 2 predicating every step made any score_mod
// cost a quarter of the prefill kernel's time; NEON has no masked store at all).
#if defined(__AVX512F__) || defined(__ARM_FEATURE_SVE)
#define FJK_RUN_LOOP _Pragma("clang loop interleave(disable) unroll(disable) vectorize_predicate(enable)")
#else
#define FJK_RUN_LOOP _Pragma("clang loop interleave(disable) unroll(disable)")
#endif
#define FJK_LOG2E 1.44269504088896340736f
#define FJK_LN2 0.693147180559945309417

static inline fj_v16f fjk_splat(float x) { return (fj_v16f){} + x; }
static inline fj_v16f fjk_load(const float* p) { return *(const fj_v16f*)p; }  // 64-B aligned
static inline void fjk_store(float* p, fj_v16f v) { *(fj_v16f*)p = v; }         // 64-B aligned
static inline fj_v16f fjk_max(fj_v16f a, fj_v16f b) { return a > b ? a : b; }  // vmaxps
static inline fj_v16f fjk_iota() {
  return (fj_v16f){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}
static inline bool fjk_any(fj_v16i m) { return __builtin_reduce_or(m) != 0; }

// ---- element conversion: fp32 (float), bf16 (unsigned short bits), fp16 (_Float16) ----
static inline float fjk_to_f32(float x) { return x; }
static inline float fjk_to_f32(unsigned short x) {  // bf16 is the high half of an fp32
  return __builtin_bit_cast(float, (unsigned)x << 16);
}
static inline float fjk_to_f32(_Float16 x) { return (float)x; }

static inline void fjk_from_f32(float x, float* dst) { *dst = x; }
static inline void fjk_from_f32(float x, _Float16* dst) { *dst = (_Float16)x; }  // RNE
static inline void fjk_from_f32(float x, unsigned short* dst) {
  // bf16 = fp32 rounded to nearest-even at bit 16. Adding 0x7fff + lsb rounds; a NaN could
  // round into an infinity's bit pattern, so it is written as a quiet NaN instead.
  unsigned u = __builtin_bit_cast(unsigned, x);
  unsigned r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  *dst = (unsigned short)(x != x ? 0x7fc0u : r);
}

// 16 bf16 (their bits) -> fp32 lanes: bf16 is the high half of an fp32.
static inline fj_v16f fjk_bf16_to_f32(fj_v16h h) {
  return __builtin_bit_cast(fj_v16f, __builtin_convertvector(h, fj_v16u) << 16);
}

// 16 contiguous elements -> fp32 lanes.
static inline fj_v16f fjk_load16(const float* p) { return *(const fj_v16f_u*)p; }
static inline fj_v16f fjk_load16(const unsigned short* p) { return fjk_bf16_to_f32(*(const fj_v16h_u*)p); }
static inline fj_v16f fjk_load16(const _Float16* p) {
  return __builtin_convertvector(*(const fj_v16e_u*)p, fj_v16f);
}

// ---- 2^x for 16 lanes ----
// 2^x = 2^n * 2^f with n = floor(x), f = x - n in [0, 1). 2^f = 1 + f q(f), q of degree 5
// fitted for minimax relative error on [0, 1] (2e-9 in exact arithmetic; 1.6 ulp as evaluated
// in fp32). Guards:
//  - x = -inf (a masked score minus a finite max) must give exactly 0, and results that
//    would be denormal are flushed to 0 too: x < -125 gives 0. Denormal P values would cost
//    microcode assists in the FMAs that read them (long ALiBi rows reach them), and next to
//    the row max's 2^0 = 1 they are far below fp32 resolution anyway;
//  - x >= 128 gives +inf; NaN stays NaN (the compares are false for NaN).
static inline fj_v16f fjk_exp2_poly(fj_v16f f) {
  fj_v16f p = fjk_splat(2.1612939599435776e-4f);
  p = p * f + 1.2467838823795319e-3f;
  p = p * f + 9.6754524856805801e-3f;
  p = p * f + 5.5485278367996216e-2f;
  p = p * f + 2.4022930860519409e-1f;
  p = p * f + 6.9314706325531006e-1f;
  return p * f + 1.0f;
}
static inline fj_v16f fjk_exp2(fj_v16f x) {
  fj_v16f xc = x < -125.0f ? fjk_splat(-125.0f) : x;  // finite f for x = -inf
  xc = xc > 128.0f ? fjk_splat(128.0f) : xc;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  // vreduceps (imm 9: round down, no precision exception) gives f = x - floor(x) in one
  // instruction; vscalefps multiplies by 2^floor(x) with correct overflow, and its zero mask
  // writes the flushed lanes (not x < -125; NaN lanes stay set and propagate).
  const unsigned short keep = __builtin_ia32_cmpps512_mask(x, fjk_splat(-125.0f), 5 /*NLT_UQ*/,
                                                           (unsigned short)0xffff, 4);
  const fj_v16f f = __builtin_ia32_reduceps512_mask(xc, 9, xc, (unsigned short)0xffff, 4);
  return __builtin_ia32_scalefps512_mask(fjk_exp2_poly(f), xc, fjk_splat(0.0f), keep, 4);
#else
  xc = xc == xc ? xc : fjk_splat(0.0f);  // float -> int of NaN is undefined: keep n finite
  const fj_v16f n = __builtin_elementwise_floor(xc);
  // 2^n built in the exponent field (n in [-125, 128]; 128 gives the +inf pattern).
  const fj_v16i e = (__builtin_convertvector(n, fj_v16i) + 127) << 23;
  const fj_v16f r = fjk_exp2_poly(xc - n) * __builtin_bit_cast(fj_v16f, e);
  return x < -125.0f ? fjk_splat(0.0f) : (x == x ? r : x);
#endif
}

// ---- bf16 helpers shared by the dot-product paths (prefill_dpbf16.h, decode_dot.h, flash_backward.h) ----
// The bf16 bits of 16 finite floats, rounded to nearest even (the portable form of
// vcvtneps2bf16; used where the target has no such instruction).
static inline fj_v16h fjk_bf16_rne(fj_v16f x) {
  const fj_v16u u = __builtin_bit_cast(fj_v16u, x);
  return __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, fj_v16h);
}
typedef unsigned short fj_v32h __attribute__((vector_size(64)));  // 32 x bf16 bits
// (bf16(lo), bf16(hi)) as 32 words, rounded to nearest even: vcvtne2ps2bf16 where the target has
// AVX512-BF16; elsewhere the same rounding in integer arithmetic (fjk_bf16_rne: the callers' values
// are finite, so no NaN case).
static inline fj_v32h fjk_cvt2_bf16(fj_v16f hi, fj_v16f lo) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return __builtin_bit_cast(fj_v32h, __builtin_ia32_cvtne2ps2bf16_512(hi, lo));
#else
  return __builtin_shufflevector(fjk_bf16_rne(lo), fjk_bf16_rne(hi), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
#endif
}
#if defined(__aarch64__) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
// acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] over 16 fp32 lanes of bf16 pairs: Arm's BFDOT, which
// pairs its operands as x86's vdpbf16ps does, four 128-bit BFDOTs (bfdot v.4s, v.8h, v.8h).
typedef signed char fj_n_i8x16 __attribute__((neon_vector_type(16)));
typedef float fj_v4f __attribute__((vector_size(16)));
typedef unsigned fj_v4u __attribute__((vector_size(16)));
static inline fj_v4f fjk_bfdot4(fj_v4f acc, fj_v4u a, fj_v4u b) {
  // 41: the element-type code arm_neon.h's vbfdotq_f32 passes (float32x4_t result).
  return __builtin_bit_cast(fj_v4f, __builtin_neon_vbfdotq_f32(__builtin_bit_cast(fj_n_i8x16, acc),
                                                               __builtin_bit_cast(fj_n_i8x16, a),
                                                               __builtin_bit_cast(fj_n_i8x16, b), 41));
}
static inline fj_v16f fjk_bfdot16(fj_v16f acc, fj_v16u a, fj_v16u b) {
#define FJK_BFDOT_Q(i0, i1, i2, i3)                                                      \
  fjk_bfdot4(__builtin_shufflevector(acc, acc, i0, i1, i2, i3), __builtin_shufflevector(a, a, i0, i1, i2, i3), \
             __builtin_shufflevector(b, b, i0, i1, i2, i3))
  const fj_v4f r0 = FJK_BFDOT_Q(0, 1, 2, 3), r1 = FJK_BFDOT_Q(4, 5, 6, 7), r2 = FJK_BFDOT_Q(8, 9, 10, 11),
               r3 = FJK_BFDOT_Q(12, 13, 14, 15);
#undef FJK_BFDOT_Q
  return __builtin_shufflevector(__builtin_shufflevector(r0, r1, 0, 1, 2, 3, 4, 5, 6, 7),
                                 __builtin_shufflevector(r2, r3, 0, 1, 2, 3, 4, 5, 6, 7), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                 10, 11, 12, 13, 14, 15);
}
#endif

// ---- log2 for one normal, positive, finite fp32 (per-row LSE; computed in double) ----
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(t), t = (m-1)/(m+1), |t| < 0.172,
// whose odd series to t^13 is exact to ~1e-12 relative. The softmax sum it is used on is >= 1
// (the row max contributes 2^0), so zero, denormal, inf and NaN inputs are not handled.
static inline double fjk_log2(float x) {
  const unsigned u = __builtin_bit_cast(unsigned, x);
  const int big = (u & 0x007fffffu) > 0x3504f3u;  // mantissa above sqrt(2): use m / 2
  const int e = (int)(u >> 23) - 127 + big;
  const unsigned exp_bits = big ? 0x3f000000u : 0x3f800000u;  // m in [sqrt(1/2), sqrt(2))
  const double m = (double)__builtin_bit_cast(float, (u & 0x007fffffu) | exp_bits);
  const double t = (m - 1.0) / (m + 1.0), t2 = t * t;
  double s = 1.0 / 13;
  s = s * t2 + 1.0 / 11;
  s = s * t2 + 1.0 / 9;
  s = s * t2 + 1.0 / 7;
  s = s * t2 + 1.0 / 5;
  s = s * t2 + 1.0 / 3;
  s = s * t2 + 1.0;
  return (double)e + 2.0 * t * s * 1.4426950408889634;  // log2(m) = ln(m) / ln 2
}

// ---- S^T [n][kStride] (kVecs vectors per key) times c in place, keys [0, nvalid) ----
template <int kVecs, int kStride>
static inline void fjk_scale_st(float* st, int nvalid, float c) {
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n)
    for (int i = 0; i < kVecs; ++i) fjk_store(st + n * kStride + 16 * i, fjk_load(st + n * kStride + 16 * i) * c);
}

// ---- online softmax over one block of S^T (base 2) ----
// S^T [n][kStride] fp32: keys n down, query rows along the lanes of kVecs vectors per key (the
// prefill kernel's layout, and the AMX decode engine's). The scores are c * S^T (c > 0; c = 1
// when S^T is already scaled). Updates the running row max m and sum l, turns S^T rows
// [0, nvalid) into P^T in place and returns alpha = 2^(m_old - m_new) per row. Returns false,
// leaving m, l and S^T alone, when every score of every real row (`valid` lanes) is -inf: the
// block adds nothing (P = 0), so the caller skips P V (masked-out sub-blocks of causal
// diagonals, masked partitions).
template <int kVecs, int kStride>
static inline bool fjk_softmax_st(float* st, int nvalid, float c, fj_v16f* m, fj_v16f* l, const fj_v16i* valid,
                                  fj_v16f* alpha) {
  fj_v16f mx[kVecs];
  for (int i = 0; i < kVecs; ++i) mx[i] = fjk_splat(FJK_NEG_INF);
  FJK_ROLLED_LOOP
  for (int n = 0; n < nvalid; ++n)
    for (int i = 0; i < kVecs; ++i) mx[i] = fjk_max(mx[i], fjk_load(st + n * kStride + 16 * i));
  bool any = false;
  for (int i = 0; i < kVecs; ++i) any |= fjk_any((mx[i] != FJK_NEG_INF) & valid[i]);
  if (!any) return false;

  fj_v16f ref[kVecs];
  FJK_ROLLED_LOOP
  for (int i = 0; i < kVecs; ++i) {
    // The reference max moves only when a score passes it by more than 8 (base 2): P stays
    // <= 2^8 (fp32 has room to spare) and most blocks leave alpha = 1, so engines that rescale O
    // in memory rarely do. The result is exact either way: l and O share the reference, and
    // the LSE uses it. (c > 0: max(c s) = c max(s); m = -inf takes any finite max.)
    const fj_v16f m_blk = mx[i] * c;
    fj_v16f m_new = m_blk > m[i] + 8.0f ? m_blk : m[i];
    // -inf guard: a row with no finite score yet has m_new = -inf, and 2^(s - m_new) would
    // be 2^(-inf - -inf) = NaN. Such a row uses 0 as its reference instead: all its
    // s are -inf, so P = 2^-inf = 0 and alpha = 2^(-inf - 0) = 0 (O and l are still 0).
    ref[i] = m_new == FJK_NEG_INF ? fjk_splat(0.0f) : m_new;
    alpha[i] = fjk_exp2(m[i] - ref[i]);  // m_old = -inf gives 0: nothing to rescale
    m[i] = m_new;
  }
  // One 16-row vector group at a time, down the block (rolled both ways: one inlined exp2 in
  // the kernel instead of kVecs, which cut the AMX kernel's compile by ~15% at no measured cost).
  FJK_ROLLED_LOOP
  for (int i = 0; i < kVecs; ++i) {
    fj_v16f sum = fjk_splat(0.0f);
    float* p = st + 16 * i;
    FJK_ROLLED_LOOP
    for (int n = 0; n < nvalid; ++n, p += kStride) {
      const fj_v16f e = fjk_exp2(fjk_load(p) * c - ref[i]);  // masked s = -inf gives exactly 0
      fjk_store(p, e);
      sum += e;
    }
    l[i] = l[i] * alpha[i] + sum;
  }
  return true;
}

#endif  // FLEXJIT_CPU_COMMON_H

// A score_mod's backward kernels (FlexModGradKernels): over one tile of the backward pass, turn
// dL/d(score_mod's output) into dL/d(score) and accumulate the captured buffers' gradients.
//
// Preceded in the TU by FLEXJIT_ENTRY, mod_abi.h, cpu/common.h, the generated mod body with
// its derivatives and cpu/mods_local.h (jit/codegen.h emit_mod_grad_body):
//   flexjit_score_mod_dscore(score, b, h, q_idx, kv_idx, mod)  d score_mod / d score
//   flexjit_score_mod_dbuf(score, g, b, h, q_idx, kv_idx, mod, grad)  buffer grads += g * partials
// Like the forward mods kernel it depends on no shape, so one compile serves every backward
// kernel; it is compiled only when a backward runs, so the forward's first call never waits on it.

#if !defined(FLEXJIT_ENTRY) || !defined(FLEXJIT_NUM_GRAD_LOADS)
#error "mods_grad.h needs FLEXJIT_ENTRY and the generated derivatives before it"
#endif

// ds[i] *= score_mod'(s[i]) along one unit-stride run: the keys of one query row (kKeysInner)
// or the query rows of one key.
template <bool kKeysInner>
static inline void fjk_grad_run(const float* __restrict s, float* __restrict ds, int inner, fj_i64 b,
                                fj_i64 h, fj_i64 q_first, fj_i64 kv_first, const struct FlexModArgs* mod) {
  FJK_RUN_LOOP
  for (int i = 0; i < inner; ++i) {
    // A zero gradient stays exactly 0 (masked scores: the derivative there may be inf or NaN).
    const float g = ds[i];
    const float d = flexjit_score_mod_dscore(s[i], b, h, kKeysInner ? q_first : q_first + i,
                                             kKeysInner ? kv_first + i : kv_first, mod);
    ds[i] = g == 0.0f ? 0.0f : g * d;
  }
}

static void fjk_apply_grad(const struct FlexModGradTile* t, const struct FlexModArgs* shared,
                           const struct FlexGradArgs* grad) {
  int bad;  // cpu/mods_local.h
  struct FlexBuffer bufs[FJK_LOCAL_BUFFERS];
  float params[FJK_LOCAL_PARAMS];
  struct FlexModArgs local = fjk_local_mod(shared, &bad, bufs, params);
  const bool keys_inner = t->ld == 1 && t->ld_m != 1;
  const int outer = keys_inner ? t->mvalid : t->nvalid, inner = keys_inner ? t->nvalid : t->mvalid;
  const fj_i64 ld_outer = keys_inner ? t->ld_m : t->ld;
  FJK_ROLLED_LOOP
  for (int o = 0; o < outer; ++o) {
    const float* s = t->s + o * ld_outer;
    float* ds = t->ds + o * ld_outer;
    const fj_i64 q_first = keys_inner ? t->q0 + o : t->q0, kv_first = keys_inner ? t->kv0 : t->kv0 + o;
#if FLEXJIT_NUM_GRAD_LOADS > 0
    // Buffer gradients first (they need dL/d(output) before it is chained through score),
    // element by element in a fixed order: the accumulators belong to this thread.
    if (grad != nullptr) {
      FJK_SCALAR_LOOP
      for (int i = 0; i < inner; ++i)
        if (ds[i] != 0.0f)
          flexjit_score_mod_dbuf(s[i], ds[i], t->b, t->h, keys_inner ? q_first : q_first + i,
                                 keys_inner ? kv_first + i : kv_first, &local, grad);
    }
#else
    (void)grad;
#endif
    if (keys_inner) fjk_grad_run<true>(s, ds, inner, t->b, t->h, q_first, kv_first, &local);
    else fjk_grad_run<false>(s, ds, inner, t->b, t->h, q_first, kv_first, &local);
  }
  fjk_local_mod_end(bad, shared);
}

extern "C" void FLEXJIT_ENTRY(struct FlexModGradKernels* out) {
  out->apply_grad = fjk_apply_grad;
  out->num_grad_loads = FLEXJIT_NUM_GRAD_LOADS;
}

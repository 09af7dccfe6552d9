// A score_mod's backward kernels (FlexModGradKernels): over one tile of the backward pass, turn
// dL/d(score_mod's output) into dL/d(score) and accumulate the captured buffers' gradients.
//
// Preceded in the TU by FLEXJIT_ENTRY, mod_abi.h, cpu/common.h and the generated mod body with
// its derivatives (jit/codegen.h emit_mod_grad_body):
//   flexjit_score_mod_dscore(score, b, h, q_idx, kv_idx, mod)  d score_mod / d score
//   flexjit_score_mod_dbuf(score, g, b, h, q_idx, kv_idx, mod, grad)  buffer grads += g * partials
// Like the forward mods kernel it depends on no shape, so one compile serves every backward
// kernel; it is compiled only when a backward runs, so the forward's first call never waits on it.

#if !defined(FLEXJIT_ENTRY) || !defined(FLEXJIT_NUM_GRAD_LOADS)
#error "mods_grad.h needs FLEXJIT_ENTRY and the generated derivatives before it"
#endif

// ds[m] *= score_mod'(s[m]) along one unit-stride run (the query rows of one key).
static inline void fjk_grad_run(const float* __restrict s, float* __restrict ds, int inner, fj_i64 b,
                                fj_i64 h, fj_i64 q_first, fj_i64 kv_idx, const struct FlexModArgs* mod) {
#pragma clang loop interleave(disable) unroll(disable) vectorize_predicate(enable)
  for (int i = 0; i < inner; ++i) {
    // A zero gradient stays exactly 0 (masked scores: the derivative there may be inf or NaN).
    const float g = ds[i];
    const float d = flexjit_score_mod_dscore(s[i], b, h, q_first + i, kv_idx, mod);
    ds[i] = g == 0.0f ? 0.0f : g * d;
  }
}

static void fjk_apply_grad(const struct FlexModGradTile* t, const struct FlexModArgs* shared,
                           const struct FlexGradArgs* grad) {
  // Local error flag and copies of the descriptors, as in the forward's mods kernel.
  int bad = 0;
  struct FlexModArgs local = *shared;
  local.error_flag = &bad;
#if FLEXJIT_NUM_BUFFERS > 0
  struct FlexBuffer bufs[FLEXJIT_NUM_BUFFERS];
  for (int i = 0; i < FLEXJIT_NUM_BUFFERS; ++i) bufs[i] = shared->buffers[i];
  local.buffers = bufs;
#endif
#if FLEXJIT_NUM_PARAMS > 0
  float params[FLEXJIT_NUM_PARAMS];
  for (int i = 0; i < FLEXJIT_NUM_PARAMS; ++i) params[i] = shared->params[i];
  local.params = params;
#endif
  FJK_ROLLED_LOOP
  for (int n = 0; n < t->nvalid; ++n) {
    const float* s = t->s + n * t->ld;
    float* ds = t->ds + n * t->ld;
    const fj_i64 kv_idx = t->kv0 + n;
#if FLEXJIT_NUM_GRAD_LOADS > 0
    // Buffer gradients first (they need dL/d(output) before it is chained through score),
    // element by element in a fixed order: the accumulators belong to this thread.
    if (grad != nullptr) {
      FJK_SCALAR_LOOP
      for (int m = 0; m < t->mvalid; ++m)
        if (ds[m] != 0.0f) flexjit_score_mod_dbuf(s[m], ds[m], t->b, t->h, t->q0 + m, kv_idx, &local, grad);
    }
#else
    (void)grad;
#endif
    fjk_grad_run(s, ds, t->mvalid, t->b, t->h, t->q0, kv_idx, &local);
  }
  if (bad) __atomic_store_n(shared->error_flag, 1, __ATOMIC_RELAXED);
}

extern "C" void FLEXJIT_ENTRY(struct FlexModGradKernels* out) {
  out->apply_grad = fjk_apply_grad;
  out->num_grad_loads = FLEXJIT_NUM_GRAD_LOADS;
}

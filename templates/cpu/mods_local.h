// The mods' arguments as locals of one tile's call, shared by the mods kernel (cpu/mods.h) and
// the derivative kernel (cpu/mods_grad.h). Preceded in the TU by mod_abi.h, cpu/common.h and the
// generated mod body (FLEXJIT_NUM_BUFFERS, FLEXJIT_NUM_PARAMS).
//
// The mods record errors in a local flag (no atomic store in the loop, so it vectorises); the
// shared flag is raised once per tile. The buffer descriptors and params are copied to locals
// too: stores to the scores cannot touch those, so their loads leave the loop. The flag and the
// copies are the caller's own arrays, each its own object (kept in one struct, some mods' loops
// stayed scalar):
//   int bad;
//   struct FlexBuffer bufs[FJK_LOCAL_BUFFERS];
//   float params[FJK_LOCAL_PARAMS];
//   const struct FlexModArgs local = fjk_local_mod(shared, &bad, bufs, params);
//   ... the mods read &local ...
//   fjk_local_mod_end(bad, shared);
#define FJK_LOCAL_BUFFERS (FLEXJIT_NUM_BUFFERS > 0 ? FLEXJIT_NUM_BUFFERS : 1)
#define FJK_LOCAL_PARAMS (FLEXJIT_NUM_PARAMS > 0 ? FLEXJIT_NUM_PARAMS : 1)

static inline struct FlexModArgs fjk_local_mod(const struct FlexModArgs* shared, int* bad,
                                               struct FlexBuffer* bufs, float* params) {
  struct FlexModArgs local = *shared;
  *bad = 0;
  local.error_flag = bad;
#if FLEXJIT_NUM_BUFFERS > 0
  for (int i = 0; i < FLEXJIT_NUM_BUFFERS; ++i) bufs[i] = shared->buffers[i];
  local.buffers = bufs;
#endif
#if FLEXJIT_NUM_PARAMS > 0
  for (int i = 0; i < FLEXJIT_NUM_PARAMS; ++i) params[i] = shared->params[i];
  local.params = params;
#endif
  (void)bufs;
  (void)params;
  return local;
}

// Raises the shared error flag if a mod set the local one.
static inline void fjk_local_mod_end(int bad, const struct FlexModArgs* shared) {
  if (bad) __atomic_store_n(shared->error_flag, 1, __ATOMIC_RELAXED);
}

"""flexjit from PyTorch: FlexAttention's programming model, JIT-compiled into CPU kernels.

    import flexjit
    out = flexjit.flex_attention(q, k, v, score_mod="score + slopes[h] * (kv_idx - q_idx)",
                                 mask_mod="causal", buffers={"slopes": slopes})

Mods are registered names ("causal", "alibi", ...) or expression text over score, b, h, q_idx,
kv_idx and the names in `buffers` (tensors) and `params` (floats; changing one never
recompiles). Everything here is a thin layer over torch.ops.flexjit.*, which this module loads
from $FLEXJIT_TORCH_OPS, from next to this file, or from <repo>/build/.
"""

import os
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, noop_mask

__all__ = ["flex_attention", "create_block_mask", "load_library", "library_path"]

_LIB_NAME = "libflexjit_torch_ops.so"
_KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "USE_AMX")
_loaded = None


def library_path():
    """Where the op library is: $FLEXJIT_TORCH_OPS if set, else the first that exists of
    <package>/libflexjit_torch_ops.so and <repo>/build/libflexjit_torch_ops.so; None if none."""
    env = os.environ.get("FLEXJIT_TORCH_OPS")
    here = Path(__file__).resolve().parent
    candidates = [Path(env)] if env else [here / _LIB_NAME, here.parent.parent / "build" / _LIB_NAME]
    return next((p for p in candidates if p.is_file()), None)


def load_library(path=None):
    """Loads the op library once (torch.ops.load_library) and returns its path."""
    global _loaded
    if _loaded is None:
        path = Path(path) if path else library_path()
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"flexjit: {_LIB_NAME} not found (looked at {path or 'FLEXJIT_TORCH_OPS, the package, build/'}); "
                "build it with `cmake --build build --target flexjit_torch_ops` or set FLEXJIT_TORCH_OPS")
        torch.ops.load_library(str(path))
        _loaded = path
    return _loaded


if library_path() is not None:
    load_library()


def _check_mod(what, mod):
    if mod is not None and not isinstance(mod, str):
        raise TypeError(f"{what} must be a registered mod name or expression text (a str), not "
                        f"{type(mod).__name__}; flexjit compiles text, it cannot run Python callables")


def _lists(buffers, params):
    buffers, params = dict(buffers or {}), dict(params or {})
    return (list(buffers.values()), list(buffers), list(params), [float(x) for x in params.values()])


def flex_attention(query, key, value, score_mod=None, mask_mod=None, buffers=None, params=None,
                   block_mask=None, scale=None, enable_gqa=False, return_lse=False,
                   kernel_options=None):
    """PyTorch's flex_attention signature, with mods as text. Returns out, or (out, lse) with
    return_lse (lse: fp32 [B, Hq, Lq], natural log).

    block_mask: a torch.nn.attention.flex_attention.BlockMask (PyTorch's or from
    flexjit.create_block_mask). Its partial blocks are masked by `mask_mod`, which must be flexjit
    text: a BlockMask made by PyTorch from a Python mask_mod needs the same mask as mask_mod=.
    Without a block_mask, a mask_mod builds one for the call (reuse one across calls instead).
    kernel_options: BLOCK_M / BLOCK_N kernel tiles (they must divide the BlockMask's blocks);
        USE_AMX 0 / 1 forbids / requires bf16 matmuls on AMX tiles (default: where available).
    """
    _check_mod("score_mod", score_mod)
    _check_mod("mask_mod", mask_mod)
    options = dict(kernel_options or {})
    unknown = sorted(set(options) - set(_KERNEL_OPTIONS))
    if unknown:
        raise ValueError(f"flexjit.flex_attention: unknown kernel_options {unknown}; known: {list(_KERNEL_OPTIONS)}")
    mask = {}
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, not "
                            f"{type(block_mask).__name__}")
        if mask_mod is None and hasattr(block_mask, "_flexjit_mask_mod"):
            mask_mod, mask_buffers, mask_params = block_mask._flexjit_mask_mod
            buffers, params = {**(mask_buffers or {}), **(buffers or {})}, {**(mask_params or {}), **(params or {})}
        if mask_mod is None and block_mask.mask_mod is not noop_mask:
            raise ValueError("flexjit.flex_attention: block_mask was built from a Python mask_mod, which flexjit "
                             "cannot run on its partial blocks; pass the same mask as mask_mod= text")
        if tuple(block_mask.seq_lengths) != (query.size(-2), key.size(-2)):
            raise ValueError(f"flexjit.flex_attention: block_mask was created for seq_lengths="
                             f"{tuple(block_mask.seq_lengths)} but the call has q_len={query.size(-2)}, "
                             f"kv_len={key.size(-2)}; create it for these lengths")
        mask = dict(kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
                    full_kv_num_blocks=block_mask.full_kv_num_blocks, full_kv_indices=block_mask.full_kv_indices,
                    q_block_size=block_mask.BLOCK_SIZE[0], kv_block_size=block_mask.BLOCK_SIZE[1])
    buf, buf_names, par_names, par_values = _lists(buffers, params)
    out, lse = torch.ops.flexjit.flex_attention(
        query, key, value, score_mod or "", mask_mod or "", buf, buf_names, par_names, par_values,
        scale=scale, enable_gqa=enable_gqa, return_lse=return_lse,
        BLOCK_M=options.get("BLOCK_M", 0), BLOCK_N=options.get("BLOCK_N", 0),
        USE_AMX=int(options.get("USE_AMX", -1)), **mask)
    return (out, lse) if return_lse else out


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, buffers=None, params=None, BLOCK_SIZE=128,
                      torch_mask_mod=None):
    """Builds a BlockMask with flexjit's builder (interval analysis + a JIT-compiled exact check;
    no dense [Q_LEN, KV_LEN] mask) and returns it as PyTorch's BlockMask. B / H of None mean 1
    (broadcast), as in PyTorch. flexjit.flex_attention uses the mask_mod it remembers;
    PyTorch's flex_attention needs the same mask as a Python function: pass it as torch_mask_mod.
    """
    _check_mod("mask_mod", mask_mod)
    q_bs, kv_bs = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    buf, buf_names, par_names, par_values = _lists(buffers, params)
    num, idx, full_num, full_idx = torch.ops.flexjit.create_block_mask(
        mask_mod, B or 1, H or 1, Q_LEN, KV_LEN, buf, buf_names, par_names, par_values, q_bs, kv_bs)
    block_mask = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=(q_bs, kv_bs),
                                          mask_mod=torch_mask_mod, seq_lengths=(Q_LEN, KV_LEN))
    block_mask._flexjit_mask_mod = (mask_mod, buffers, params)
    return block_mask

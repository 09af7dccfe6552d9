"""flexjit from PyTorch: FlexAttention's programming model, JIT-compiled into CPU kernels (and, for
flex_attention's forward on bf16 / fp16 CUDA tensors, NVRTC-compiled CUDA kernels).

    import flexjit
    out = flexjit.flex_attention(q, k, v, score_mod="score + slopes[h] * (kv_idx - q_idx)",
                                 mask_mod="causal", buffers={"slopes": slopes})
    # decoding against a paged KV cache, mods at absolute positions:
    out = flexjit.paged_flex_attention(q1, k_cache, v_cache, block_table, seq_lens, mask_mod="causal")
    # FlashAttention-2's varlen API: packed sequences, no padding
    out = flexjit.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)

Mods are the Python functions written for PyTorch's flex_attention (traced into expression
text by flexjit.trace: captured tensors become buffers, captured Python numbers runtime params),
registered names ("causal", "alibi", ...) or expression text over score, b, h, q_idx, kv_idx and
the names in `buffers` (tensors) and `params` (floats; changing one never recompiles).
Everything here is a thin layer over torch.ops.flexjit.*, which this module loads from
$FLEXJIT_TORCH_OPS, from next to this file, or from <repo>/build/.
"""

import os
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import AuxOutput, BlockMask, noop_mask

from . import trace
from .hf import register_transformers
from .trace import TraceError

__all__ = ["flex_attention", "paged_flex_attention", "flash_attn_varlen_func", "merge_attention_states",
           "create_block_mask", "register_transformers",
           "load_library", "library_path", "prebuilt_kernel_dir", "TraceError", "trace"]

_LIB_NAME = "libflexjit_torch_ops.so"
_KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "USE_AMX", "USE_DPBF16", "PARTITION_SIZE", "FORCE_USE_FLEX_ATTENTION",
                   "USE_WGMMA")
_PAGED_KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "PARTITION_SIZE", "USE_AMX")
_VARLEN_KERNEL_OPTIONS = ("BLOCK_M", "BLOCK_N", "USE_AMX", "USE_DPBF16")
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
    if mod is not None and not isinstance(mod, str) and not callable(mod):
        raise TypeError(f"{what} must be a Python function (as for PyTorch's flex_attention), a registered "
                        f"mod name or expression text, not {type(mod).__name__}")


def _mods(score_mod, mask_mod, buffers, params, op=None):
    """Mods as the op takes them: (score text, mask text, buffers, params). Callables are traced
    (memoised) and bound to the values they capture now, beside the caller's own buffers / params
    (for text mods)."""
    _check_mod("score_mod", score_mod)
    _check_mod("mask_mod", mask_mod)
    buffers, params = dict(buffers or {}), dict(params or {})
    if (score_mod is None or isinstance(score_mod, str)) and (mask_mod is None or isinstance(mask_mod, str)):
        traced_buffers, traced_params = {}, {}
        score_text, mask_text = score_mod or "", mask_mod or ""
    else:
        score_text, mask_text, traced_buffers, traced_params = trace.bind(score_mod, mask_mod, (*buffers, *params))
    if op is not None and torch.is_grad_enabled():
        for name, t in {**buffers, **traced_buffers}.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                # This op has no backward, and its output would not even require grad: refuse rather
                # than train a tensor with silently zero gradients.
                raise ValueError(f"flexjit.{op}: the tensor '{name}' of a mod requires grad, and {op} has no "
                                 "backward pass (flex_attention has one); run under torch.no_grad() or pass a "
                                 "detached tensor")
    return score_text, mask_text, {**buffers, **traced_buffers}, {**params, **traced_params}


def _kernel_options(op, kernel_options, known):
    options = dict(kernel_options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        hint = ""
        if op == "paged_flex_attention" and set(unknown) & {"USE_DPBF16", "FORCE_USE_FLEX_ATTENTION"}:
            hint = ("; USE_DPBF16 and FORCE_USE_FLEX_ATTENTION pick the prefill kernel, which reads contiguous K/V: "
                    "drop them, or gather the pages and call flex_attention")
        raise ValueError(f"flexjit.{op}: unknown kernel_options {unknown}; known: {list(known)}{hint}")
    force = options.get("FORCE_USE_FLEX_ATTENTION", False)
    # bool or 0 / 1, as PyTorch accepts; anything else is a mistake, not "truthy".
    if force not in (0, 1):
        raise ValueError(f"flexjit.{op}: kernel option FORCE_USE_FLEX_ATTENTION must be a bool or 0 / 1, got {force!r}")
    options["FORCE_USE_FLEX_ATTENTION"] = bool(force)
    return options


def _require_cpu(op, **tensors):
    """The ops other than flex_attention's forward have CPU kernels only: refuse CUDA (or any
    non-CPU) tensors with the fix, before torch's generic "could not run ... backend" error."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
            raise ValueError(f"flexjit.{op}: {name} is on {t.device}; {op} runs on the CPU only (of flexjit's "
                             "attention calls only flex_attention's and paged_flex_attention's forwards have CUDA kernels): "
                             "move the tensors "
                             "with .cpu()")


def _lists(buffers, params):
    buffers, params = dict(buffers or {}), dict(params or {})
    return (list(buffers.values()), list(buffers), list(params), [float(x) for x in params.values()])


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, return_aux=None, mask_mod=None, buffers=None,
                   params=None):
    """PyTorch's flex_attention: same arguments, same meaning, same results. Returns out, or
    (out, lse) with return_lse, or (out, AuxOutput(lse=...)) with return_aux=AuxRequest(lse=True)
    (lse: fp32 [B, Hq, Lq], natural log).

    CUDA: bf16 / fp16 query, key, value on one CUDA device run flexjit's CUDA prefill kernel, or
    for Lq <= 16 its flash-decoding kernel (fp32 too there) (NVRTC-compiled, cached like the CPU
    kernels, launched on the current stream without synchronising); the mods' tensors must be on
    that device, a BlockMask is best moved there once (flexjit.create_block_mask(...,
    device=query.device)); kernel_options BLOCK_M / BLOCK_N / PARTITION_SIZE /
    FORCE_USE_FLEX_ATTENTION. fp32 prefill on CUDA is refused (convert to bf16), and there is no
    CUDA backward yet.

    Differentiable on CPU (unlike PyTorch's): out.backward() gives gradients to query, key, value,
    the float tensors a score_mod captures or `buffers` names (learnable biases) and, through a
    returned lse, the lse's gradient too; deterministic to the bit on any thread count
    (docs/backward.md).

    score_mod: a Python function (score, b, h, q_idx, kv_idx) -> score, as written for PyTorch
    (traced once into flexjit's expression language and memoised: captured tensors become buffers,
    captured ints / floats runtime params read again on every call, so changing one never
    recompiles; unsupported constructs raise flexjit.TraceError naming the source line), or
    flexjit expression text / a registered name ("alibi", "softcap", ...).
    block_mask: a torch.nn.attention.flex_attention.BlockMask (PyTorch's or from
    flexjit.create_block_mask); its partial blocks are masked by its mask_mod, a Python function
    traced like score_mod.
    mask_mod (keyword, flexjit's own): a mask as text, a registered name or a Python function; it
    overrides the BlockMask's, and without a block_mask builds one for the call (reuse a BlockMask
    across calls instead).
    buffers / params (keyword): the tensors and floats that text mods name.
    Calls with up to 16 query rows (decoding) run the flash-decoding kernel, which splits the keys
    into partitions that run in parallel and merges them; longer ones the prefill kernel.
    kernel_options: BLOCK_M / BLOCK_N kernel tiles (they must divide the BlockMask's blocks);
        USE_AMX 0 / 1 forbids / requires bf16 / fp16 matmuls on AMX tiles, prefill and decode
        (default: where available; decode from 8 query rows per KV head, 16 for fp16);
        USE_DPBF16 0 / 1 forbids / requires them on AVX512-BF16's vdpbf16ps (default: where
        available and AMX is not used);
        USE_WGMMA 0 / 1 forbids / requires the CUDA prefill's wgmma engine on sm_90 GPUs, 2 its
        pipelined schedule (default: FLEXJIT_CUDA_WGMMA=1 or 2 turns it on where it applies, else
        mma.sync);
        PARTITION_SIZE keys per decode partition (a multiple of BLOCK_N; 0 / unset: tuned or cost
        model); FORCE_USE_FLEX_ATTENTION True runs the prefill kernel even for decode shapes.
    """
    options = _kernel_options("flex_attention", kernel_options, _KERNEL_OPTIONS)
    if return_aux is not None:
        if return_lse:
            raise ValueError("flexjit.flex_attention: pass return_lse or return_aux, not both")
        if getattr(return_aux, "max_scores", False):
            raise ValueError("flexjit.flex_attention: return_aux max_scores is not supported; request lse only")
    want_lse = return_lse or bool(return_aux is not None and return_aux.lse)
    mask = {}
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, not "
                            f"{type(block_mask).__name__}")
        if mask_mod is None and hasattr(block_mask, "_flexjit_mask_mod"):
            mask_mod, mask_buffers, mask_params = block_mask._flexjit_mask_mod
            buffers, params = {**(mask_buffers or {}), **(buffers or {})}, {**(mask_params or {}), **(params or {})}
        if mask_mod is None and block_mask.mask_mod is not noop_mask:
            mask_mod = block_mask.mask_mod
        if tuple(block_mask.seq_lengths) != (query.size(-2), key.size(-2)):
            raise ValueError(f"flexjit.flex_attention: block_mask was created for seq_lengths="
                             f"{tuple(block_mask.seq_lengths)} but the call has q_len={query.size(-2)}, "
                             f"kv_len={key.size(-2)}; create it for these lengths")
        mask = dict(kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
                    full_kv_num_blocks=block_mask.full_kv_num_blocks, full_kv_indices=block_mask.full_kv_indices,
                    q_block_size=block_mask.BLOCK_SIZE[0], kv_block_size=block_mask.BLOCK_SIZE[1])
    score_text, mask_text, buffers, params = _mods(score_mod, mask_mod, buffers, params)
    buf, buf_names, par_names, par_values = _lists(buffers, params)
    out, lse = torch.ops.flexjit.flex_attention.default(
        query, key, value, score_text, mask_text, buf, buf_names, par_names, par_values,
        scale=scale, enable_gqa=enable_gqa, return_lse=want_lse,
        BLOCK_M=options.get("BLOCK_M", 0), BLOCK_N=options.get("BLOCK_N", 0),
        USE_AMX=int(options.get("USE_AMX", -1)), PARTITION_SIZE=int(options.get("PARTITION_SIZE", 0)),
        FORCE_USE_FLEX_ATTENTION=options["FORCE_USE_FLEX_ATTENTION"],
        USE_DPBF16=int(options.get("USE_DPBF16", -1)), USE_WGMMA=int(options.get("USE_WGMMA", -1)), **mask)
    if return_aux is not None:
        return out, AuxOutput(lse=lse if return_aux.lse else None)
    return (out, lse) if return_lse else out


def paged_flex_attention(query, k_cache, v_cache, block_table, seq_lens, score_mod=None, mask_mod=None,
                         buffers=None, params=None, scale=None, enable_gqa=False, return_lse=False,
                         kernel_options=None):
    """Flash decoding against a paged KV cache (FlashInfer's NHD layout). Returns out
    [B, Hq, Lq, Dv] in query's dtype, or (out, lse) with return_lse (lse: fp32 [B, Hq, Lq]).

    query [B, Hq, Lq, D] with Lq <= 16 (a decode step, or a few speculative tokens);
    k_cache [num_pages, page_size, Hkv, D], v_cache [num_pages, page_size, Hkv, Dv] (query's dtype,
    last dim contiguous); block_table int32 [B, max_pages]: sequence b's key n is in page
    block_table[b, n // page_size] at slot n % page_size; seq_lens int32 [B]: keys per sequence,
    counting the Lq new tokens (already written to the cache); 0 marks an unused batch slot (out 0,
    lse -inf). Pages past seq_lens[b] are never read.

    Mods (Python functions as for flex_attention, text or registered names) see absolute
    positions: query i of sequence b is at q_idx = seq_lens[b] - Lq + i, so a causal mask_mod
    works unchanged. The mask_mod is a mod, not a BlockMask: the block mask is
    built per call over each sequence's own length. Registered mods' missing buffers are made for
    max(seq_lens) positions.
    kernel_options: BLOCK_M / BLOCK_N (decode kernel tiles), PARTITION_SIZE (keys per split-KV
    partition, a multiple of page_size; 0 / unset: tuned or cost model) and USE_AMX (0 / 1: the
    decode kernel's AMX engine never / required; unset: bf16 from 4 query rows per KV head, fp16
    from 16, where the host has AMX).

    CUDA: fp32 / bf16 / fp16 query and caches on one CUDA device run the CUDA flash-decoding
    kernel (block_table / seq_lens on that device or the CPU; seq_lens on the CPU sizes the grid by
    the longest sequence, on the device by the table's capacity, without synchronising). With
    seq_lens on the CPU and a mask_mod that reads no tensors, key blocks the mask empties are
    skipped (the BlockMask is built on the host); otherwise the mask_mod runs on every key block.
    """
    options = _kernel_options("paged_flex_attention", kernel_options, _PAGED_KERNEL_OPTIONS)
    score_text, mask_text, buffers, params = _mods(score_mod, mask_mod, buffers, params, "paged_flex_attention")
    buf, buf_names, par_names, par_values = _lists(buffers, params)
    out, lse = torch.ops.flexjit.paged_flex_attention.default(
        query, k_cache, v_cache, block_table, seq_lens, score_text, mask_text, buf, buf_names,
        par_names, par_values, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse,
        BLOCK_M=options.get("BLOCK_M", 0), BLOCK_N=options.get("BLOCK_N", 0),
        PARTITION_SIZE=int(options.get("PARTITION_SIZE", 0)), USE_AMX=int(options.get("USE_AMX", -1)))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, score_mod=None,
                           mask_mod=None, buffers=None, params=None, kernel_options=None):
    """FlashAttention-2's flash_attn_varlen_func on CPU: sequences packed without padding. Same
    arguments, same meaning. Returns out [total_q, Hq, Dv] in q's dtype, or with return_attn_probs
    (out, softmax_lse [Hq, total_q] fp32, None) (no probability matrix is kept).

    q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv] (Hq a multiple of Hkv: GQA / MQA);
    cu_seqlens_q / cu_seqlens_k int32 [batch + 1]: sequence i has queries
    cu_seqlens_q[i]:cu_seqlens_q[i + 1] and keys cu_seqlens_k[i]:cu_seqlens_k[i + 1] (empty ones
    allowed); max_seqlen_q / max_seqlen_k at least the longest (Python ints).
    causal and window_size (left, right; -1 = unlimited) align bottom-right when a sequence has
    fewer queries than keys (rows that see no key give 0, lse -inf); softcap > 0 caps the scaled
    score (softcap * tanh(s / softcap)); alibi_slopes fp32 [Hq] or [batch, Hq] adds
    -slope * |i + sk - sq - j|. dropout_p must be 0 and block_table None (inference, contiguous KV);
    deterministic is accepted (the CPU kernel always is).
    flexjit's own (keyword): score_mod / mask_mod as for flex_attention (Python functions, text or
    registered names), seeing b = the sequence and q_idx / kv_idx inside it, applied after ALiBi
    and before the masks; buffers / params for text mods; kernel_options BLOCK_M, BLOCK_N,
    USE_AMX, USE_DPBF16.
    """
    if dropout_p:
        raise ValueError(f"flexjit.flash_attn_varlen_func: dropout_p must be 0 (inference only), got {dropout_p}")
    if block_table is not None:
        raise ValueError("flexjit.flash_attn_varlen_func: block_table (paged KV) is not supported here; pass "
                         "contiguous packed k / v, or decode with flexjit.paged_flex_attention")
    if len(window_size) != 2:
        raise ValueError(f"flexjit.flash_attn_varlen_func: window_size must be (left, right), got {window_size!r}")
    options = _kernel_options("flash_attn_varlen_func", kernel_options, _VARLEN_KERNEL_OPTIONS)
    _require_cpu("flash_attn_varlen_func", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 alibi_slopes=alibi_slopes)
    score_text, mask_text, buffers, params = _mods(score_mod, mask_mod, buffers, params, "flash_attn_varlen_func")
    buf, buf_names, par_names, par_values = _lists(buffers, params)
    out, lse = torch.ops.flexjit.varlen_attention.default(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), softmax_scale=softmax_scale,
        causal=bool(causal), window_left=int(window_size[0]), window_right=int(window_size[1]),
        softcap=float(softcap), alibi_slopes=alibi_slopes, score_mod=score_text, mask_mod=mask_text,
        buffers=buf, buffer_names=buf_names, param_names=par_names, param_values=par_values,
        return_lse=bool(return_attn_probs), BLOCK_M=options.get("BLOCK_M", 0), BLOCK_N=options.get("BLOCK_N", 0),
        USE_AMX=int(options.get("USE_AMX", -1)), USE_DPBF16=int(options.get("USE_DPBF16", -1)))
    return (out, lse, None) if return_attn_probs else out


def prebuilt_kernel_dir():
    """The read-only directory of prebuilt kernels (compiled at build time by `flexjit cache warm`)
    that this process's kernel cache reads: $FLEXJIT_PREBUILT_DIR, else flexjit-kernels beside the
    op library; None when there is none or it is turned off. Resolved once per process, at the
    cache's first use."""
    load_library()
    return torch.ops.flexjit.prebuilt_kernel_dir.default() or None


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Combines two attention states over disjoint sets of keys for the same queries into the
    state over their union, exactly: lse = logaddexp(lse_a, lse_b), out = e^(lse_a - lse) out_a +
    e^(lse_b - lse) out_b. Serves cascade attention (a shared prefix + each request's suffix) and
    KV split across devices or calls.

    out_a / out_b [..., L, Dv] (2-4 dims, same shape and float dtype), lse_a / lse_b fp32 [..., L]
    (natural log, as return_lse gives). A state with lse -inf kept no key and contributes nothing
    (its out is not read, even if NaN). Returns new tensors (out, lse): out_a's shape and dtype, and
    fp32 lse.
    """
    _require_cpu("merge_attention_states", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return torch.ops.flexjit.merge_attention_states.default(out_a, lse_a, out_b, lse_b)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False,
                      separate_full_blocks=True, compute_dq_write_order=False, dq_kv_order=True, *,
                      buffers=None, params=None, torch_mask_mod=None):
    """PyTorch's create_block_mask, built with flexjit's builder (interval analysis + a
    JIT-compiled exact check per block; no dense [Q_LEN, KV_LEN] mask). Returns PyTorch's
    BlockMask, usable by both flexjit.flex_attention and PyTorch's flex_attention. B / H of None
    mean 1 (broadcast), as in PyTorch.

    mask_mod: a Python function (b, h, q_idx, kv_idx) -> bool, as written for PyTorch (traced;
    it becomes the BlockMask's mask_mod), or flexjit text / a registered name with the `buffers`
    and `params` it names; PyTorch's flex_attention then needs the same mask as a Python
    function: pass it as torch_mask_mod. device: where the BlockMask's tensors go (None: the CPU);
    the builder runs on the CPU (tensors the mask reads are copied there for the build), so for
    CUDA calls build the mask once and reuse it. _compile is accepted and ignored (the builder is
    always compiled).
    """
    _check_mod("mask_mod", mask_mod)
    q_bs, kv_bs = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    if isinstance(mask_mod, str):
        text, buffers_, params_ = mask_mod, buffers, params
    else:
        if buffers or params:
            raise ValueError("flexjit.create_block_mask: buffers / params name what mask text reads; a Python "
                             "mask_mod captures its own")
        _, text, buffers_, params_ = trace.bind(None, mask_mod)
        torch_mask_mod = torch_mask_mod or mask_mod
    buf, buf_names, par_names, par_values = _lists(buffers_, params_)
    buf = [t.cpu() if isinstance(t, torch.Tensor) else t for t in buf]  # the builder reads them on the CPU
    num, idx, full_num, full_idx = torch.ops.flexjit.create_block_mask(
        text or "true", B or 1, H or 1, Q_LEN, KV_LEN, buf, buf_names, par_names, par_values, q_bs, kv_bs)
    if device is not None:
        # Moved before the [B, H] expansion below, so the device holds one row per broadcast dim.
        num, idx, full_num, full_idx = (t if t is None else t.to(device) for t in (num, idx, full_num, full_idx))
    # The builder keeps one row for a mask that ignores b / h; PyTorch's has [B, H] rows (views).
    num, idx, full_num, full_idx = (t if t is None else t.expand(B or 1, H or 1, *t.shape[2:])
                                    for t in (num, idx, full_num, full_idx))
    if not separate_full_blocks:
        # Every non-empty block partial: PyTorch then applies mask_mod everywhere.
        dense = (BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=(q_bs, kv_bs),
                                          seq_lengths=(Q_LEN, KV_LEN)).to_dense() > 0).to(torch.int32)
        num = dense.sum(-1).to(torch.int32)
        idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        full_num = full_idx = None
    block_mask = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=(q_bs, kv_bs),
                                          mask_mod=torch_mask_mod, seq_lengths=(Q_LEN, KV_LEN))
    if isinstance(mask_mod, str):
        block_mask._flexjit_mask_mod = (mask_mod, buffers, params)
    if compute_dq_write_order:
        from torch.nn.attention.flex_attention import _compute_dq_write_order_from_block_mask
        dq_wo, dq_wo_full = _compute_dq_write_order_from_block_mask(block_mask, dq_kv_order=dq_kv_order)
        block_mask.dq_write_order, block_mask.dq_write_order_full = dq_wo, dq_wo_full
        block_mask.dq_kv_order, block_mask.dq_kv_order_spt = None, dq_kv_order
    return block_mask

"""flexjit as a Hugging Face transformers attention backend.

    import flexjit
    flexjit.register_transformers()                   # once; then, as with any backend:
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="flexjit")
    model.set_attn_implementation("flexjit")         # or switch an existing model

Two functions are registered under the name: an attention function (AttentionInterface) that
runs flexjit.flex_attention on the layer's query, key and value, and a mask function
(AttentionMaskInterface) that turns transformers' mask description into a flexjit BlockMask,
built once per forward and shared by every layer of that type (full / sliding), never a dense
L x S mask:

- the model's mask function (causal, sliding window, chunked, packed sequences, ...; whatever
  transformers composes) is traced by flexjit.trace into a mask_mod; its query / key offsets
  (the KV cache's length) are captured numbers, so they become runtime params and a decode step
  never recompiles;
- padding from the 2-D attention_mask (left or right) becomes two int32 buffers, the first and
  one-past-last real key of each sequence, and `start[b] <= kv_idx < end[b]`; a mask with holes
  (not one run of ones per row) is read per key from a [batch, kv] buffer instead.

Gemma 2's logit softcapping becomes flexjit's `softcap` score_mod (the cap a runtime param) and
`scaling` the scale. GQA with any group runs through enable_gqa. Decode steps (a few query rows)
take flexjit's flash-decoding kernel. A mask function the tracer cannot express raises
flexjit.TraceError naming the construct, and a dense tensor mask (made by another backend's mask
function) raises ValueError: never a silently different result. transformers is needed only when
this module is used.
"""

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import trace

NAME = "flexjit"


def _padding_bounds(padding_mask):
    """[batch, kv] bool -> (start, end) int32 [batch] when every row is one run of True (left or
    right padding, or none), else None. An all-False row gives start = end = 0 (no key)."""
    m = padding_mask.to(torch.bool)
    n = m.shape[1]
    idx = torch.arange(n, device=m.device)
    count = m.sum(1)
    first = torch.where(m, idx, n).amin(1)
    last = torch.where(m, idx, -1).amax(1)
    if not bool(((last - first + 1) == count)[count > 0].all()):
        return None
    start = torch.where(count > 0, first, 0).to(torch.int32)
    end = torch.where(count > 0, last + 1, 0).to(torch.int32)
    return start, end


def flexjit_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers' AttentionMaskInterface entry: a flexjit BlockMask for one forward."""
    import transformers.masking_utils as mu
    from . import create_block_mask

    base = mask_function if mask_function is not None else mu.causal_mask_function
    fn = base
    B = None
    if attention_mask is not None and not bool(attention_mask.all()):
        # The 2-D mask covers absolute key positions (as in transformers' own masks, the padding
        # is and-ed in before the offsets are added).
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        bounds = _padding_bounds(padding)
        B = batch_size
        if bounds is not None:
            start, end = bounds

            def fn(b, h, q_idx, kv_idx):
                return base(b, h, q_idx, kv_idx) & (kv_idx >= start[b]) & (kv_idx < end[b])
        else:
            valid = padding.to(torch.int32)

            def fn(b, h, q_idx, kv_idx):
                return base(b, h, q_idx, kv_idx) & (valid[b, kv_idx] != 0)
    fn = mu.add_offsets_to_mask_function(fn, int(q_offset), int(kv_offset))
    return create_block_mask(fn, B, None, q_length, kv_length)


def flexjit_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              softcap=None, **kwargs):
    """transformers' AttentionInterface entry: query [b, Hq, L, D], key / value [b, Hkv, S, D];
    returns ([b, L, Hq, Dv], None) as the sdpa backend does."""
    from . import flex_attention

    if dropout:
        raise ValueError(f"flexjit attention has no dropout (got {dropout}); call model.eval() for inference")
    if kwargs.get("position_bias") is not None:
        raise ValueError("flexjit attention: position_bias (a dense additive bias) is not supported; use "
                         "attn_implementation='sdpa' for this model")
    block_mask = None
    score_mod, params = None, None
    if isinstance(attention_mask, BlockMask):
        block_mask = attention_mask
    elif attention_mask is not None:
        raise ValueError(
            "flexjit attention got a dense attention mask tensor: the model's masks were made for another "
            "backend. Register both functions with flexjit.register_transformers() and select "
            "attn_implementation='flexjit' (model.set_attn_implementation('flexjit')), so masks are flexjit "
            "BlockMasks")
    elif query.shape[2] > 1 and getattr(module, "is_causal", True):
        # No mask at all on a causal layer: causal, aligned to the end of the keys.
        off = key.shape[2] - query.shape[2]

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + off
        block_mask = _cached_causal(causal, query.shape[2], key.shape[2])
    if softcap:
        score_mod, params = "softcap", {"cap": float(softcap)}
    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1], params=params)
    return out.transpose(1, 2).contiguous(), None


_causal_masks = {}


def _cached_causal(fn, q_len, kv_len):
    from . import create_block_mask
    key = (q_len, kv_len)
    if key not in _causal_masks:
        if len(_causal_masks) > 64:
            _causal_masks.clear()
        _causal_masks[key] = create_block_mask(fn, None, None, q_len, kv_len)
    return _causal_masks[key]


def register_transformers(name=NAME):
    """Registers flexjit's attention and mask functions with transformers under `name`
    ("flexjit"): `from_pretrained(..., attn_implementation="flexjit")` and
    `model.set_attn_implementation("flexjit")` then work. Idempotent. Returns the name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("flexjit.register_transformers needs transformers >= 5 (pip install 'transformers>=5')") from e
    AttentionInterface.register(name, flexjit_attention_forward)
    AttentionMaskInterface.register(name, flexjit_mask)
    return name


__all__ = ["register_transformers", "flexjit_attention_forward", "flexjit_mask"]
_ = trace  # the mask functions are traced by create_block_mask through flexjit.trace

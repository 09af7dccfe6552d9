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

`PagedCache(config)` keeps K/V in flexjit's page layout, so decode steps read them in place with
flexjit.paged_flex_attention instead of concatenating the whole cache every step.

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


def _with_offsets(fn, fj_q_offset, fj_kv_offset):
    """fn at absolute positions, called with positions local to the call (as transformers'
    add_offsets_to_mask_function). The offsets are captured numbers, so the trace makes them the
    runtime params `fj_q_offset` / `fj_kv_offset` (the paged path sets them to 0: its kernel hands
    the mods absolute positions)."""
    def shifted(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx + fj_q_offset, kv_idx + fj_kv_offset)
    return shifted


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
    fn = _with_offsets(fn, int(q_offset), int(kv_offset))
    # The mask goes where the model runs (built on the CPU, moved once per forward).
    where = attention_mask if attention_mask is not None else kwargs.get("cache_position")
    device = where.device if isinstance(where, torch.Tensor) else None
    return create_block_mask(fn, B, None, q_length, kv_length, device=device)


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
    score_mod, params = None, None
    if softcap:
        score_mod, params = "softcap", {"cap": float(softcap)}
    paged = getattr(key, "_flexjit_paged", None)
    if paged is not None:
        return _paged_attention(query, key, value, attention_mask, paged, score_mod, params, scaling)
    block_mask = None
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
        block_mask = _cached_causal(causal, query.shape[2], key.shape[2], query.device)
    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1], params=params)
    return out.transpose(1, 2).contiguous(), None


_causal_masks = {}


def _cached_causal(fn, q_len, kv_len, device):
    from . import create_block_mask
    key = (q_len, kv_len, device)
    if key not in _causal_masks:
        if len(_causal_masks) > 64:
            _causal_masks.clear()
        _causal_masks[key] = create_block_mask(fn, None, None, q_len, kv_len, device=device)
    return _causal_masks[key]


def _paged_attention(query, k_pages, v_pages, attention_mask, paged, score_mod, params, scaling):
    """A decode step against PagedCache's pages: flexjit.paged_flex_attention, with the mask
    function of this forward's BlockMask at absolute positions (offsets 0)."""
    from . import paged_flex_attention
    block_table, seq_lens = paged
    mask_text, buffers, mask_params = None, {}, {}
    if isinstance(attention_mask, BlockMask):
        if attention_mask.mask_mod is None or not callable(attention_mask.mask_mod):
            raise ValueError("flexjit PagedCache: the BlockMask has no mask function to evaluate at absolute positions")
        _, mask_text, buffers, mask_params = trace.bind(None, attention_mask.mask_mod)
        if "fj_q_offset" not in mask_params:
            raise ValueError("flexjit PagedCache needs the masks of flexjit's mask function "
                             "(register_transformers(), attn_implementation='flexjit')")
        mask_params = {**mask_params, "fj_q_offset": 0.0, "fj_kv_offset": 0.0}
    elif attention_mask is not None:
        raise ValueError("flexjit PagedCache got a dense attention mask tensor; select attn_implementation='flexjit'")
    else:
        mask_text = "kv_idx <= q_idx"  # causal at absolute positions
    out = paged_flex_attention(query, k_pages, v_pages, block_table, seq_lens, score_mod=score_mod,
                               mask_mod=mask_text or None, buffers=buffers, params={**mask_params, **(params or {})},
                               scale=scaling, enable_gqa=query.shape[1] != k_pages.shape[2])
    return out.transpose(1, 2).contiguous(), None


def _paged_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class PagedLayer(CacheLayerMixin):
        """One layer's K/V in pages of `page_size` tokens, [num_pages, page_size, Hkv, D] (the layout
        paged_flex_attention reads), with a block table per sequence. Appending writes only the new
        tokens' slots; the page pool grows by doubling (amortised O(1) per token), never by
        copying the whole cache every step as a concatenating cache does."""

        is_sliding = False
        is_croppable = False

        def __init__(self, page_size=16):
            super().__init__()
            self.page_size = page_size
            self.seq = 0
            self.pool_grows = 0

        def lazy_initialization(self, key_states, value_states):
            b, hkv, _, d = key_states.shape
            self.batch, self.device = b, key_states.device
            self.keys = key_states.new_empty(0, self.page_size, hkv, d)
            self.values = value_states.new_empty(0, self.page_size, hkv, value_states.shape[3])
            self.table = torch.empty(b, 0, dtype=torch.int32)
            self.is_initialized = True

        def _reserve(self, length):
            pages = -(-length // self.page_size)
            have = self.table.shape[1]
            if pages <= have:
                return
            want = max(pages, 2 * have)
            used = self.keys.shape[0]
            extra = self.batch * (want - have)
            # New pages at the end of the pool; sequence b's page p -> pool row.
            new_rows = torch.arange(used, used + extra, dtype=torch.int32).view(self.batch, want - have)
            self.table = torch.cat([self.table, new_rows], 1)
            self.keys = torch.cat([self.keys, self.keys.new_empty(extra, *self.keys.shape[1:])])
            self.values = torch.cat([self.values, self.values.new_empty(extra, *self.values.shape[1:])])
            self.pool_grows += 1

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[2]
            start, end = self.seq, self.seq + n
            self._reserve(end)
            pos = torch.arange(start, end)
            rows = self.table[:, pos // self.page_size].long()          # [B, n]
            slots = (pos % self.page_size).expand(self.batch, n)         # [B, n]
            self.keys[rows, slots] = key_states.transpose(1, 2)         # [B, n, Hkv, D]
            self.values[rows, slots] = value_states.transpose(1, 2)
            self.seq = end
            if start == 0:
                return key_states, value_states  # a prefill: the new states are the whole cache
            if n > 16:  # a long chunk after a prefix: attention over contiguous keys
                return self._gather(self.keys), self._gather(self.values)
            pages = -(-end // self.page_size)
            self.keys._flexjit_paged = (self.table[:, :pages].contiguous(),
                                        torch.full((self.batch,), end, dtype=torch.int32))
            return self.keys, self.values

        def _gather(self, pool):
            pages = -(-self.seq // self.page_size)
            g = pool[self.table[:, :pages].long()]                       # [B, pages, ps, H, D]
            return g.flatten(1, 2)[:, :self.seq].transpose(1, 2)        # [B, H, seq, D]

        def get_mask_sizes(self, query_length):
            return self.seq + query_length, 0

        def get_seq_length(self):
            return self.seq

        def get_max_length(self):
            return -1

        def reset(self):
            self.keys = self.values = None
            self.is_initialized = False
            self.seq = 0

        def crop(self, max_length):
            raise NotImplementedError("flexjit PagedCache cannot be cropped; use DynamicCache for assisted decoding")

    return PagedLayer


def PagedCache(config, page_size=16):
    """A transformers Cache whose layers keep K/V in flexjit's page layout, so decode steps read
    them in place with flexjit.paged_flex_attention (through the "flexjit" attention
    implementation) instead of a concatenating cache that copies every layer's K/V each step:

        out = model.generate(..., cache=flexjit.hf.PagedCache(model.config))

    Full-attention layers only: a model with sliding-window layers raises (use DynamicCache)."""
    from transformers.cache_utils import Cache
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if any(t != "full_attention" for t in types) or getattr(text, "sliding_window", None):
        raise ValueError("flexjit PagedCache holds full-attention layers only; this model has sliding-window "
                         f"layers ({sorted(set(types))}): use DynamicCache")
    layer = _paged_layer_class()
    return Cache(layers=[layer(page_size) for _ in types])


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


__all__ = ["register_transformers", "flexjit_attention_forward", "flexjit_mask", "PagedCache"]

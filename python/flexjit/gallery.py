"""An attention-gym-style gallery of mods, written exactly as for PyTorch's flex_attention: plain
Python functions over (score, b, h, q_idx, kv_idx), made by factories that capture tensors and
Python numbers. Both libraries run them unchanged:

    from flexjit import gallery
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import flexjit

    mask = gallery.sliding_window(256)
    theirs = flex_attention(q, k, v, block_mask=create_block_mask(mask, None, None, L, L, device="cpu"))
    ours = flexjit.flex_attention(q, k, v, block_mask=flexjit.create_block_mask(mask, None, None, L, L))

Nothing here knows about flexjit: captured tensors become flexjit buffers and captured numbers
runtime params because flexjit traces the functions, not because they are written for it.
"""

import math

import torch

__all__ = ["causal", "sliding_window", "prefix_lm", "document", "alibi", "alibi_slopes", "softcap",
           "t5_relative_bias", "natten_2d", "examples"]


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal():
    """Each query sees itself and the keys before it."""
    return causal_mask


def sliding_window(window):
    """Causal, and at most `window` keys back (Mistral-style local attention)."""
    def sliding_window_mask(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        near = q_idx - kv_idx <= window
        return causal & near
    return sliding_window_mask


def prefix_lm(prefix_length):
    """Bidirectional over the first `prefix_length` keys (the prompt), causal after."""
    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)
    return prefix_lm_mask


def document(document_id):
    """Packed sequences: `document_id` [L] (int) names each position's document; queries attend
    causally within their own document only."""
    def document_causal_mask(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        return same_doc & (q_idx >= kv_idx)
    return document_causal_mask


def alibi_slopes(num_heads):
    """ALiBi's geometric head slopes 2^(-8 (h + 1) / H)."""
    return torch.exp2(-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)


def alibi(slopes):
    """ALiBi: a per-head linear bias on the distance; `slopes` [H] float."""
    def alibi_score(score, b, h, q_idx, kv_idx):
        bias = slopes[h] * (kv_idx - q_idx)
        return score + bias
    return alibi_score


def softcap(cap):
    """Gemma-2 / Grok-style logit soft-capping: cap * tanh(score / cap)."""
    def softcap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return softcap_score


def t5_relative_bias(bias, num_buckets=32, max_distance=128):
    """T5's bidirectional relative position bias: the distance kv_idx - q_idx falls in one of
    `num_buckets` buckets (half per direction; exact up to num_buckets / 4, then logarithmic up
    to max_distance), and `bias` [H, num_buckets] holds a learned value per head and bucket."""
    def t5_bias_score(score, b, h, q_idx, kv_idx):
        relative_position = kv_idx - q_idx
        n = num_buckets // 2
        bucket = (relative_position > 0).to(torch.int64) * n
        distance = torch.abs(relative_position)
        max_exact = n // 2
        is_small = distance < max_exact
        log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
        if_large = max_exact + (log_ratio * (n - max_exact)).to(torch.int64)
        if_large = torch.minimum(if_large, torch.full_like(if_large, n - 1))
        bucket = bucket + torch.where(is_small, distance, if_large)
        return score + bias[h, bucket]
    return t5_bias_score


def natten_2d(height, width, kernel_h, kernel_w):
    """Neighbourhood attention over a height x width image flattened row by row: each query
    attends to the kernel_h x kernel_w window around it, the window shifted to stay inside the
    image (NATTEN)."""
    def get_x_y(idx):
        return idx // width, idx % width

    def natten_mask(b, h, q_idx, kv_idx):
        q_x, q_y = get_x_y(q_idx)
        kv_x, kv_y = get_x_y(kv_idx)
        center_x = q_x.clamp(kernel_h // 2, (height - 1) - kernel_h // 2)
        center_y = q_y.clamp(kernel_w // 2, (width - 1) - kernel_w // 2)
        in_rows = (center_x - kv_x).abs() <= kernel_h // 2
        in_cols = (center_y - kv_y).abs() <= kernel_w // 2
        return in_rows & in_cols
    return natten_mask


def _document_ids(length, generator=None):
    lens = torch.randint(1, max(2, length // 3), (length,), generator=generator)
    ids = torch.repeat_interleave(torch.arange(length), lens)[:length]
    return ids.to(torch.int32).contiguous()


def examples(H, L, generator=None):
    """Every gallery mod for H heads and L positions: {name: (score_mod, mask_mod)} (either may be
    None). NATTEN sees the positions as an image 8 pixels wide (the last row may be partial)."""
    g = generator or torch.Generator().manual_seed(0)
    return {
        "causal": (None, causal()),
        "sliding_window": (None, sliding_window(L // 4)),
        "prefix_lm": (None, prefix_lm(L // 3)),
        "document": (None, document(_document_ids(L, g))),
        "alibi": (alibi(alibi_slopes(H)), causal()),
        "softcap": (softcap(20.0), None),
        "t5_relative_bias": (t5_relative_bias(torch.randn(H, 32, generator=g)), None),
        "natten_2d": (None, natten_2d(-(-L // 8), 8, 5, 3)),
    }

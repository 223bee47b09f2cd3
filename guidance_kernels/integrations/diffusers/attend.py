"""Attention with one mode per batch row, as the guided processors call it.

Modes: ``"none"`` (scaled-dot-product attention), ``"identity"`` (PAG: without text tokens the
output is V; with text tokens — joint attention — image query i attends to key i and every text
key, text queries attend normally, diffusers' ``PAGJointAttnProcessor2_0``), ``"blur"`` (SEG with
the blur inside the attention: image queries blurred over the (H, W) grid).

Without an attention mask this is one ``ops.guided_attention`` call. With a mask (HunyuanVideo's
text-padding mask, or one passed through ``joint_attention_kwargs``) it runs torch SDPA per mode
group: ``guided_attention`` takes no mask yet. Identity rows then combine the mask with the
identity structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _identity_structure(n: int, text_tokens: int, text_position: str, device) -> torch.Tensor:
    """(N, N) bool: True where an identity row may attend (image↔image only on the diagonal)."""
    start = text_tokens if text_position == "before" else 0
    image = torch.zeros(n, dtype=torch.bool, device=device)
    image[start:start + n - text_tokens] = True
    allowed = ~(image[:, None] & image[None, :])
    return allowed | torch.eye(n, dtype=torch.bool, device=device)


def _masked(q, k, v, mode: str, mask, text_tokens: int, text_position: str):
    if mode == "identity":
        if text_tokens == 0:
            return v
        allowed = _identity_structure(q.shape[2], text_tokens, text_position, q.device)
        if mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend(q, k, v, modes, *, ops, sigma=None, grid=None, text_tokens: int = 0, text_position: str = "after",
           mask=None) -> torch.Tensor:
    """Attention of ``(B, heads, N, d)`` views; ``modes``: one per row (None: all ``"none"``).
    ``grid``: (H, W) of the image tokens for ``"blur"`` rows. ``mask``: SDPA's ``attn_mask``
    (bool or additive, broadcastable to (B, heads, N, N)). Returns ``(B, heads, N, d)``."""
    if mask is None:
        return ops.guided_attention(q, k, v, modes, sigma, grid, text_tokens, text_position)
    modes = modes or ["none"] * q.shape[0]
    if "blur" in modes:
        raise ValueError("attend: modes: a masked attention takes SEG rows pre-blurred (mode 'none')")
    if mask.dim() == 4 and mask.shape[0] == 1 and q.shape[0] > 1:
        mask = mask.expand(q.shape[0], *mask.shape[1:])
    out, start = [], 0
    for i in range(1, len(modes) + 1):
        if i == len(modes) or modes[i] != modes[start]:
            rows = slice(start, i)
            row_mask = mask[rows] if mask.dim() == 4 else mask
            out.append(_masked(q[rows], k[rows], v[rows], modes[start], row_mask, text_tokens, text_position))
            start = i
    return out[0] if len(out) == 1 else torch.cat(out)

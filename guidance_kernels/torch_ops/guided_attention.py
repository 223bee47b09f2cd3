"""PyTorch backend of guided_attention: the algorithmic short-cuts of the kernels, on any device.

The record (``_library.GuidedAttentionArgs``) holds ``(B, heads, N, d)`` views, one lowered
``_spec.Mode`` per item, the blur items' σ and kernel sizes, the image grid and the text block.
Items are grouped by what they need:

* none: ``softmax(scale·q kᵀ) v`` as written, in fp32 and query chunks (``_common.attention``):
  exact NaN/inf rules, where torch's fused SDPA kernels return finite rows for some non-finite
  inputs;
* blur: the image queries blurred separably in fp32 (``_common.separable_blur``), rounded to the
  input dtype (as the kernels' pre-pass stores them), then attention as above;
* mean (σ = ∞): every image query is the same fp32 mean, so ONE attention row per (item, head) is
  computed in fp32 and broadcast to the image rows: O(N·d) instead of O(N²·d). Text queries attend
  as above;
* identity: without text tokens a bit-exact copy of V. With text tokens, image query i attends to
  key i and the T text keys only: its own logit and an (N_img × T) block, in fp32, in query chunks
  (never an S×S mask); text queries attend as above.

The autograd formula differentiates :func:`differentiable` (torch's SDPA for the attention parts:
memory-efficient gradients; its forward equals this one on finite data).
"""

from __future__ import annotations

import torch

from .._layout import put_items, sdpa, take_items
from .._library import GuidedAttentionArgs, attention_out
from .._spec import Mode
from ._common import attention, compute_dtype, separable_blur

QUERY_CHUNK = 1024  # joint identity: bounds the (chunk × T) fp32 logits per (item, head)


def _mean_row(q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · mean(q_img) kᵀ) v for (G, h, N_img, d) queries: (G, h, 1, d) in fp32."""
    dtype = compute_dtype(q_img)
    mean = q_img.to(dtype).mean(dim=2, keepdim=True)
    logits = torch.matmul(mean, k.to(dtype).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(logits, dim=-1), v.to(dtype))


def _joint_identity_rows(q_img, k_img, v_img, k_txt, v_txt, scale) -> torch.Tensor:
    """Image rows of PAG joint attention: query i over [key i, text keys], in fp32, chunked."""
    dtype = compute_dtype(q_img)
    k_txt_t = k_txt.to(dtype).transpose(-1, -2)
    v_txt = v_txt.to(dtype)
    chunks = []
    for lo in range(0, q_img.shape[2], QUERY_CHUNK):
        rows = slice(lo, lo + QUERY_CHUNK)
        q = q_img[:, :, rows].to(dtype)
        own = (q * k_img[:, :, rows].to(dtype)).sum(dim=-1, keepdim=True) * scale
        text = torch.matmul(q, k_txt_t) * scale
        top = torch.maximum(own, text.amax(dim=-1, keepdim=True))
        p_own = torch.exp(own - top)
        p_text = torch.exp(text - top)
        total = p_own + p_text.sum(dim=-1, keepdim=True)
        chunks.append((p_own * v_img[:, :, rows].to(dtype) + torch.matmul(p_text, v_txt)) / total)
    return torch.cat(chunks, dim=2) if chunks else v_img.to(dtype)  # no image rows: (G, h, 0, d)


def _blurred_image(q: torch.Tensor, a: GuidedAttentionArgs, size: int, sigma: float) -> torch.Tensor:
    """The image rows of ``q`` blurred over the grid, in the compute dtype: (b, heads, N_img, d)."""
    b, heads, _, d = q.shape
    rows = q[:, :, a.image_rows]
    image = rows.to(compute_dtype(q)).permute(0, 1, 3, 2).reshape(b, heads * d, a.grid_h, a.grid_w)
    return separable_blur(image, size, sigma).reshape(b, heads, d, -1).permute(0, 1, 3, 2)


def _groups(a: GuidedAttentionArgs) -> dict[tuple, list[int]]:
    """Items grouped by what they need: (mode,) or (BLUR, kernel size, σ)."""
    groups: dict[tuple, list[int]] = {}
    for i, mode in enumerate(a.modes):
        key = (Mode.BLUR, a.kernel_sizes[i], a.sigmas[i]) if mode == Mode.BLUR else (mode,)
        groups.setdefault(key, []).append(i)
    return groups


def guided_attention(a: GuidedAttentionArgs):
    out = attention_out(a.q, a.layout)
    if out.numel() == 0:
        return out
    img, txt, scale = a.image_rows, a.text_rows, a.scale
    n_img = img.stop - img.start
    for key, items in _groups(a).items():
        mode = key[0]
        qg, kg, vg = take_items(a.q, items), take_items(a.k, items), take_items(a.v, items)
        if mode == Mode.NONE:
            put_items(out, items, slice(None), attention(qg, kg, vg, scale))
        elif mode == Mode.BLUR:
            blurred = qg.clone()
            blurred[:, :, img] = _blurred_image(qg, a, key[1], key[2])
            put_items(out, items, slice(None), attention(blurred, kg, vg, scale))
        elif mode == Mode.MEAN:
            row = _mean_row(qg[:, :, img], kg, vg, scale)
            put_items(out, items, img, row.expand(-1, -1, n_img, -1))
            if a.text_tokens:
                put_items(out, items, txt, attention(qg[:, :, txt], kg, vg, scale))
        elif mode == Mode.IDENTITY and a.text_tokens == 0:
            put_items(out, items, slice(None), vg)  # PAG: the attention output is V itself, bit for bit
        elif mode == Mode.IDENTITY:
            rows = _joint_identity_rows(qg[:, :, img], kg[:, :, img], vg[:, :, img], kg[:, :, txt], vg[:, :, txt],
                                        scale)
            put_items(out, items, img, rows)
            put_items(out, items, txt, attention(qg[:, :, txt], kg, vg, scale))
        else:
            raise ValueError(f"guided_attention: unknown internal mode {mode}")
    return out


def differentiable(a: GuidedAttentionArgs):
    """The same function as :func:`guided_attention` in functional torch ops (each item computed
    on its own and concatenated): the forward that the op's autograd formula differentiates."""
    img, txt, scale = a.image_rows, a.text_rows, a.scale
    n_img = img.stop - img.start

    def in_order(image_rows, text_rows):
        return torch.cat([text_rows, image_rows] if a.text_before else [image_rows, text_rows], dim=2)

    outs = []
    for i, mode in enumerate(a.modes):
        qi, ki, vi = a.q[i:i + 1], a.k[i:i + 1], a.v[i:i + 1]
        if mode == Mode.NONE:
            out = sdpa(qi, ki, vi, scale)
        elif mode == Mode.BLUR:
            image = _blurred_image(qi, a, a.kernel_sizes[i], a.sigmas[i]).to(qi.dtype)
            out = sdpa(torch.cat([qi[:, :, :img.start], image, qi[:, :, img.stop:]], dim=2), ki, vi, scale)
        elif mode == Mode.MEAN:
            row = _mean_row(qi[:, :, img], ki, vi, scale).to(qi.dtype)
            out = in_order(row.expand(-1, -1, n_img, -1), sdpa(qi[:, :, txt], ki, vi, scale))
        elif mode == Mode.IDENTITY and a.text_tokens == 0:
            out = vi
        elif mode == Mode.IDENTITY:
            rows = _joint_identity_rows(qi[:, :, img], ki[:, :, img], vi[:, :, img], ki[:, :, txt], vi[:, :, txt],
                                        scale).to(qi.dtype)
            out = in_order(rows, sdpa(qi[:, :, txt], ki, vi, scale))
        else:
            raise ValueError(f"guided_attention: unknown internal mode {mode}")
        outs.append(out)
    return torch.cat(outs)

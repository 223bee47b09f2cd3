"""PyTorch backend of guided_attention: the algorithmic short-cuts of the kernels, on any device.

Inputs are the op arguments (see ``guidance_kernels._library``): ``(B, heads, N, d)`` views, one
mode per item (MODE_NONE / IDENTITY / BLUR / MEAN), the blur items' σ and kernel sizes, the image
grid and the text block. Items are grouped by what they need:

* none: ``F.scaled_dot_product_attention`` in the input dtype (its kernels accumulate in fp32);
* blur: the image queries blurred separably in fp32 (``torch_ops.gaussian_blur_2d``), cast back to
  the input dtype (as every SDPA kernel needs), then SDPA;
* mean (σ = ∞): every image query is the same fp32 mean, so ONE attention row per (item, head) is
  computed in fp32 and broadcast to the image rows: O(N·d) instead of O(N²·d). Text queries run SDPA;
* identity: without text tokens a bit-exact copy of V. With text tokens, image query i attends to
  key i and the T text keys only: its own logit and an (N_img × T) block, in fp32, in query chunks
  (never an S×S mask); text queries run SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._library import MODE_BLUR, MODE_IDENTITY, MODE_MEAN, MODE_NONE, attention_out
from .gaussian_blur_2d import compute_dtype, separable_blur

QUERY_CHUNK = 1024  # joint identity: bounds the (chunk × T) fp32 logits per (item, head)


def take_items(t: torch.Tensor, items: list[int]) -> torch.Tensor:
    """``t[items]``: a view when the items are a contiguous range (the usual [u, c | p] batch),
    else a device-side gather of slices (indexing with a Python list would copy an index tensor
    from the host on every call, which CUDA-graph capture forbids)."""
    if items == list(range(items[0], items[0] + len(items))):
        return t[items[0]:items[0] + len(items)]
    return torch.cat([t[i:i + 1] for i in items])


def put_items(out: torch.Tensor, items: list[int], rows: slice, result: torch.Tensor) -> None:
    """``out[items, :, rows] = result``: one copy for a contiguous range of items."""
    if items == list(range(items[0], items[0] + len(items))):
        out[items[0]:items[0] + len(items), :, rows].copy_(result)
        return
    for j, i in enumerate(items):
        out[i, :, rows].copy_(result[j])


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


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
    return torch.cat(chunks, dim=2)


def guided_attention(q, k, v, modes, sigmas, kernel_sizes, grid_h, grid_w, text_tokens, text_before, scale,
                     layout):
    out = attention_out(q, layout)
    if out.numel() == 0:
        return out
    nq = q.shape[2]
    n_img = nq - text_tokens
    img = slice(text_tokens, nq) if text_before else slice(0, n_img)
    txt = slice(0, text_tokens) if text_before else slice(n_img, nq)
    groups: dict[tuple, list[int]] = {}
    for i, mode in enumerate(modes):
        key = (MODE_BLUR, kernel_sizes[i], sigmas[i]) if mode == MODE_BLUR else (mode,)
        groups.setdefault(key, []).append(i)
    for key, items in groups.items():
        mode = key[0]
        qg, kg, vg = take_items(q, items), take_items(k, items), take_items(v, items)
        if mode == MODE_NONE:
            put_items(out, items, slice(None), _sdpa(qg, kg, vg, scale))
        elif mode == MODE_BLUR:
            _, size, sigma = key
            blurred = qg.clone()
            b, heads, _, d = qg.shape
            image = qg[:, :, img].to(compute_dtype(qg)).permute(0, 1, 3, 2).reshape(b, heads * d, grid_h, grid_w)
            image = separable_blur(image, size, sigma)
            blurred[:, :, img] = image.reshape(b, heads, d, n_img).permute(0, 1, 3, 2)
            put_items(out, items, slice(None), _sdpa(blurred, kg, vg, scale))
        elif mode == MODE_MEAN:
            row = _mean_row(qg[:, :, img], kg, vg, scale)
            put_items(out, items, img, row.expand(-1, -1, n_img, -1))
            if text_tokens:
                put_items(out, items, txt, _sdpa(qg[:, :, txt], kg, vg, scale))
        elif mode == MODE_IDENTITY:
            if text_tokens == 0:
                put_items(out, items, slice(None), vg)  # PAG: the attention output is V itself, bit for bit
                continue
            rows = _joint_identity_rows(qg[:, :, img], kg[:, :, img], vg[:, :, img], kg[:, :, txt], vg[:, :, txt],
                                        scale)
            put_items(out, items, img, rows)
            put_items(out, items, txt, _sdpa(qg[:, :, txt], kg, vg, scale))
        else:
            raise ValueError(f"guided_attention: unknown internal mode {mode}")
    return out


def _blurred(q, img, size, sigma, grid_h, grid_w):
    """q with its image rows blurred (functional: concatenation, no in-place writes)."""
    b, heads, _, d = q.shape
    rows = q[:, :, img]
    image = rows.to(compute_dtype(q)).permute(0, 1, 3, 2).reshape(b, heads * d, grid_h, grid_w)
    image = separable_blur(image, size, sigma).reshape(b, heads, d, -1).permute(0, 1, 3, 2).to(q.dtype)
    return torch.cat([q[:, :, :img.start], image, q[:, :, img.stop:]], dim=2)


def differentiable(q, k, v, modes, sigmas, kernel_sizes, grid_h, grid_w, text_tokens, text_before, scale):
    """The same function as :func:`guided_attention` in functional torch ops (each item computed
    on its own and concatenated): the forward that the op's autograd formula differentiates."""
    nq = q.shape[2]
    n_img = nq - text_tokens
    img = slice(text_tokens, nq) if text_before else slice(0, n_img)
    txt = slice(0, text_tokens) if text_before else slice(n_img, nq)

    def in_order(image_rows, text_rows):
        return torch.cat([text_rows, image_rows] if text_before else [image_rows, text_rows], dim=2)

    outs = []
    for i, mode in enumerate(modes):
        qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]
        if mode == MODE_NONE:
            out = _sdpa(qi, ki, vi, scale)
        elif mode == MODE_BLUR:
            out = _sdpa(_blurred(qi, img, kernel_sizes[i], sigmas[i], grid_h, grid_w), ki, vi, scale)
        elif mode == MODE_MEAN:
            row = _mean_row(qi[:, :, img], ki, vi, scale).to(q.dtype)
            out = in_order(row.expand(-1, -1, n_img, -1), _sdpa(qi[:, :, txt], ki, vi, scale))
        elif mode == MODE_IDENTITY and text_tokens == 0:
            out = vi
        elif mode == MODE_IDENTITY:
            rows = _joint_identity_rows(qi[:, :, img], ki[:, :, img], vi[:, :, img], ki[:, :, txt], vi[:, :, txt],
                                        scale).to(q.dtype)
            out = in_order(rows, _sdpa(qi[:, :, txt], ki, vi, scale))
        else:
            raise ValueError(f"guided_attention: unknown internal mode {mode}")
        outs.append(out)
    return torch.cat(outs)

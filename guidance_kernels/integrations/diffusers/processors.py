"""Attention processors backed by guidance_kernels.guided_attention (and attention_key_mass).

Drop-ins for diffusers' PAG pipelines — same batch layout and results as diffusers' processors:

* :class:`PAGCFGIdentityAttnProcessor` / :class:`PAGIdentityAttnProcessor` replace
  ``PAGCFGIdentitySelfAttnProcessor2_0`` / ``PAGIdentitySelfAttnProcessor2_0`` (UNet self-attention,
  batch ``[uncond, cond, perturbed]`` / ``[cond, perturbed]``);
* :class:`PAGCFGJointAttnProcessor` / :class:`PAGJointAttnProcessor` replace
  ``PAGCFGJointAttnProcessor2_0`` / ``PAGJointAttnProcessor2_0`` (SD3 joint attention).

They run the whole batch through one set of projections and ONE attention launch with per-item
modes (no chunk/cat of the batch), and the joint ones never build diffusers' S×S mask. Unlike
diffusers' joint PAG processors they apply the model's q/k norms (SD3.5's ``qk_norm``) on every
branch, as ``JointAttnProcessor2_0`` does for normal attention.

:class:`GuidedAttnProcessor` / :class:`GuidedJointAttnProcessor` serve the guided denoiser: they
read the branch layout of the current call from a :class:`~.fork.ForwardState` and give each row
its mode at this layer (PAG branch → identity, SEG branch → blur, everything else → none), and
optionally capture SAG's key mass for the uncond rows.
"""

from __future__ import annotations

import math

import torch

from ... import guided_attention
from .fork import ForwardState


def token_grid(latent_hw: tuple[int, int] | None, tokens: int) -> tuple[int, int]:
    """(H, W) of a layer's image tokens from the latent size: the latent downsampled by a power of
    two (ceil division, as strided convolutions and patch embeddings do) with H·W == tokens."""
    if latent_hw is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"cannot infer a grid for {tokens} tokens without the latent size")
        return side, side
    h, w = latent_hw
    for shift in range(0, 8):
        f = 1 << shift
        gh, gw = -(-h // f), -(-w // f)
        if gh * gw == tokens:
            return gh, gw
    raise ValueError(f"{tokens} image tokens do not match the latent {h}x{w} downsampled by a power of two")


def _project(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    """(B, N, heads·d) projections with the per-head q/k norms applied (as diffusers does after
    splitting heads; the norms act on the last dim, so the (B, N, heads, d) view is equivalent)."""
    q, k, v = to_q(x), to_k(x), to_v(x)
    heads = attn.heads
    if norm_q is not None:
        q = norm_q(q.unflatten(-1, (heads, -1))).flatten(-2)
    if norm_k is not None:
        k = norm_k(k.unflatten(-1, (heads, -1))).flatten(-2)
    return q, k, v


def self_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *, modes=None,
                   sigma=None, grid_hw=None, capture=None, reference=False):
    """diffusers' ``AttnProcessor2_0`` with guided attention: ``modes`` per batch row.
    ``capture`` (a callable taking (mass, grid)) requests SAG's key mass of the uncond rows."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        grid = (height, width)
    else:
        grid = None
    batch_size = hidden_states.shape[0]
    perturbed = modes is not None and any(m != "none" for m in modes)
    if attention_mask is not None and (perturbed or capture is not None):
        raise NotImplementedError("attention masks are not supported on layers with perturbed attention")
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is not None:
        raise ValueError("guided self-attention processors serve self-attention layers only (attn1)")
    q, k, v = _project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    if grid is None and (perturbed and "blur" in modes or capture is not None):
        grid = token_grid(grid_hw, hidden_states.shape[1])
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        split = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)
    else:
        out = _attend(q, k, v, attn.heads, modes, sigma, grid, capture=capture, reference=reference)
    out = attn.to_out[0](out.to(q.dtype))
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _guided(q, k, v, heads, modes, sigma, grid, text_tokens, reference):
    if not reference:
        return guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, layout="bnd", heads=heads,
                                text_tokens=text_tokens, text_position="after")
    from ... import reference as ref

    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    out = ref.guided_attention(split(q), split(k), split(v), modes or ["none"] * q.shape[0], sigma, grid,
                               text_tokens=text_tokens, text_position="after")
    return out.transpose(1, 2).flatten(2)


def _attend(q, k, v, heads, modes, sigma, grid, *, text_tokens=0, capture=None, reference=False):
    """Guided attention over ``(B, N, heads·d)``; with ``capture``, the unperturbed rows go through the
    key-mass attention and their SAG mass is stored. ``reference`` uses the anchors' formulations
    (explicit maps, chunked SDPA, conv2d blur) instead of the ops: the no-kernels baseline."""
    if capture is None:
        return _guided(q, k, v, heads, modes, sigma, grid, text_tokens, reference)
    if reference:
        from ...reference import attention_key_mass
    else:
        from ... import attention_key_mass
    rows, first, count = capture["rows"], capture["first"], capture["count"]
    if reference:
        out_plain, mass = attention_key_mass(q[:rows], k[:rows], v[:rows], layout="bnd", heads=heads)
        mass = mass[first:first + count]
    else:
        out_plain, mass = attention_key_mass(q[:rows], k[:rows], v[:rows], layout="bnd", heads=heads,
                                             items=list(range(first, first + count)))
    capture["store"](mass, grid)
    if rows == q.shape[0]:
        return out_plain
    rest = _guided(q[rows:], k[rows:], v[rows:], heads, modes[rows:], sigma, grid, text_tokens, reference)
    return torch.cat([out_plain, rest], dim=0)


def joint_attention(attn, hidden_states, encoder_hidden_states, *, modes=None, sigma=None, grid_hw=None,
                    reference=False):
    """diffusers' ``JointAttnProcessor2_0`` (image tokens then text tokens) with guided attention:
    identity rows follow PAGJointAttnProcessor2_0 (image query i sees key i and all text keys);
    blur rows blur the image queries only."""
    image_tokens = hidden_states.shape[1]
    q, k, v = _project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    text_tokens = 0
    if encoder_hidden_states is not None:
        tq, tk, tv = _project(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                              attn.norm_added_q, attn.norm_added_k)
        q, k, v = (torch.cat([a, b], dim=1) for a, b in ((q, tq), (k, tk), (v, tv)))
        text_tokens = encoder_hidden_states.shape[1]
    grid = token_grid(grid_hw, image_tokens) if modes is not None and "blur" in modes else None
    out = _attend(q, k, v, attn.heads, modes, sigma, grid, text_tokens=text_tokens, reference=reference).to(q.dtype)
    if encoder_hidden_states is not None:
        out, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if encoder_hidden_states is not None:
        return out, context
    return out


def _pag_modes(batch: int, chunks: int) -> list[str]:
    if batch % chunks:
        raise ValueError(f"PAG processor: batch {batch} is not {chunks} equal chunks")
    per = batch // chunks
    return ["none"] * (batch - per) + ["identity"] * per


class PAGCFGIdentityAttnProcessor:
    """Drop-in for diffusers' ``PAGCFGIdentitySelfAttnProcessor2_0`` (batch [uncond, cond, perturbed])."""

    chunks = 3

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # diffusers applies the mask to the unperturbed chunks only and none is passed to UNet attn1.
        return self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              modes=_pag_modes(hidden_states.shape[0], self.chunks))


class PAGIdentityAttnProcessor(PAGCFGIdentityAttnProcessor):
    """Drop-in for diffusers' ``PAGIdentitySelfAttnProcessor2_0`` (batch [cond, perturbed])."""

    chunks = 2


class PAGCFGJointAttnProcessor:
    """Drop-in for diffusers' ``PAGCFGJointAttnProcessor2_0`` (SD3, batch [uncond, cond, perturbed])."""

    chunks = 3

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return joint_attention(attn, hidden_states, encoder_hidden_states,
                               modes=_pag_modes(hidden_states.shape[0], self.chunks))


class PAGJointAttnProcessor(PAGCFGJointAttnProcessor):
    """Drop-in for diffusers' ``PAGJointAttnProcessor2_0`` (SD3, batch [cond, perturbed])."""

    chunks = 2


class _Guided:
    def __init__(self, state: ForwardState, layer: str, *, pag: bool, seg: bool, sag: bool = False):
        self.state, self.layer, self.pag, self.seg, self.sag = state, layer, pag, seg, sag

    def modes(self, rows: int) -> list[str] | None:
        plan = self.state.plan
        if plan is None:
            return None
        table = {"pag": "identity" if self.pag else "none", "seg": "blur" if self.seg else "none"}
        return [table.get(kind, "none") for kind in plan.kind_of_rows(rows)]

    def capture(self, rows: int):
        plan = self.state.plan
        if not self.sag or plan is None or not self.state.extras.get("sag_capture"):
            return None
        # The unperturbed branches come first in every plan; their rows get the key-mass attention.
        plain = sum(1 for kind in plan.kinds[: rows // plan.batch] if kind in ("uncond", "cond"))

        def store(mass, grid):
            self.state.extras["sag_mass"] = mass
            self.state.extras["sag_grid"] = grid

        # SAG uses the uncond branch's map with CFG, the cond branch's without (diffusers).
        source = "uncond" if "uncond" in plan.kinds else "cond"
        return {"rows": plain * plan.batch, "first": plan.kinds.index(source) * plan.batch,
                "count": plan.batch, "store": store}


class GuidedAttnProcessor(_Guided):
    """UNet self-attention for the guided denoiser (see the module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rows = hidden_states.shape[0]
        return self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              modes=self.modes(rows), sigma=self.state.extras.get("seg_sigma"),
                              grid_hw=self.state.grid, capture=self.capture(rows),
                              reference=self.state.extras.get("reference", False))


class GuidedJointAttnProcessor(_Guided):
    """SD3-style joint attention for the guided denoiser."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return joint_attention(attn, hidden_states, encoder_hidden_states, modes=self.modes(hidden_states.shape[0]),
                               sigma=self.state.extras.get("seg_sigma"), grid_hw=self.state.extras.get("token_grid"),
                               reference=self.state.extras.get("reference", False))

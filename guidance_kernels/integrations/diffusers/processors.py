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

The guided processors serve :class:`~.denoiser.GuidedDenoiser`: they read the branch layout of the
current call from a :class:`~.fork.ForwardState` and give each row its mode at this layer (PAG
branch → identity, SEG branch → blurred queries, everything else → none), and optionally capture
SAG's key mass for the uncond rows. :class:`GuidedAttnProcessor` (UNet self-attention) and
:class:`GuidedJointAttnProcessor` (SD3 / SD3.5) are here; the video and Flux ones in
:mod:`.dit_processors`. Outside a guided call (no plan) they compute the model's own attention.
"""

from __future__ import annotations

import torch

from .attend import attend
from .fork import ForwardState
from .ops import FUSED
from .tokens import blur_query_rows, layer_grid


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·d) → (B, heads, N, d) view."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) → (B, N, heads·d)."""
    return t.transpose(1, 2).flatten(2)


def seg_rows(modes) -> slice | None:
    """The rows of the SEG branch (one branch: contiguous), None without one."""
    if not modes or "seg" not in modes:
        return None
    first = modes.index("seg")
    return slice(first, len(modes) - modes[::-1].index("seg"))


def attention_modes(modes, fused_blur: bool):
    """Row modes for :func:`~.attend.attend`: SEG rows blur inside the attention (``"blur"``) or
    were blurred before it (``"none"``)."""
    if modes is None:
        return None
    return [("blur" if fused_blur else "none") if m == "seg" else m for m in modes]


class _Guided:
    """A guided processor of one layer: ``pag`` / ``seg`` say whether this layer is perturbed by
    the PAG / SEG branch, ``sag`` whether it captures SAG's key mass."""

    def __init__(self, state: ForwardState, layer: str, *, pag: bool, seg: bool, sag: bool = False):
        self.state, self.layer, self.pag, self.seg, self.sag = state, layer, pag, seg, sag

    def modes(self) -> list[str] | None:
        """Per row of this layer's call: ``"identity"`` (PAG), ``"seg"`` or ``"none"``."""
        plan = self.state.plan
        if plan is None:
            return None
        table = {"pag": "identity" if self.pag else "none", "seg": "seg" if self.seg else "none"}
        return [table.get(kind, "none") for kind in plan.kinds_at(self.layer) for _ in range(plan.batch)]

    def capture(self):
        plan = self.state.plan
        if not self.sag or plan is None or not self.state.sag_capture:
            return None
        kinds = plan.kinds_at(self.layer)
        # The unperturbed branches come first in every plan; their rows get the key-mass attention.
        plain = sum(1 for kind in kinds if kind in ("uncond", "cond"))

        def store(mass, grid):
            self.state.sag_mass, self.state.sag_grid = mass, grid

        # SAG uses the uncond branch's map with CFG, the cond branch's without (diffusers).
        source = "uncond" if "uncond" in kinds else "cond"
        return {"rows": plain * plan.batch, "first": kinds.index(source) * plan.batch, "count": plan.batch,
                "store": store}


# --------------------------------------------------------------------------- UNet self-attention


def self_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *, modes=None,
                   sigma=None, latent_hw=None, capture=None, ops=FUSED, blur="frame"):
    """diffusers' ``AttnProcessor2_0`` with guided attention: ``modes`` per batch row.
    ``capture`` (see :meth:`_Guided.capture`) requests SAG's key mass of the uncond rows."""
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
    if grid is None and (seg_rows(modes) is not None or capture is not None):
        grid = layer_grid(latent_hw, hidden_states.shape[1])
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    fused = attn.norm_q is None
    if not fused:
        q = blur_query_rows(q, seg_rows(modes), slice(None), (1, *grid), sigma, blur, ops)
    if attn.norm_q is not None:
        q = attn.norm_q(q.unflatten(-1, (attn.heads, -1))).flatten(-2)
    if attn.norm_k is not None:
        k = attn.norm_k(k.unflatten(-1, (attn.heads, -1))).flatten(-2)
    modes = attention_modes(modes, fused)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        out = _merge(torch.nn.functional.scaled_dot_product_attention(
            _split(q, attn.heads), _split(k, attn.heads), _split(v, attn.heads), attn_mask=mask))
    else:
        out = _attend_capturing(q, k, v, attn.heads, modes, sigma, grid, capture, ops)
    out = attn.to_out[0](out.to(q.dtype))
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _attend_capturing(q, k, v, heads, modes, sigma, grid, capture, ops):
    """Guided attention over ``(B, N, heads·d)``; with ``capture``, the unperturbed rows go through
    the key-mass attention and their SAG mass is stored."""
    if capture is None:
        return _merge(attend(_split(q, heads), _split(k, heads), _split(v, heads), modes, ops=ops, sigma=sigma,
                             grid=grid))
    rows, first, count = capture["rows"], capture["first"], capture["count"]
    out_plain, mass = ops.attention_key_mass(q[:rows], k[:rows], v[:rows], heads, range(first, first + count))
    capture["store"](mass, grid)
    if rows == q.shape[0]:
        return out_plain
    rest = attend(_split(q[rows:], heads), _split(k[rows:], heads), _split(v[rows:], heads), modes[rows:], ops=ops,
                  sigma=sigma, grid=grid)
    return torch.cat([out_plain, _merge(rest)], dim=0)


# --------------------------------------------------------------------------- SD3 joint attention


def joint_attention(attn, hidden_states, encoder_hidden_states, *, modes=None, sigma=None, token_grid=None,
                    ops=FUSED, blur="frame"):
    """diffusers' ``JointAttnProcessor2_0`` (image tokens then text tokens; without text tokens:
    SD3.5's image-only ``attn2``) with guided attention: identity rows follow
    ``PAGJointAttnProcessor2_0`` (image query i sees key i and all text keys); SEG rows blur the
    image queries (``to_q``'s output, before SD3.5's qk-norm)."""
    image_tokens = hidden_states.shape[1]
    heads = attn.heads
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    fused = attn.norm_q is None  # SD3 grids have one frame: the 3-D blur is the 2-D one
    if not fused:
        q = blur_query_rows(q, seg_rows(modes), slice(None), token_grid, sigma, blur, ops)
    q, k, v = _split(q, heads), _split(k, heads), _split(v, heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    text_tokens = 0
    if encoder_hidden_states is not None:
        tq, tk, tv = (_split(p(encoder_hidden_states), heads) for p in (attn.add_q_proj, attn.add_k_proj,
                                                                         attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        q, k, v = (torch.cat([a, b], dim=2) for a, b in ((q, tq), (k, tk), (v, tv)))
        text_tokens = encoder_hidden_states.shape[1]
    grid = token_grid[1:] if token_grid is not None else None
    out = attend(q, k, v, attention_modes(modes, fused), ops=ops, sigma=sigma, grid=grid, text_tokens=text_tokens)
    out = _merge(out).to(q.dtype)
    if encoder_hidden_states is not None:
        out, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if encoder_hidden_states is not None:
        return out, context
    return out


# --------------------------------------------------------------------------- PAG pipeline drop-ins


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


# --------------------------------------------------------------------------- guided denoiser processors


class GuidedAttnProcessor(_Guided):
    """UNet self-attention for the guided denoiser (see the module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        return self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, modes=self.modes(),
                              sigma=state.seg_sigma, latent_hw=state.latent_hw, capture=self.capture(), ops=state.ops,
                              blur=state.seg_blur)


class GuidedJointAttnProcessor(_Guided):
    """SD3 / SD3.5 attention (joint ``attn`` and dual-attention ``attn2``) for the guided denoiser."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        state = self.state
        return joint_attention(attn, hidden_states, encoder_hidden_states, modes=self.modes(), sigma=state.seg_sigma,
                               token_grid=state.token_grid, ops=state.ops, blur=state.seg_blur)

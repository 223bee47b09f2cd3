"""Guided attention processors of the Flux, Wan, LTX-Video and HunyuanVideo transformers.

Each computes what the model's own processor computes (``FluxAttnProcessor``, ``WanAttnProcessor``,
``LTXVideoAttnProcessor``, ``HunyuanVideoAttnProcessor2_0``: projections, qk-norms, RoPE, output
projections, fused QKV projections where the model has them) with two insertions per batch row:

* SEG rows: the image tokens of ``to_q``'s output are blurred over the (T, H, W) grid before the
  qk-norm and RoPE (:mod:`.tokens`), as diffusers' SEG hook on ``to_q`` means;
* PAG rows: identity attention (:mod:`.attend`): video self-attention returns V; joint attention
  keeps text queries attending normally while image query i attends to key i and the text keys.

Text tokens come before the image tokens in Flux (both streams; in the single-stream blocks the
text count is the call's ``encoder_hidden_states`` length) and after them in HunyuanVideo.
"""

from __future__ import annotations

import torch

from .attend import attend
from .processors import _Guided, attention_modes, seg_rows
from .tokens import blur_query_rows


def _rope(x, freqs):
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


def _bhnd(*tensors):
    """(B, N, heads, d) → (B, heads, N, d) views."""
    return tuple(t.transpose(1, 2) for t in tensors)


def _seg(q, modes, image: slice, state):
    return blur_query_rows(q, seg_rows(modes), image, state.token_grid, state.seg_sigma, state.seg_blur, state.ops)


# --------------------------------------------------------------------------- Flux


def _flux_projections(attn, x, context):
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        text = attn.to_added_qkv(context).chunk(3, dim=-1) if context is not None and hasattr(
            attn, "to_added_qkv") else None
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        text = None
        if context is not None and attn.added_kv_proj_dim is not None:
            text = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
    return q, k, v, text


def flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *, modes, state):
    """``FluxAttnProcessor`` with per-row modes: double-stream blocks (text stream through the
    ``add_*`` projections, placed before the image tokens) and single-stream blocks (the
    concatenated [text, image] stream, ``state.text_tokens`` of them text)."""
    q, k, v, text = _flux_projections(attn, hidden_states, encoder_hidden_states)
    text_tokens = encoder_hidden_states.shape[1] if text is not None else (state.text_tokens if modes else 0)
    q = _seg(q, modes, slice(None) if text is not None else slice(text_tokens, None), state)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if text is not None:
        tq, tk, tv = (t.unflatten(-1, (-1, attn.head_dim)) for t in text)
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
    if image_rotary_emb is not None:
        q, k = _rope(q, image_rotary_emb), _rope(k, image_rotary_emb)
    out = attend(*_bhnd(q, k, v), attention_modes(modes, False), ops=state.ops, text_tokens=text_tokens,
                 text_position="before", mask=attention_mask)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is None:
        return out
    context, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                        dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(context.contiguous())


class GuidedFluxAttnProcessor(_Guided):
    """Flux attention (double- and single-stream blocks) for the guided denoiser."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                              modes=self.modes(), state=self.state)


# --------------------------------------------------------------------------- Wan


def _wan_rope(x, cos, sin):
    """Wan's rotary embedding of (B, N, heads, d): interleaved pairs rotated by the tables' angles."""
    pairs = x.unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((real * c - imag * s, real * s + imag * c), dim=-1).flatten(-2).type_as(x)


def wan_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, *, modes, state):
    """``WanAttnProcessor`` of the video self-attention ``attn1`` with per-row modes."""
    if encoder_hidden_states is not None:
        raise ValueError("guided Wan processors serve the self-attention attn1 only")
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = _seg(q, modes, slice(None), state)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        q, k = _wan_rope(q, *rotary_emb), _wan_rope(k, *rotary_emb)
    out = attend(*_bhnd(q, k, v), attention_modes(modes, False), ops=state.ops, mask=attention_mask)
    out = out.transpose(1, 2).flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


class GuidedWanAttnProcessor(_Guided):
    """Wan video self-attention for the guided denoiser."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return wan_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                  modes=self.modes(), state=self.state)


# --------------------------------------------------------------------------- LTX-Video


def ltx_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *, modes,
                       state):
    """``LTXVideoAttnProcessor`` of the video self-attention ``attn1`` with per-row modes."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    if encoder_hidden_states is not None:
        raise ValueError("guided LTX processors serve the self-attention attn1 only")
    if attention_mask is not None:
        batch, tokens = hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = _seg(q, modes, slice(None), state)
    q, k = attn.norm_q(q), attn.norm_k(k)
    if image_rotary_emb is not None:
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    out = attend(*_bhnd(q, k, v), attention_modes(modes, False), ops=state.ops, mask=attention_mask)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))


class GuidedLTXAttnProcessor(_Guided):
    """LTX-Video self-attention for the guided denoiser."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return ltx_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                  modes=self.modes(), state=self.state)


# --------------------------------------------------------------------------- HunyuanVideo


def hunyuan_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *, modes,
                      state):
    """``HunyuanVideoAttnProcessor2_0`` with per-row modes: double-stream (text through the
    ``add_*`` projections) and single-stream (the [video, text] stream) attention, text after
    the video tokens, RoPE on the video tokens, the text-padding mask."""
    image_tokens = hidden_states.shape[1]
    single = attn.add_q_proj is None and encoder_hidden_states is not None
    if single:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = _seg(q, modes, slice(0, image_tokens), state)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if image_rotary_emb is not None:
        if single:
            q = torch.cat([_rope(q[:, :image_tokens], image_rotary_emb), q[:, image_tokens:]], dim=1)
            k = torch.cat([_rope(k[:, :image_tokens], image_rotary_emb), k[:, image_tokens:]], dim=1)
        else:
            q, k = _rope(q, image_rotary_emb), _rope(k, image_rotary_emb)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        tq, tk, tv = (p(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        q, k, v = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
    text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    out = attend(*_bhnd(q, k, v), attention_modes(modes, False), ops=state.ops, text_tokens=text_tokens,
                 text_position="after", mask=attention_mask)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is None:
        return out, None
    out, context = out[:, :image_tokens], out[:, image_tokens:]
    if getattr(attn, "to_out", None) is not None:
        out = attn.to_out[1](attn.to_out[0](out))
    if getattr(attn, "to_add_out", None) is not None:
        context = attn.to_add_out(context)
    return out, context


class GuidedHunyuanVideoAttnProcessor(_Guided):
    """HunyuanVideo attention (double- and single-stream blocks) for the guided denoiser."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return hunyuan_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 modes=self.modes(), state=self.state)

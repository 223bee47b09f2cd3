"""guided_attention: scaled-dot-product attention where every batch item carries its own
perturbation, so a diffusers / ComfyUI batch ``[uncond, cond, perturbed…]`` is one call with no
chunk or cat:

================  =====================================================================================
mode              output rows of that item
================  =====================================================================================
``"none"``        ``softmax(scale·q kᵀ) v`` (k, v may have another length: cross-attention)
``"identity"``    PAG: ``v`` itself (bit-exact copy). With text tokens (joint attention, SD3/Flux):
                  image query i attends to key i and every text key, text queries attend normally
                  (diffusers ``PAGJointAttnProcessor2_0``, without its S×S mask)
``"blur"``        SEG: image queries blurred over the ``(H, W)`` grid (= the logits blurred along
                  the query axis), text queries untouched; σ > 9999: every image query is the grid
                  mean, computed as ONE attention row per (item, head) and broadcast: O(N·d)
================  =====================================================================================

Modes, σ, grid and text tokens are static Python values: under ``torch.compile`` a new
configuration compiles once. The op has an autograd formula (models that use it compile with
parameters requiring grad).

Backends: ``"triton_sdpa"`` (torch SDPA for the plain and blurred items, our kernel for identity
and σ = ∞ items), ``"triton"`` (everything in our kernels), ``"torch"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from .. import _checks, _library, backends
from .._library import GuidedAttentionArgs
from .._spec import PUBLIC_MODES, Mode, blur_kernel_size

LAYOUTS = ("bhnd", "bnd")
TEXT_POSITIONS = ("after", "before")
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_FP32_HEAD_DIM = 128


def _kernel_reasons(req: backends.Request) -> list[str]:
    """Why our attention kernel cannot serve a call (facts: the static head dim)."""
    d = req.fact("head_dim")
    if d is None:
        return []
    if d > MAX_TRITON_HEAD_DIM:
        return [f"head dim {d} > {MAX_TRITON_HEAD_DIM} (the kernel keeps a (BLOCK_M, head dim) tile in registers)"]
    if req.dtype == torch.float32 and d > MAX_TRITON_FP32_HEAD_DIM and req.device_type == "cuda":
        return [f"float32 with head dim {d} > {MAX_TRITON_FP32_HEAD_DIM} (the IEEE fp32 dot of a 256-wide "
                "tile spills registers; half precision is served)"]
    return []


def _sdpa_route_reasons(req: backends.Request) -> list[str]:
    """triton_sdpa runs our kernel only for identity and σ = ∞ items (fact ``kernel_items``)."""
    return _kernel_reasons(req) if req.fact("kernel_items", True) else []


backends.register_op("guided_attention", ("triton_sdpa", "triton", "torch"), triton=_kernel_reasons,
                     triton_sdpa=_sdpa_route_reasons)


# --------------------------------------------------------------------------- argument checks


def _views(fn: str, q, k, v, layout: str, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, heads, N, d) views (no copy), checked against each other."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.float_tensor(fn, name, t)
    _checks.same_device_dtype(fn, "k", k, q, "q")
    _checks.same_device_dtype(fn, "v", v, q, "q")
    if layout not in LAYOUTS:
        _checks.fail(fn, "layout", f"must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bnd" and heads is None:
        _checks.fail(fn, "heads", "required for layout 'bnd' (q is (B, N, heads*d))")
    if heads is not None:
        heads = _checks.integer(fn, "heads", heads, minimum=1)
        if layout == "bhnd" and q.dim() == 4 and q.shape[1] != heads:
            _checks.fail(fn, "heads", f"is {heads} but q has {q.shape[1]} heads (dim 1)")
    q4, k4, v4 = (_heads_view(fn, name, t, layout, heads) for name, t in (("q", q), ("k", k), ("v", v)))
    batch, nheads, nq, d = q4.shape
    for name, t in (("k", k4), ("v", v4)):
        if t.shape[0] != batch:
            _checks.fail(fn, name, f"batch {t.shape[0]} differs from q's {batch}")
        if t.shape[1] != nheads:
            _checks.fail(fn, name, f"has {t.shape[1]} heads but q has {nheads}")
        if t.shape[3] != d:
            _checks.fail(fn, name, f"head dim {t.shape[3]} differs from q's {d}")
    if v4.shape[2] != k4.shape[2]:
        _checks.fail(fn, "v", f"has {v4.shape[2]} tokens but k has {k4.shape[2]}")
    if k4.shape[2] == 0 and nq > 0:
        _checks.fail(fn, "k", "has no tokens: a softmax over no keys is undefined")
    if d == 0:
        _checks.fail(fn, "q", "has head dim 0 (the default softmax scale is 1/sqrt(head dim))")
    return q4, k4, v4


def _heads_view(fn: str, name: str, t: torch.Tensor, layout: str, heads: int | None) -> torch.Tensor:
    if layout == "bhnd":
        if t.dim() != 4:
            _checks.fail(fn, name, f"layout 'bhnd' expects (B, heads, N, d), got shape {tuple(t.shape)}")
        return t
    if t.dim() != 3:
        _checks.fail(fn, name, f"layout 'bnd' expects (B, N, heads*d), got shape {tuple(t.shape)}")
    if t.shape[2] % heads != 0:
        _checks.fail(fn, name, f"last dim {t.shape[2]} is not divisible by heads={heads}")
    return t.unflatten(2, (heads, t.shape[2] // heads)).transpose(1, 2)


def _modes(fn: str, modes, batch: int) -> list[Mode]:
    """One public mode per item as a ``Mode`` (strings, 0/1/2, or a 1-D CPU integer tensor)."""
    if modes is None:
        return [Mode.NONE] * batch
    if isinstance(modes, torch.Tensor):
        if modes.dim() != 1 or modes.dtype.is_floating_point or modes.dtype.is_complex or modes.dtype == torch.bool:
            _checks.fail(fn, "modes", "a tensor of modes must be 1-D with integer codes 0/1/2", TypeError)
        if modes.device.type != "cpu":
            _checks.fail(fn, "modes", f"a tensor of modes must be on the CPU (the modes select the kernels' "
                                      f"work on the host), got one on {modes.device}")
        modes = modes.tolist()
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
        _checks.fail(fn, "modes", f"expected a sequence with one mode per batch item, got {type(modes).__name__}",
                     TypeError)
    if len(modes) != batch:
        _checks.fail(fn, "modes", f"has {len(modes)} entries but the batch has {batch} items")
    codes = []
    for i, mode in enumerate(modes):
        if isinstance(mode, str) and mode in PUBLIC_MODES:
            codes.append(Mode(PUBLIC_MODES.index(mode)))
        elif isinstance(mode, numbers.Integral) and not isinstance(mode, bool) and 0 <= int(mode) < len(PUBLIC_MODES):
            codes.append(Mode(int(mode)))
        else:
            _checks.fail(fn, f"modes[{i}]", f"unknown mode {mode!r} (choose from {PUBLIC_MODES} or 0/1/2)")
    return codes


def _per_item_sigma(fn: str, sigma, codes: list[Mode]) -> list[float | None]:
    """Each blur item's σ (None for the other items)."""
    per_item = isinstance(sigma, Sequence) and not isinstance(sigma, (str, bytes))
    if per_item:
        values = list(sigma)
        if len(values) != len(codes):
            _checks.fail(fn, "sigma", f"has {len(values)} entries but the batch has {len(codes)} items")
    else:
        values = [sigma] * len(codes)
    out: list[float | None] = [None] * len(codes)
    for i, code in enumerate(codes):
        if code != Mode.BLUR:
            continue
        arg = f"sigma[{i}]" if per_item else "sigma"
        if values[i] is None:
            _checks.fail(fn, arg, f"required for blur item {i} (σ > 0; > 9999 means infinite)")
        out[i] = _checks.sigma(fn, arg, values[i])
    return out


def _token_grid(fn: str, grid, codes: list[Mode], nq: int, text_tokens) -> tuple[tuple[int, int], int]:
    """``((H, W), text_tokens)`` of the query sequence. Without a grid (no blur item) the image block
    is one row of ``Nq − text_tokens`` tokens: joint PAG needs only its length."""
    text_tokens = _checks.integer(fn, "text_tokens", text_tokens, minimum=0)
    if text_tokens > nq:
        _checks.fail(fn, "text_tokens", f"{text_tokens} exceeds the {nq} query tokens")
    if grid is None:
        if Mode.BLUR in codes:
            _checks.fail(fn, "grid", "required when an item blurs (the (H, W) of the image tokens)")
        return (1, nq - text_tokens), text_tokens
    gh, gw = _checks.grid(fn, grid)
    if gh * gw + text_tokens != nq:
        _checks.fail(fn, "q", f"has {nq} tokens but grid {(gh, gw)} has H*W = {gh * gw}"
                              + (f" + {text_tokens} text tokens" if text_tokens else ""))
    return (gh, gw), text_tokens


def lower_modes(codes: list[Mode], sigmas: list[float | None], grid: tuple[int, int]):
    """The op's per-item (mode, σ, kernel size): a blur's kernel size by SEG's rule on ``grid``; a
    1-tap blur is the identity on the queries, so plain attention (exactly); σ = ∞ (kernel size 0)
    is ``Mode.MEAN``. Non-blur items carry σ 0.0 and size 0."""
    modes, op_sigmas, sizes = [], [], []
    for code, sigma in zip(codes, sigmas):
        size = blur_kernel_size(sigma, grid) if code == Mode.BLUR else 0
        if code == Mode.BLUR and size == 1:
            code = Mode.NONE
        elif code == Mode.BLUR and size == 0:
            code = Mode.MEAN
        modes.append(int(code))
        op_sigmas.append(sigma if code == Mode.BLUR else 0.0)
        sizes.append(size if code == Mode.BLUR else 0)
    return modes, op_sigmas, sizes


# --------------------------------------------------------------------------- guided_attention


def guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, modes=None, sigma=None, grid=None,
                     layout: str = "bhnd", heads: int | None = None, text_tokens: int = 0,
                     text_position: str = "after", scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Scaled-dot-product attention with a perturbation per batch item (PAG identity, SEG blur).

    Args:
        q: ``(B, heads, Nq, d)`` (``layout="bhnd"``, as diffusers processors hold it) or
            ``(B, Nq, heads·d)`` (``"bnd"``, as ComfyUI attention patches receive it; needs
            ``heads``). float32/float16/bfloat16 (float64 on the torch backend), any strides.
        k, v: the same layout with Nk tokens; Nk may differ from Nq (cross-attention) only when
            every mode is ``"none"``. Same batch, heads and head dim as q; same device and dtype.
        modes: one per batch item: ``"none"``, ``"identity"``, ``"blur"`` (or 0/1/2; a 1-D CPU
            integer tensor is read on the host). None: all ``"none"``.
        sigma: σ of the blur items: a number or one value per item (ignored for other items);
            σ > 0, not NaN; σ > 9999 (inf included) means infinite: every image query := the mean.
            The blur uses SEG's kernel ``ceil(6σ)+1−ceil(6σ)%2`` capped by the grid
            (``_spec.blur_kernel_size``) with reflect padding, as SEG-SDXL.
        grid: ``(H, W)`` of the image tokens (row-major). Required when an item blurs; when
            given, ``Nq`` must equal ``H·W + text_tokens``. (Joint PAG needs only the image block's
            length, ``Nq − text_tokens``.)
        text_tokens: number of text tokens in joint attention (SD3/Flux/DiT): the sequence is the
            ``H·W`` image tokens followed (``text_position="after"``, SD3) or preceded
            (``"before"``, Flux) by the text block.
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: ``"triton_sdpa"``, ``"triton"``, ``"torch"`` or None/``"auto"`` (see
            :mod:`guidance_kernels.backends`).

    Returns:
        The attention output in q's layout and dtype: ``(B, heads, Nq, d)`` (laid out like q when
        q is dense) or ``(B, Nq, heads·d)`` contiguous. Identity items without text tokens are
        bit-exact copies of v.

    Non-finite data follow the definition ``softmax(scale·q kᵀ) v`` (row softmax as written) on
    every backend: a NaN or inf in query row i makes row i NaN; a NaN in k or v every row that
    weighs it; an inf logit NaN (+inf) or weight 0 (−inf); a blurred item's queries carry NaN/inf
    over the blur's footprint first. In fp16/bf16 the probabilities multiply v in the input dtype
    (as flash attention does), so an inf in v meets a probability that underflows there as NaN
    rather than inf. The ``"triton_sdpa"`` route's plain items are torch's SDPA, whose fp16/bf16 CPU
    kernel drops the rows an inf key logit makes NaN.
    """
    fn = "guided_attention"
    q4, k4, v4 = _views(fn, q, k, v, layout, heads)
    batch, _, nq, d = q4.shape
    codes = _modes(fn, modes, batch)
    if text_position not in TEXT_POSITIONS:
        _checks.fail(fn, "text_position", f"must be one of {TEXT_POSITIONS}, got {text_position!r}")
    if any(c != Mode.NONE for c in codes) and k4.shape[2] != nq:
        _checks.fail(fn, "k", f"has {k4.shape[2]} tokens but q has {nq}: identity and blur items need "
                              "self-attention (cross-attention only with mode 'none')")
    (gh, gw), text_tokens = _token_grid(fn, grid, codes, nq, text_tokens)
    sigmas = _per_item_sigma(fn, sigma, codes)
    scale = 1.0 / math.sqrt(d) if scale is None else float(_checks.finite_number(fn, "scale", scale))
    op_modes, op_sigmas, op_sizes = lower_modes(codes, sigmas, (gh, gw))
    kernel_items = any(m in (Mode.IDENTITY, Mode.MEAN) for m in op_modes)
    chosen = backends.select(fn, q, (("head_dim", int(d)), ("kernel_items", kernel_items)), backend=backend)
    args = GuidedAttentionArgs(q4, k4, v4, op_modes, op_sigmas, op_sizes, gh, gw, text_tokens,
                               text_position == "before", scale, layout)
    out = _library.call(fn, args, chosen)
    return out.transpose(1, 2).flatten(2) if layout == "bnd" else out

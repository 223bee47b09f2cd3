"""Every op of the ``guidance_kernels`` torch.library namespace: schema, fake, implementation.

Each op is defined once, here, with :func:`torch.library.custom_op`; its schema comes from the
type annotations. The public functions validate arguments, choose a backend (a constant under
``torch.compile``) and call exactly one op; the op's body hands the call to that backend's
implementation module, imported lazily so that importing the package never imports triton or
the CUDA extension (and never initialises CUDA):

    torch  -> guidance_kernels.torch_ops.<op>
    triton -> guidance_kernels.triton.<op>
    cuda   -> guidance_kernels.cuda.<op>

Fakes and backends allocate outputs with the same explicit rule (``_layout.output_like``), never
a bare ``empty_like`` of a possibly permuted input, so fake and real strides agree.

Public functions call ops through :func:`call`: while torch.compile/export traces, when autograd
records or for tensor subclasses (fake, functional, DTensor, …) it goes through the op; for plain
eager tensors it runs the op's body directly, because the Python custom-op boundary costs tens of
microseconds per call — more than a guidance combine of an SDXL latent takes on a GPU.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from ._layout import output_like

NAMESPACE = "guidance_kernels"
_PACKAGES = {"torch": "torch_ops", "triton": "triton", "cuda": "cuda"}


@lru_cache(maxsize=None)
def implementation(family: str, backend: str, name: str):
    """The function ``name`` of ``guidance_kernels.<backend package>.<family>``."""
    module = importlib.import_module(f"guidance_kernels.{_PACKAGES[backend]}.{family}")
    return getattr(module, name)


_ATOMS = (int, float, str, bool, type(None))


def _plain(value) -> bool:
    """A plain eager argument: no tensor subclass (fake, functional, …) and nothing requiring grad."""
    kind = type(value)
    if kind is Tensor:
        return not value.requires_grad
    if kind in _ATOMS:
        return True
    if kind is list or kind is tuple:
        return all(map(_plain, value))
    return not isinstance(value, Tensor)


def call(op, *args):
    """Run ``op(*args)``; in plain eager mode run its body directly (same code, no dispatch cost)."""
    body = getattr(op, "_init_fn", None)
    if body is None or torch.compiler.is_compiling() or not all(_plain(a) for a in args):
        return op(*args)
    return body(*args)


def _combine_out(preds: list[Tensor], num_branches: int) -> Tensor:
    first = preds[0]
    if len(preds) == 1 and num_branches > 1:
        first = first[: first.shape[0] // num_branches]
    return output_like(first)


# --------------------------------------------------------------------------- guidance_combine


@torch.library.custom_op(f"{NAMESPACE}::guidance_combine", mutates_args=())
def guidance_combine(preds: list[Tensor], num_branches: int, base: int, pos: list[int], neg: list[int],
                     scales: list[float], scale_tensors: list[Optional[Tensor]], rescale: float,
                     rescale_tensor: Optional[Tensor], rescale_ref: int, backend: str) -> Tensor:
    """out = D[base] + Σ_t g_t (D[pos_t] − D[neg_t]) (+ rescale). See guidance_kernels.guidance_combine."""
    fn = implementation("guidance_combine", backend, "guidance_combine")
    return fn(preds, num_branches, base, pos, neg, scales, scale_tensors, rescale, rescale_tensor, rescale_ref)


@guidance_combine.register_fake
def _(preds, num_branches, base, pos, neg, scales, scale_tensors, rescale, rescale_tensor, rescale_ref, backend):
    return _combine_out(preds, num_branches)


# --------------------------------------------------------------------------- apg_combine
# Two ops: inductor mishandles an Optional mutated tensor, so the momentum variant (which updates
# its buffer in place) is its own op with a required buffer.


@torch.library.custom_op(f"{NAMESPACE}::apg_combine", mutates_args=())
def apg_combine(preds: list[Tensor], num_branches: int, cond: int, uncond: int, scale: float,
                scale_tensor: Optional[Tensor], eta: float, norm_threshold: float, formulation: str, rescale: float,
                rescale_tensor: Optional[Tensor], backend: str) -> Tensor:
    """Adaptive projected guidance without momentum. See guidance_kernels.apg_combine."""
    fn = implementation("guidance_combine", backend, "apg_combine")
    return fn(preds, num_branches, cond, uncond, scale, scale_tensor, eta, norm_threshold, 0.0, None,
              formulation, rescale, rescale_tensor)


@apg_combine.register_fake
def _(preds, num_branches, cond, uncond, scale, scale_tensor, eta, norm_threshold, formulation, rescale,
      rescale_tensor, backend):
    return _combine_out(preds, num_branches)


@torch.library.custom_op(f"{NAMESPACE}::apg_combine_momentum", mutates_args=("momentum_buffer",))
def apg_combine_momentum(preds: list[Tensor], num_branches: int, cond: int, uncond: int, scale: float,
                         scale_tensor: Optional[Tensor], eta: float, norm_threshold: float, momentum: float,
                         momentum_buffer: Tensor, formulation: str, rescale: float,
                         rescale_tensor: Optional[Tensor], backend: str) -> Tensor:
    """Adaptive projected guidance with a momentum buffer updated in place."""
    fn = implementation("guidance_combine", backend, "apg_combine")
    return fn(preds, num_branches, cond, uncond, scale, scale_tensor, eta, norm_threshold, momentum,
              momentum_buffer, formulation, rescale, rescale_tensor)


@apg_combine_momentum.register_fake
def _(preds, num_branches, cond, uncond, scale, scale_tensor, eta, norm_threshold, momentum, momentum_buffer,
      formulation, rescale, rescale_tensor, backend):
    return _combine_out(preds, num_branches)


# --------------------------------------------------------------------------- cfg_zero_star_combine


@torch.library.custom_op(f"{NAMESPACE}::cfg_zero_star_combine", mutates_args=())
def cfg_zero_star_combine(preds: list[Tensor], num_branches: int, cond: int, uncond: int, scale: float,
                          scale_tensor: Optional[Tensor], original_formulation: bool, rescale: float,
                          rescale_tensor: Optional[Tensor], backend: str) -> Tensor:
    """CFG-Zero* (optimised scale). See guidance_kernels.cfg_zero_star_combine."""
    fn = implementation("guidance_combine", backend, "cfg_zero_star_combine")
    return fn(preds, num_branches, cond, uncond, scale, scale_tensor, original_formulation, rescale,
              rescale_tensor)


@cfg_zero_star_combine.register_fake
def _(preds, num_branches, cond, uncond, scale, scale_tensor, original_formulation, rescale, rescale_tensor,
      backend):
    return _combine_out(preds, num_branches)


# --------------------------------------------------------------------------- attention_key_mass


@torch.library.custom_op(f"{NAMESPACE}::attention_key_mass", mutates_args=())
def attention_key_mass(q: Tensor, k: Tensor, v: Tensor, heads: int, layout: str, scale: float,
                       items: Optional[list[int]], backend: str) -> tuple[Tensor, Tensor]:
    """Attention output and per-key attention mass. See guidance_kernels.attention_key_mass."""
    fn = implementation("attention_key_mass", backend, "attention_key_mass")
    return fn(q, k, v, heads, layout, scale, items)


@attention_key_mass.register_fake
def _(q, k, v, heads, layout, scale, items, backend):
    rows = q.shape[0] if items is None else len(items)
    keys = k.shape[1] if layout == "bnd" else k.shape[2]
    return q.new_empty(q.shape), q.new_empty((rows, keys), dtype=torch.float32)


# --------------------------------------------------------------------------- sag_degrade


@torch.library.custom_op(f"{NAMESPACE}::sag_degrade", mutates_args=())
def sag_degrade(x0: Tensor, mask_map: Tensor, thresholded: bool, threshold: float, kernel_size: int, sigma: float,
                renoise: str, alpha: float, alpha_tensor: Optional[Tensor], other: Optional[Tensor],
                return_degraded: bool, backend: str) -> tuple[Tensor, Tensor]:
    """SAG's masked blur + re-noise in one pass. See guidance_kernels.sag_degrade. The second
    output is the degraded (un-noised) latent when ``return_degraded``, else an empty tensor."""
    fn = implementation("sag_degrade", backend, "sag_degrade")
    return fn(x0, mask_map, thresholded, threshold, kernel_size, sigma, renoise, alpha, alpha_tensor, other,
              return_degraded)


@sag_degrade.register_fake
def _(x0, mask_map, thresholded, threshold, kernel_size, sigma, renoise, alpha, alpha_tensor, other,
      return_degraded, backend):
    return output_like(x0), output_like(x0) if return_degraded else x0.new_empty((0,))


# --------------------------------------------------------------------------- gaussian_blur_2d, guided_attention
# Grid, kernel size, σ and the per-item modes are static op arguments (a new configuration compiles
# once). kernel_size == 0 means σ = ∞ (the exact spatial mean), so no inf ever enters a graph.

MODE_NONE, MODE_IDENTITY, MODE_BLUR, MODE_MEAN = 0, 1, 2, 3


def attention_out(q: Tensor, layout: str) -> Tensor:
    """The ``(B, heads, Nq, d)`` output of guided_attention for ``(B, heads, Nq, d)`` ``q``: for
    ``layout="bnd"`` a transposed view of a contiguous ``(B, Nq, heads, d)`` buffer (so the caller's
    ``(B, Nq, heads·d)`` reshape is free), otherwise laid out like ``q`` (``_layout.output_like``)."""
    if layout == "bnd":
        b, heads, n, d = q.shape
        return q.new_empty((b, n, heads, d)).transpose(1, 2)
    return output_like(q)


@torch.library.custom_op(f"{NAMESPACE}::gaussian_blur_2d", mutates_args=())
def gaussian_blur_2d(x: Tensor, grid_h: int, grid_w: int, layout: str, kernel_size: int, sigma: float,
                     backend: str) -> Tensor:
    """Depthwise separable Gaussian blur (reflect padding) or, kernel_size 0, the spatial mean.
    See guidance_kernels.gaussian_blur_2d."""
    fn = implementation("gaussian_blur_2d", backend, "gaussian_blur_2d")
    return fn(x, grid_h, grid_w, layout, kernel_size, sigma)


@gaussian_blur_2d.register_fake
def _(x, grid_h, grid_w, layout, kernel_size, sigma, backend):
    return output_like(x)


@torch.library.custom_op(f"{NAMESPACE}::guided_attention", mutates_args=())
def guided_attention(q: Tensor, k: Tensor, v: Tensor, modes: list[int], sigmas: list[float], kernel_sizes: list[int],
                     grid_h: int, grid_w: int, text_tokens: int, text_before: bool, scale: float, layout: str,
                     backend: str) -> Tensor:
    """Attention with a per-item perturbation (MODE_NONE/IDENTITY/BLUR/MEAN) on (B, heads, N, d)
    views. See guidance_kernels.guided_attention."""
    fn = implementation("guided_attention", backend, "guided_attention")
    return fn(q, k, v, modes, sigmas, kernel_sizes, grid_h, grid_w, text_tokens, text_before, scale, layout)


@guided_attention.register_fake
def _(q, k, v, modes, sigmas, kernel_sizes, grid_h, grid_w, text_tokens, text_before, scale, layout, backend):
    return attention_out(q, layout)


# Gradients: these ops run inside models (a diffusers UNet under torch.compile traces them with its
# parameters requiring grad), so they have an autograd formula. It recomputes the forward with the
# torch backend's differentiable formulation (functional torch ops, same algorithmic short-cuts)
# and takes its vector-Jacobian product: exact gradients, at the speed of plain PyTorch.


def _vjp(name: str, tensors: tuple, static: tuple, grad: Tensor) -> tuple:
    fn = implementation(name, "torch", "differentiable")
    _, pullback = torch.func.vjp(lambda *t: fn(*t, *static), *tensors)
    return pullback(grad)


def _blur_setup(ctx, inputs, output):
    x, *static = inputs
    ctx.static = tuple(static[:-1])  # drop the backend
    ctx.save_for_backward(x)


def _blur_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    (gx,) = _vjp("gaussian_blur_2d", (x,), ctx.static, grad)
    return (gx,) + (None,) * 6


def _attention_setup(ctx, inputs, output):
    q, k, v, *static = inputs
    ctx.static = tuple(static[:-2])  # drop layout and backend
    ctx.save_for_backward(q, k, v)


def _attention_backward(ctx, grad):
    return _vjp("guided_attention", ctx.saved_tensors, ctx.static, grad) + (None,) * 10


gaussian_blur_2d.register_autograd(_blur_backward, setup_context=_blur_setup)
guided_attention.register_autograd(_attention_backward, setup_context=_attention_setup)

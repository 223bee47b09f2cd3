"""Every op of the ``guidance_kernels`` torch.library namespace: argument record, schema, fake, body.

Each op's arguments are declared ONCE, as a typed record (a ``NamedTuple``) below. The record's
fields, in order, are the op's schema (plus a trailing ``backend: str``), the public function
builds one, every backend implementation receives one, and the fakes and autograd formulas read
one — nobody restates the argument list. ``define`` turns a record into a
:func:`torch.library.custom_op` whose body hands the record to the chosen backend's function,
imported lazily so that importing the package never imports triton or the CUDA extension:

    torch        -> guidance_kernels.torch_ops.<stem>.<op>
    triton       -> guidance_kernels.triton.<stem>.<op>
    triton_sdpa  -> guidance_kernels.triton.<stem>.<op>_sdpa
    cuda         -> guidance_kernels.cuda.<stem>.<op>

Fakes and backends allocate outputs with the same explicit rule (``_layout.output_like``), never
a bare ``empty_like`` of a possibly permuted input, so fake and real strides agree.

Public functions call ops through :func:`call`: while torch.compile/export traces, when autograd
records or for tensor subclasses (fake, functional, DTensor, …) it goes through the registered
op; for plain eager tensors it runs the op's body (kept in :data:`BODIES`) directly, because the
Python custom-op boundary costs tens of microseconds per call — more than a guidance combine of
an SDXL latent takes on a GPU.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import _spec
from ._layout import output_like

NAMESPACE = "guidance_kernels"
BACKEND_MODULES = {  # backend -> (package, function-name suffix)
    "torch": ("torch_ops", ""),
    "triton": ("triton", ""),
    "triton_sdpa": ("triton", "_sdpa"),
    "cuda": ("cuda", ""),
}

BODIES: dict[str, Callable] = {}  # op name -> body(*args, backend): the registered op's implementation
OPS: dict[str, object] = {}  # op name -> the torch.library custom op
RECORDS: dict[str, type] = {}  # op name -> argument record
STEMS: dict[str, str] = {}  # op name -> module stem of its backends
TENSOR_FIELDS: dict[str, tuple[int, ...]] = {}  # op name -> positions of the fields that hold tensors


@lru_cache(maxsize=None)
def implementation(op: str, backend: str) -> Callable:
    """The function serving ``op`` in ``backend``: ``guidance_kernels.<package>.<stem>.<op><suffix>``."""
    package, suffix = BACKEND_MODULES[backend]
    module = importlib.import_module(f"guidance_kernels.{package}.{STEMS[op]}")
    return getattr(module, op + suffix)


def define(name: str, record: type, fake: Callable, *, stem: str | None = None, returns=Tensor,
           mutates: tuple[str, ...] = ()) -> None:
    """Register op ``guidance_kernels::<name>`` with the fields of ``record`` (+ ``backend``) as schema."""
    hints = typing.get_type_hints(record)  # resolved: this module's annotations are strings
    params = [inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[field])
              for field in record._fields]
    params.append(inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str))

    def prototype(*args):
        raise AssertionError("schema prototype")

    prototype.__signature__ = inspect.Signature(params, return_annotation=returns)
    schema = torch.library.infer_schema(prototype, mutates_args=mutates)

    def body(*args):
        return implementation(name, args[-1])(record(*args[:-1]))

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", body, mutates_args=mutates, schema=schema)
    op.register_fake(lambda *args: fake(record(*args[:-1])))
    BODIES[name], OPS[name], RECORDS[name], STEMS[name] = body, op, record, stem or name
    TENSOR_FIELDS[name] = tuple(i for i, field in enumerate(record._fields) if "Tensor" in str(hints[field]))


def _plain(value) -> bool:
    """A plain eager tensor field: plain tensors (no subclass: fake, functional, …) not requiring
    grad, or None, or a list of those."""
    if type(value) is Tensor:
        return not value.requires_grad
    if value is None:
        return True
    if type(value) is list:
        return all(map(_plain, value))
    return False


def call(name: str, args: tuple, backend: str):
    """Run op ``name`` on its record ``args``; in plain eager mode run its body directly (same code,
    no dispatch cost). Only the tensor fields decide (the others are Python values)."""
    if torch.compiler.is_compiling() or not all(_plain(args[i]) for i in TENSOR_FIELDS[name]):
        return OPS[name](*args, backend)
    return BODIES[name](*args, backend)


def call_memoised(name: str, preds: list, rest: tuple, backend: str):
    """:func:`call` for a record ``(preds, *rest)`` whose tensor fields in ``rest`` are all None (a
    plan memoised by ``_plans``: number scales only), in eager mode: only ``preds`` decide."""
    for t in preds:
        if type(t) is not Tensor or t.requires_grad:
            return OPS[name](preds, *rest, backend)
    return BODIES[name](preds, *rest, backend)


def differentiable(name: str, tensors: tuple[str, ...]) -> None:
    """Give op ``name`` an autograd formula: the vector-Jacobian product of the torch backend's
    functional formulation (``torch_ops.<stem>.differentiable``, same algorithmic short-cuts) with
    respect to the record fields ``tensors``. These ops run inside models (a diffusers UNet under
    torch.compile traces them with its parameters requiring grad): exact gradients at the speed
    of plain PyTorch."""
    record = RECORDS[name]
    fields = record._fields
    positions = [fields.index(t) for t in tensors]

    def setup_context(ctx, inputs, output):
        # the static fields only: tensors travel through save_for_backward (as torch.compile requires)
        ctx.args = record(*inputs[:-1])._replace(**dict.fromkeys(tensors))
        ctx.save_for_backward(*(inputs[i] for i in positions))

    def backward(ctx, grad):
        fn = importlib.import_module(f"guidance_kernels.torch_ops.{STEMS[name]}").differentiable
        args = ctx.args

        def forward(*values):
            return fn(args._replace(**dict(zip(tensors, values))))

        _, pullback = torch.func.vjp(forward, *ctx.saved_tensors)
        grads = dict(zip(positions, pullback(grad)))
        return tuple(grads.get(i) for i in range(len(fields))) + (None,)  # no gradient for backend

    OPS[name].register_autograd(backward, setup_context=setup_context)


# --------------------------------------------------------------------------- the combine family
# Ops with one stem: their backends share every file (guidance_combine.*).


def _branch_out(preds: list[Tensor], num_branches: int) -> Tensor:
    first = preds[0]
    if len(preds) == 1 and num_branches > 1:
        first = first[: first.shape[0] // num_branches]
    return output_like(first)


class GuidanceCombineArgs(NamedTuple):
    """``out = D[base] + Σ_t g_t (D[pos_t] − D[neg_t])`` (+ rescale). See guidance_kernels.guidance_combine."""

    preds: list[Tensor]  # [stacked (K·B, …)] or K × (B, …)
    num_branches: int
    base: int
    pos: list[int]
    neg: list[int]
    scales: list[float]  # per term: the number, or 0.0 when scale_tensors[t] holds it
    scale_tensors: list[Optional[Tensor]]  # per term: fp32 (1,) or (B,), or None
    rescale: float
    rescale_tensor: Optional[Tensor]
    rescale_ref: int

    @property
    def rescaling(self) -> bool:
        return _spec.rescale_on(self.rescale, self.rescale_tensor)


class ApgCombineArgs(NamedTuple):
    """Adaptive projected guidance without momentum. See guidance_kernels.apg_combine."""

    preds: list[Tensor]
    num_branches: int
    cond: int
    uncond: int
    scale: float
    scale_tensor: Optional[Tensor]
    eta: float
    norm_threshold: float
    formulation: str
    rescale: float
    rescale_tensor: Optional[Tensor]

    momentum = property(lambda self: 0.0)
    momentum_buffer = property(lambda self: None)
    rescaling = property(lambda self: _spec.rescale_on(self.rescale, self.rescale_tensor))


class ApgCombineMomentumArgs(NamedTuple):
    """APG with a momentum buffer updated in place. A separate op: inductor mishandles an Optional
    mutated tensor, so the buffer is a required argument here."""

    preds: list[Tensor]
    num_branches: int
    cond: int
    uncond: int
    scale: float
    scale_tensor: Optional[Tensor]
    eta: float
    norm_threshold: float
    momentum: float
    momentum_buffer: Tensor
    formulation: str
    rescale: float
    rescale_tensor: Optional[Tensor]

    rescaling = property(lambda self: _spec.rescale_on(self.rescale, self.rescale_tensor))


class CfgZeroStarCombineArgs(NamedTuple):
    """CFG-Zero* (optimised scale). See guidance_kernels.cfg_zero_star_combine."""

    preds: list[Tensor]
    num_branches: int
    cond: int
    uncond: int
    scale: float
    scale_tensor: Optional[Tensor]
    original_formulation: bool
    rescale: float
    rescale_tensor: Optional[Tensor]

    rescaling = property(lambda self: _spec.rescale_on(self.rescale, self.rescale_tensor))


class TcfgCombineArgs(NamedTuple):
    """Tangential damping CFG (closed-form 2×2 Gram). See guidance_kernels.tcfg_combine."""

    preds: list[Tensor]
    num_branches: int
    cond: int
    uncond: int
    scale: float
    scale_tensor: Optional[Tensor]
    original_formulation: bool
    rescale: float
    rescale_tensor: Optional[Tensor]

    rescaling = property(lambda self: _spec.rescale_on(self.rescale, self.rescale_tensor))


class MagCombineArgs(NamedTuple):
    """Magnitude-aware guidance (MAMBO-G). See guidance_kernels.mag_combine."""

    preds: list[Tensor]
    num_branches: int
    cond: int
    uncond: int
    scale: float
    scale_tensor: Optional[Tensor]
    alpha: float
    original_formulation: bool
    rescale: float
    rescale_tensor: Optional[Tensor]

    rescaling = property(lambda self: _spec.rescale_on(self.rescale, self.rescale_tensor))


class CfgNormCombineArgs(NamedTuple):
    """The combine followed by ComfyUI's CFGNorm (per-position channel norms). See
    guidance_kernels.guidance_combine (``cfg_norm=``)."""

    preds: list[Tensor]
    num_branches: int
    base: int
    pos: list[int]
    neg: list[int]
    scales: list[float]
    scale_tensors: list[Optional[Tensor]]
    strength: float
    strength_tensor: Optional[Tensor]
    ref: int  # the branch whose channel norm bounds the output's (cond)


class MahiroCombineArgs(NamedTuple):
    """The combine followed by ComfyUI's Mahiro (cond, uncond and scale of the first term). See
    guidance_kernels.guidance_combine (``mahiro=True``)."""

    preds: list[Tensor]
    num_branches: int
    base: int
    pos: list[int]
    neg: list[int]
    scales: list[float]
    scale_tensors: list[Optional[Tensor]]


def _combine_fake(a) -> Tensor:
    return _branch_out(a.preds, a.num_branches)


define("guidance_combine", GuidanceCombineArgs, _combine_fake)
define("apg_combine", ApgCombineArgs, _combine_fake, stem="guidance_combine")
define("apg_combine_momentum", ApgCombineMomentumArgs, _combine_fake, stem="guidance_combine",
       mutates=("momentum_buffer",))
define("cfg_zero_star_combine", CfgZeroStarCombineArgs, _combine_fake, stem="guidance_combine")
define("tcfg_combine", TcfgCombineArgs, _combine_fake, stem="guidance_combine")
define("mag_combine", MagCombineArgs, _combine_fake, stem="guidance_combine")
define("guidance_combine_cfg_norm", CfgNormCombineArgs, _combine_fake, stem="guidance_combine")
define("guidance_combine_mahiro", MahiroCombineArgs, _combine_fake, stem="guidance_combine")


# --------------------------------------------------------------------------- fdg_combine


class FdgCombineArgs(NamedTuple):
    """Frequency-decoupled guidance on kornia's Laplacian pyramid. See guidance_kernels.fdg_combine."""

    preds: list[Tensor]  # (…, H, W) branches: the pyramid is over the last two dims
    num_branches: int
    cond: int
    uncond: int
    scales: list[float]  # per level, highest frequency first (0.0 where scale_tensors holds it)
    scale_tensors: list[Optional[Tensor]]
    parallel_weights: list[float]  # per level; 1.0 = no projection
    rescale: list[float]  # "data": one value; "freq": one per level
    rescale_tensors: list[Optional[Tensor]]
    rescale_space: str  # "data" or "freq"
    original_formulation: bool

    @property
    def levels(self) -> int:
        return len(self.scales)

    @property
    def level_rescale(self) -> list[tuple[float, Optional[Tensor]]]:
        """Per level, the frequency-space φ as (number, tensor) — (0.0, None) when off."""
        if self.rescale_space != "freq":
            return [(0.0, None)] * self.levels
        pairs = list(zip(self.rescale, self.rescale_tensors))
        return pairs if len(pairs) == self.levels else pairs * self.levels

    @property
    def data_rescaling(self) -> bool:
        return self.rescale_space == "data" and _spec.rescale_on(self.rescale[0], self.rescale_tensors[0])

    @property
    def needs_stats(self) -> list[bool]:
        """Per level: its coefficients read statistics of (Lc, Ld) — a projection on cond or a
        frequency-space rescale. When no level does, every a_i is 1 and the cond pyramid is skipped."""
        return [w != 1.0 or _spec.rescale_on(*phi) for w, phi in zip(self.parallel_weights, self.level_rescale)]


define("fdg_combine", FdgCombineArgs, _combine_fake)


# --------------------------------------------------------------------------- attention_key_mass


class AttentionKeyMassArgs(NamedTuple):
    """Attention output and per-key attention mass. See guidance_kernels.attention_key_mass."""

    q: Tensor  # (B, heads, N, d) ["bhnd"] or (B, N, heads·d) ["bnd"]
    k: Tensor
    v: Tensor
    heads: int
    layout: str
    scale: float
    items: Optional[list[int]]  # batch items whose mass is wanted (None: all)


def _key_mass_fake(a: AttentionKeyMassArgs) -> tuple[Tensor, Tensor]:
    rows = a.q.shape[0] if a.items is None else len(a.items)
    keys = a.k.shape[1] if a.layout == "bnd" else a.k.shape[2]
    return a.q.new_empty(a.q.shape), a.q.new_empty((rows, keys), dtype=torch.float32)


define("attention_key_mass", AttentionKeyMassArgs, _key_mass_fake, returns=tuple[Tensor, Tensor])


# --------------------------------------------------------------------------- sag_degrade


class SagDegradeArgs(NamedTuple):
    """SAG's masked blur + re-noise in one pass. See guidance_kernels.sag_degrade. The op's second
    output is the degraded (un-noised) latent when ``return_degraded``, else an empty tensor."""

    x0: Tensor  # (B, C, H, W)
    mask_map: Tensor  # (B|1, h, w): key mass (thresholded) or blend weights
    thresholded: bool
    threshold: float
    kernel_size: int
    sigma: float
    renoise: str  # a key of _spec.RENOISE
    alpha: float
    alpha_tensor: Optional[Tensor]
    other: Optional[Tensor]  # eps (ddpm) or x_t (kdiff)
    return_degraded: bool


def _degrade_fake(a: SagDegradeArgs) -> tuple[Tensor, Tensor]:
    return output_like(a.x0), output_like(a.x0) if a.return_degraded else a.x0.new_empty((0,))


define("sag_degrade", SagDegradeArgs, _degrade_fake, returns=tuple[Tensor, Tensor])


# --------------------------------------------------------------------------- gaussian_blur_2d, guided_attention
# Grid, kernel size, σ and the per-item modes are static op arguments (a new configuration compiles
# once). kernel_size == 0 means σ = ∞ (the exact spatial mean), so no inf ever enters a graph.


class GaussianBlur2dArgs(NamedTuple):
    """Depthwise separable Gaussian blur (reflect padding) or, kernel_size 0, the spatial mean.
    See guidance_kernels.gaussian_blur_2d."""

    x: Tensor  # "nchw" (B, C, H, W), "bnc" (B, H·W, C) or "bhnd" (B, heads, H·W, d)
    grid_h: int
    grid_w: int
    layout: str
    kernel_size: int  # odd, or 0 for the mean
    sigma: float


class GuidedAttentionArgs(NamedTuple):
    """Attention with a perturbation per item (``_spec.Mode``) on (B, heads, N, d) views.
    See guidance_kernels.guided_attention."""

    q: Tensor
    k: Tensor
    v: Tensor
    modes: list[int]  # _spec.Mode per item, lowered (BLUR has a kernel size > 1, MEAN is σ = ∞)
    sigmas: list[float]  # BLUR items' σ (0.0 for the others)
    kernel_sizes: list[int]  # BLUR items' kernel size (0 for the others)
    grid_h: int
    grid_w: int
    text_tokens: int
    text_before: bool
    scale: float
    layout: str  # the caller's layout: "bnd" outputs are views of (B, Nq, heads, d) buffers

    @property
    def image_rows(self) -> slice:
        n = self.q.shape[2]
        return slice(self.text_tokens, n) if self.text_before else slice(0, n - self.text_tokens)

    @property
    def text_rows(self) -> slice:
        n = self.q.shape[2]
        return slice(0, self.text_tokens) if self.text_before else slice(n - self.text_tokens, n)


def attention_out(q: Tensor, layout: str) -> Tensor:
    """The ``(B, heads, Nq, d)`` output of guided_attention for ``(B, heads, Nq, d)`` ``q``: for
    ``layout="bnd"`` a transposed view of a contiguous ``(B, Nq, heads, d)`` buffer (so the caller's
    ``(B, Nq, heads·d)`` reshape is free), otherwise laid out like ``q`` (``_layout.output_like``)."""
    if layout == "bnd":
        b, heads, n, d = q.shape
        return q.new_empty((b, n, heads, d)).transpose(1, 2)
    return output_like(q)


define("gaussian_blur_2d", GaussianBlur2dArgs, lambda a: output_like(a.x))
define("guided_attention", GuidedAttentionArgs, lambda a: attention_out(a.q, a.layout))
differentiable("gaussian_blur_2d", ("x",))
differentiable("guided_attention", ("q", "k", "v"))

"""Helpers every cuda-backend module uses: the extension module and the launch geometry."""

from __future__ import annotations

from .. import _extension, _layout


def ext():
    """``guidance_kernels._C`` (backends.select never picks "cuda" without it; a direct call says why)."""
    module = _extension.load()
    if module is None:
        raise RuntimeError(f"guidance_kernels cuda backend: {_extension.unavailable_reason()}")
    return module


def geometry(plan: _layout.Plan) -> list[int]:
    """The (batch, inner) plan as the launchers' integer list."""
    return [plan.batch, plan.inner, *plan.sizes, *plan.strides, plan.batch_stride, plan.rank]

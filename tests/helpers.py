"""Shared test utilities.

Tolerances scale with the problem instead of being tuned by hand (flash-attention's rule): a
backend's max error against a float64 "truth" may be at most ``factor`` times the error of the
naive reference run in the input dtype, plus a small floor for the cases where the reference
happens to be exact. For fp32 inputs the floor is a few fp32 ulps of the output's magnitude.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def to64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    if isinstance(x, (list, tuple)):
        return type(x)(to64(v) for v in x)
    return x


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = to64(a), to64(b)
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    diff = (a - b).abs().masked_fill(both_nan | same_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_to_truth(out: torch.Tensor, ref_lowp: torch.Tensor, truth: torch.Tensor, *, factor: float = 2.0,
                          ulps: float = 8.0, what: str = "", magnitude: float | None = None) -> None:
    """|out − truth| ≤ factor·|ref_lowp − truth| + ulps·eps(dtype)·max|truth| (elementwise max).
    ``magnitude`` replaces max|truth| in the floor where the computation cancels larger
    intermediates (e.g. ``(a + b) − a``): their rounding, not the result's, sets the error."""
    assert out.shape == truth.shape, f"{what} shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{what} dtype {out.dtype} != {ref_lowp.dtype}"
    nan_out, nan_truth = torch.isnan(to64(out)), torch.isnan(to64(truth))
    assert torch.equal(nan_out, nan_truth), f"{what} NaN pattern differs from the float64 truth"
    scale = float(to64(truth).abs().nan_to_num(0.0, 0.0, 0.0).max()) if truth.numel() else 0.0
    scale = max(scale, magnitude or 0.0)
    ref_err = max_err(ref_lowp, truth)
    err = max_err(out, truth)
    bound = factor * ref_err + ulps * EPS[out.dtype] * max(scale, 1e-30)
    assert err <= bound, (f"{what} error {err:.3e} exceeds bound {bound:.3e} "
                          f"(reference in {out.dtype}: {ref_err:.3e}, |truth| max {scale:.3e})")


def make_strided(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout: contiguous, channels-last-like
    permuted storage, a slice of a wider buffer (offset + gaps), or an expanded-batch copy."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "permuted":  # innermost logical dim is not innermost in memory
        perm = list(range(x.dim()))
        if x.dim() >= 3:
            perm = [0] + list(range(2, x.dim())) + [1]
        y = x.permute(*perm).contiguous()
        inverse = [perm.index(i) for i in range(x.dim())]
        return y.permute(*inverse)
    if kind == "sliced":  # offset start and padding in the last dim
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 3, dtype=x.dtype, device=x.device)
        wide[..., 1:1 + x.shape[-1]] = x
        return wide[..., 1:1 + x.shape[-1]]
    if kind == "transposed":
        if x.dim() < 3:
            return x
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(kind)


LAYOUTS = ("contiguous", "permuted", "sliced", "transposed")


def needs(condition: bool, reason: str) -> None:
    """Skip a test whose toolchain is missing here (nvcc, torch CUDA headers, a GPU) — unless
    ``GK_REQUIRE_ALL_LANES=1`` (set by .ci/run), where a missing lane is a failure, not a skip."""
    import os

    import pytest

    if condition:
        return
    if os.environ.get("GK_REQUIRE_ALL_LANES", "0") not in ("", "0"):
        pytest.fail(f"lane required but unavailable: {reason}")
    pytest.skip(reason)

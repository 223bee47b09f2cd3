"""Argument checks shared by the public functions.

Every check runs before any kernel launch and raises ValueError/TypeError whose message
starts with ``"<function>: <argument>: "`` so a user sees exactly which input is wrong.
Checks that would need the *values* of a device tensor (finite scales on CUDA) are skipped:
they would force a host synchronisation and break CUDA-graph capture.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32_MAX = 3.4028234663852886e38  # kernels compute in float32: a larger scale would become inf


def fail(fn: str, arg: str, message: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{fn}: {arg}: {message}")


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def float_tensor(fn: str, arg: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(fn, arg, f"expected a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in FLOAT_DTYPES:
        fail(fn, arg, f"expected a floating-point tensor ({', '.join(str(d) for d in FLOAT_DTYPES)}), "
                      f"got {t.dtype}", TypeError)
    return t


def tensor_like(fn: str, arg: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """``t`` must be a tensor with the shape, device and dtype of ``like``."""
    if not isinstance(t, torch.Tensor):
        fail(fn, arg, f"expected a torch.Tensor, got {type(t).__name__}", TypeError)
    same_device_dtype(fn, arg, t, like, like_name)
    if t.shape != like.shape:
        fail(fn, arg, f"shape {tuple(t.shape)} differs from {like_name} {tuple(like.shape)}")
    return t


def integer(fn: str, arg: str, value, *, minimum: int | None = None) -> int:
    """A Python int (a traced SymInt is specialised: these are static configuration values)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        fail(fn, arg, f"expected an int, got {type(value).__name__}", TypeError)
    value = int(value)
    if minimum is not None and value < minimum:
        fail(fn, arg, f"must be >= {minimum}, got {value}")
    return value


def grid(fn: str, value, arg: str = "grid", *, names: str = "(H, W)") -> tuple[int, int]:
    """A 2-D grid of positive ints (``names`` says which: the image grid, SAG's map grid ``(h, w)``)."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2:
        fail(fn, arg, f"expected {names}, got {value!r}", TypeError)
    return integer(fn, f"{arg}[0]", value[0], minimum=1), integer(fn, f"{arg}[1]", value[1], minimum=1)


def sigma(fn: str, arg: str, value) -> float:
    """A blur σ: > 0, not NaN; inf (or anything above ``_spec.SEG_INF_SIGMA``) means the mean.
    Traced floats are specialised (``float()``): σ is a static configuration value."""
    if isinstance(value, torch.Tensor):
        fail(fn, arg, "expected a Python number (σ selects the kernel; it is not a per-step tensor)", TypeError)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        fail(fn, arg, f"expected a real number, got {type(value).__name__}", TypeError)
    value = float(value)
    if not value > 0:  # also catches NaN (a plain comparison: traceable on a traced float)
        fail(fn, arg, f"must be > 0 (and not NaN), got {value}")
    return value


def same_device_dtype(fn: str, arg: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        fail(fn, arg, f"is on {t.device} but {like_name} is on {like.device}")
    if t.dtype != like.dtype:
        fail(fn, arg, f"has dtype {t.dtype} but {like_name} has {like.dtype}", TypeError)


def branch_index(fn: str, arg: str, index, num_branches: int) -> int:
    if type(index) is int and 0 <= index < num_branches:  # the common case, without abc checks
        return index
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        fail(fn, arg, f"branch index must be an int, got {index!r}", TypeError)
    if not 0 <= index < num_branches:
        fail(fn, arg, f"branch index {index} out of range for {num_branches} branches")
    return int(index)


def finite_number(fn: str, arg: str, value, *, minimum: float | None = None,
                  minimum_inclusive: bool = True) -> float:
    if (type(value) is float or type(value) is int) and minimum is None and not is_compiling():
        if not math.isfinite(value):  # the common case (a plain number), without abc checks
            fail(fn, arg, f"must be finite, got {value}")
        return float(value)
    if is_compiling() and not isinstance(value, bool) and isinstance(value, (float, int, torch.SymFloat,
                                                                              torch.SymInt)):
        # torch.compile makes a changing Python float symbolic: testing its value would specialise
        # the graph on it (a recompile every step), so traced calls skip the finiteness check.
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(fn, arg, f"expected a real number, got {type(value).__name__}", TypeError)
    value = float(value)
    if not math.isfinite(value):
        fail(fn, arg, f"must be finite, got {value}")
    if minimum is not None and (value < minimum or (not minimum_inclusive and value == minimum)):
        fail(fn, arg, f"must be {'>=' if minimum_inclusive else '>'} {minimum}, got {value}")
    return value


def fp32_number(fn: str, arg: str, value, *, minimum: float | None = None) -> float:
    """A finite Python number that float32 can hold (the kernels' arithmetic): ``|value| <= 3.4e38``."""
    value = finite_number(fn, arg, value, minimum=minimum)
    if not is_compiling() and abs(value) > FP32_MAX:
        fail(fn, arg, f"{value:g} is beyond the float32 range (|x| <= {FP32_MAX:.4g}) the kernels compute in")
    return value


def scale(fn: str, arg: str, value, batch: int, device: torch.device, *,
          minimum: float | None = None) -> tuple[float, torch.Tensor | None]:
    """A guidance scale: a finite Python number within the float32 range, or a float tensor of
    shape (), (1,) or (batch,) on ``device``. Returns ``(number, None)`` or ``(0.0, fp32 tensor of
    shape (1,) or (batch,))`` (always the tensor form while torch.compile traces). ``minimum``
    bounds numbers and the values of CPU tensors (device tensors are never read: no host sync)."""
    if not isinstance(value, torch.Tensor):
        number = fp32_number(fn, arg, value, minimum=minimum)
        if is_compiling():
            # Custom ops specialise their float arguments (a recompile per value); a tensor built
            # from the traced number is a graph input instead, so a per-step scale compiles once.
            return 0.0, torch.ones((1,), dtype=torch.float32, device=device) * number
        return number, None
    if not value.is_floating_point():
        fail(fn, arg, f"scale tensor must be floating point, got {value.dtype}", TypeError)
    if value.device != device:
        fail(fn, arg, f"scale tensor is on {value.device} but the predictions are on {device}")
    if value.numel() not in (1, batch) or value.dim() > 1:
        fail(fn, arg, f"scale tensor must have shape (), (1,) or ({batch},) (one per sample), "
                      f"got {tuple(value.shape)}")
    # Contiguous: kernels read a per-sample scale at b * stride with stride 1 (or 0 for one value).
    as_fp32 = value.reshape(-1).to(torch.float32).contiguous()
    if value.device.type == "cpu" and not is_compiling():
        if not bool(torch.isfinite(as_fp32).all()):
            fail(fn, arg, "scale tensor contains NaN or inf (in float32)")
        if minimum is not None and bool((as_fp32 < minimum).any()):
            fail(fn, arg, f"scale tensor values must be >= {minimum:g}, got {as_fp32.min().item():g}")
    return 0.0, as_fp32


def branches(fn: str, arg: str, pred, num_branches: int | None, needed: int,
             max_branches: int) -> tuple[list[torch.Tensor], int]:
    """Normalise ``pred`` (one stacked (K·B, …) tensor or K tensors (B, …)) to the op's input list.

    Returns ``(preds, K)`` where ``preds`` is ``[pred]`` for the stacked layout (no copies) or the
    K tensors; ``needed`` is the number of branches the guidance refers to."""
    if isinstance(pred, torch.Tensor):
        float_tensor(fn, arg, pred)
        k = needed if num_branches is None else num_branches
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            fail(fn, "num_branches", f"must be a positive int, got {k!r}")
        if pred.dim() < 1:
            fail(fn, arg, "stacked predictions need a leading batch dimension")
        if pred.shape[0] % k != 0:
            fail(fn, arg, f"leading dimension {pred.shape[0]} is not divisible by num_branches={k} "
                          "(expected the branch-major layout (num_branches*B, ...))")
        preds = [pred]
    elif isinstance(pred, Sequence) and not isinstance(pred, (str, bytes)):
        preds = list(pred)
        k = len(preds)
        if k == 0:
            fail(fn, arg, "got an empty sequence of predictions")
        if num_branches is not None and num_branches != k:
            fail(fn, "num_branches", f"is {num_branches} but {k} tensors were given")
        for i, t in enumerate(preds):
            float_tensor(fn, f"{arg}[{i}]", t)
            if i:
                same_device_dtype(fn, f"{arg}[{i}]", t, preds[0], f"{arg}[0]")
                if t.shape != preds[0].shape:
                    fail(fn, f"{arg}[{i}]", f"shape {tuple(t.shape)} differs from {arg}[0] "
                                            f"{tuple(preds[0].shape)}")
        if preds[0].dim() < 1:
            fail(fn, arg, "each prediction needs a leading batch dimension")
    else:
        fail(fn, arg, f"expected a tensor or a sequence of tensors, got {type(pred).__name__}", TypeError)
    if k > max_branches:
        fail(fn, "num_branches", f"at most {max_branches} branches are supported, got {k}")
    if needed > k:
        fail(fn, "guidance", f"refers to branch {needed - 1} but only {k} branches were given")
    return preds, k


def bool_flag(fn: str, arg: str, value) -> bool:
    """A static switch: exactly a Python bool (a string such as "no" would read as True)."""
    if not isinstance(value, bool):
        fail(fn, arg, f"expected a bool, got {type(value).__name__}", TypeError)
    return value


def _address_range(t: torch.Tensor) -> tuple[int, int] | None:
    """[first, last] byte addresses a tensor's elements occupy (None: no elements)."""
    if t.numel() == 0:
        return None
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    first = t.data_ptr()
    return first, first + (extent + 1) * t.element_size() - 1


def no_overlap(fn: str, arg: str, t: torch.Tensor, others: Sequence[torch.Tensor], name: str) -> None:
    """``t`` (written in place) must not share memory with any of ``others`` (read by the same
    launch): an aliased buffer would be overwritten while it is read. Compares address ranges, so
    interleaved views that never touch the same element are refused too (conservative). Skipped
    while tracing (fake tensors have no addresses) and on the meta device."""
    if is_compiling() or t.device.type == "meta":
        return
    mine = _address_range(t)
    if mine is None:
        return
    for other in others:
        theirs = _address_range(other)
        if theirs is not None and other.device == t.device and mine[0] <= theirs[1] and theirs[0] <= mine[1]:
            fail(fn, arg, f"shares memory with {name}: it is updated in place while {name} is read "
                          "(create it with apg_momentum_buffer)")

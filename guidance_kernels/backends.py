"""Which implementation serves a call, and why not the others.

An op has some of these backends:

* ``"cuda"``        hand-written CUDA C++ from the compiled extension ``guidance_kernels._C``;
* ``"triton"``      Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``
  and only when forced — the interpreter is a test tool, never an automatic choice);
* ``"triton_sdpa"`` guided_attention's second Triton route: torch's SDPA for the plain and
  blurred items, the Triton kernel for the rest (same availability rules as ``"triton"``);
* ``"torch"``       a PyTorch path that runs on any device (fp32 arithmetic, algorithmic
  short-cuts kept), the fallback that always exists.

Automatic choice walks the op's priority list (``benchmarks/README.md`` says which orders a
measurement backs) and takes the first backend that supports the inputs. A backend is
forced, in decreasing precedence, by the ``backend=`` argument of a public function, the
:func:`use_backend` context manager, or the ``GUIDANCE_KERNELS_BACKEND`` environment variable
(read at import; ``"triton"`` for every op or ``"guidance_combine=cuda,guided_attention=triton"``
per op). A forced backend that cannot serve the inputs raises :class:`BackendError` saying why.

Selection is evaluated once per trace under ``torch.compile`` (it is a constant there), so it
never causes graph breaks; changing the forced backend triggers a recompile.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "triton_sdpa", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_VAR = "GUIDANCE_KERNELS_BACKEND"


class BackendError(ValueError):
    """A forced backend cannot serve the call (the message lists every reason)."""


@dataclass(frozen=True)
class Request:
    """What backend support depends on. Everything here is hashable and static under compile."""

    device_type: str
    device_index: int | None
    dtype: torch.dtype
    # Op-specific facts (head dim, layout, ...) as a sorted tuple of (name, value) pairs.
    facts: tuple = ()

    def fact(self, name: str, default=None):
        for key, value in self.facts:
            if key == name:
                return value
        return default


SupportFn = Callable[[Request], "list[str]"]


@dataclass
class OpBackends:
    """An op's priority list and, per backend, a function listing why a request is unsupported."""

    priority: tuple[str, ...]
    checks: dict[str, SupportFn] = field(default_factory=dict)


_OPS: dict[str, OpBackends] = {}


def register_op(op: str, priority: tuple[str, ...], **checks: SupportFn) -> None:
    """Declare an op's backends. ``checks[name](request)`` returns op-specific reasons (may be empty)."""
    unknown = set(priority) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)} for op {op}")
    _OPS[op] = OpBackends(priority=priority, checks=dict(checks))


def registered_ops() -> list[str]:
    return sorted(_OPS)


def op_backends(op: str) -> tuple[str, ...]:
    return _OPS[op].priority


# --------------------------------------------------------------------------- availability


@lru_cache(maxsize=None)
def triton_unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _common_reasons(backend: str, req: Request, forced: bool) -> list[str]:
    reasons = []
    if backend == "torch":
        return reasons
    if req.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {req.dtype} (kernels take float32, float16, bfloat16)")
    if backend in ("triton", "triton_sdpa"):
        why = triton_unavailable_reason()
        if why:
            reasons.append(why)
        if req.device_type == "cpu":
            if not triton_interpreter():
                reasons.append("CPU tensors need TRITON_INTERPRET=1")
            elif not forced:
                reasons.append("the Triton interpreter is only used when forced")
        elif req.device_type != "cuda":
            reasons.append(f"device type {req.device_type!r}")
    elif backend == "cuda":
        why = _extension.unavailable_reason()
        if why:
            reasons.append(why)
        if req.device_type != "cuda":
            reasons.append(f"device type {req.device_type!r} (needs a CUDA device)")
        elif torch.version.hip is not None:
            reasons.append("ROCm build of torch")
        elif not why and _capability(req.device_index) < (8, 0):
            reasons.append(f"compute capability {_capability(req.device_index)} < 8.0")
    return reasons


def unsupported_reasons(op: str, backend: str, req: Request, forced: bool = False) -> list[str]:
    """Why ``backend`` cannot serve ``req`` for ``op`` (empty list: it can)."""
    entry = _OPS[op]
    if backend not in entry.priority:
        return [f"{op} has no {backend} implementation (it has: {', '.join(entry.priority)})"]
    reasons = _common_reasons(backend, req, forced)
    check = entry.checks.get(backend)
    if check is not None:
        reasons += check(req)
    return reasons


# --------------------------------------------------------------------------- forcing


def _parse_env(value: str) -> dict[str, str]:
    """'triton' -> {'*': 'triton'}; 'a=cuda,b=torch' -> {'a': 'cuda', 'b': 'torch'}."""
    forced: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        op, _, name = item.rpartition("=")
        name = name.strip()
        if name not in BACKENDS:
            raise BackendError(f"{ENV_VAR}={value!r}: unknown backend {name!r} (choose from {BACKENDS})")
        forced[op.strip() or "*"] = name
    return forced


_ENV_FORCED = _parse_env(os.environ.get(ENV_VAR, ""))
# A tuple of frozen frames, replaced (never mutated) by use_backend: dynamo guards on its value,
# so entering or leaving a use_backend block recompiles instead of reusing a stale choice.
# It is process-wide (not per thread).
_FORCED_STACK: tuple[tuple[tuple[str, str], ...], ...] = ()


@contextlib.contextmanager
def use_backend(backend: str | None = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: ``use_backend("triton")`` for every op, or
    ``use_backend(guidance_combine="cuda")`` per op. ``None`` restores automatic choice."""
    global _FORCED_STACK
    _check_op_names("use_backend", per_op)
    chosen = dict(per_op)
    chosen["*"] = backend if backend is not None else "auto"
    for name in chosen.values():
        if name != "auto" and name not in BACKENDS:
            raise BackendError(f"use_backend: unknown backend {name!r} (choose from {BACKENDS})")
    saved = _FORCED_STACK
    _FORCED_STACK = saved + (tuple(sorted(chosen.items())),)
    try:
        yield
    finally:
        _FORCED_STACK = saved


def _check_op_names(where: str, names) -> None:
    """A forced op name must name an op: a typo would otherwise force nothing, silently."""
    unknown = sorted(set(names) - set(_OPS) - {"*"})
    if unknown:
        raise BackendError(f"{where}: unknown op {unknown[0]!r} (ops: {', '.join(registered_ops())})")


def check_environment() -> None:
    """Reject unknown op names in ``GUIDANCE_KERNELS_BACKEND``; called once the package has
    registered its ops (at the end of ``import guidance_kernels``)."""
    _check_op_names(f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r}", _ENV_FORCED)


def forcing_state() -> tuple:
    """The ``use_backend`` frames in effect (hashable): part of every memo of eager choices."""
    return _FORCED_STACK


def forced_backend(op: str, argument: str | None = None) -> str | None:
    """The backend forced for ``op`` by argument, context manager or env var (None: automatic)."""
    if argument is not None and argument != "auto":
        if argument not in BACKENDS:
            raise BackendError(f"{op}: backend={argument!r} is not one of {BACKENDS} or 'auto'")
        return argument
    for frame in reversed(_FORCED_STACK):
        chosen = dict(frame)
        name = chosen.get(op, chosen.get("*"))
        if name is not None:
            return None if name == "auto" else name
    return _ENV_FORCED.get(op, _ENV_FORCED.get("*"))


# --------------------------------------------------------------------------- selection


_SELECTED: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str, device_index: int | None, dtype: torch.dtype, facts: tuple,
            forced: str | None) -> str:
    # Primitive arguments only: dynamo evaluates this at trace time and bakes in the result. The
    # answer depends only on them (availability is fixed per process), so eager calls memoise it.
    key = (op, device_type, device_index, dtype, facts, forced)
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = _SELECTED[key] = _choose(op, Request(device_type, device_index, dtype, facts), forced)
    return chosen


def _choose(op: str, req: Request, forced: str | None) -> str:
    if forced is not None:
        reasons = unsupported_reasons(op, forced, req, forced=True)
        if reasons:
            raise BackendError(f"{op}: backend {forced!r} cannot serve this call: " + "; ".join(reasons))
        return forced
    for backend in _OPS[op].priority:
        if not unsupported_reasons(op, backend, req):
            return backend
    raise BackendError(f"{op}: no backend supports this call: " + explain(op, req))


# Eager calls: the choice per (op, device, dtype, facts, backend argument, forcing frames, env).
_EAGER: dict[tuple, str] = {}


def select(op: str, tensor: torch.Tensor, facts: tuple = (), backend: str | None = None) -> str:
    """Choose the backend for ``op`` on inputs like ``tensor`` (device, dtype) plus op ``facts``."""
    if not torch.compiler.is_compiling():
        key = (op, tensor.device, tensor.dtype, facts, backend, _FORCED_STACK)
        chosen = _EAGER.get(key)
        if chosen is None:
            chosen = _EAGER[key] = _select_traceable(op, tensor, facts, backend)
        return chosen
    return _select_traceable(op, tensor, facts, backend)


def _select_traceable(op: str, tensor: torch.Tensor, facts: tuple, backend: str | None) -> str:
    device = tensor.device
    return _select(op, device.type, device.index, tensor.dtype, tuple(sorted(facts)), forced_backend(op, backend))


def explain(op: str, req: Request) -> str:
    """One line per backend: 'ok' or the reasons it cannot serve ``req``."""
    parts = []
    for backend in _OPS[op].priority:
        reasons = unsupported_reasons(op, backend, req)
        parts.append(f"{backend}: {'ok' if not reasons else ', '.join(reasons)}")
    return " | ".join(parts)

"""Memo of validated eager calls: the host path of a call seen before.

A diffusion loop calls the same op with the same shapes, layout, dtype and static arguments at
every step. The first call validates everything and picks the backend; later calls with the same
*validation key* skip straight to the launch with the record the first call built. A key holds
everything the validation reads — the inputs' shapes, strides, dtype and device, the Python values
of the static arguments and the backend forcing in effect — so a hit cannot skip a check that
would fail. Calls whose validation reads tensor *values* (tensor scales on the CPU) or that run
under torch.compile have no key and take the full path.
"""

from __future__ import annotations

from torch import Tensor

from . import backends

# Bounded: a process that keeps changing shapes or scale values starts over instead of growing.
MAX_ENTRIES = 256


def layout(pred) -> tuple | None:
    """What the validation reads of ``pred`` (one tensor or a list/tuple of tensors), or None for
    anything else (subclasses, other sequences: the full path names the problem)."""
    if type(pred) is Tensor:
        return pred.shape, pred.stride(), pred.dtype, pred.device
    if type(pred) is list or type(pred) is tuple:
        parts = []
        for t in pred:
            if type(t) is not Tensor:
                return None
            parts.append((t.shape, t.stride(), t.dtype, t.device))
        return tuple(parts)
    return None


def number(value) -> bool:
    """A plain Python number (bool excluded: it is rejected where a number is expected, and
    ``True == 1`` would make it share a key with 1)."""
    return type(value) is float or type(value) is int


def static(value) -> bool:
    """A value a key may hold as is: None, a plain number, a str or a bool."""
    return value is None or type(value) in (float, int, str, bool)


class Memo:
    """``key -> plan`` for one op family; ``key(...)`` adds the backend forcing in effect."""

    def __init__(self) -> None:
        self._plans: dict = {}

    @staticmethod
    def key(*parts) -> tuple:
        return (backends.forcing_state(),) + parts

    def get(self, key):
        return self._plans.get(key)

    def put(self, key, plan) -> None:
        if len(self._plans) >= MAX_ENTRIES:
            self._plans.clear()
        self._plans[key] = plan

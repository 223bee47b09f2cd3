"""Lazy access to the compiled CUDA extension `guidance_kernels._C`.

Importing this module never imports the extension and never initialises CUDA; the first
call to :func:`load` does, and remembers the outcome (module or the reason it is missing).
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path
from types import ModuleType

_BUILD_INFO = Path(__file__).with_name("_build_info.json")


def build_info() -> dict:
    """What setup.py decided at build time (or a note that no build info exists)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {"cuda_extension": False, "skip_reason": "no build info (package not installed with setup.py?)",
                "archs": None}


@lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module("guidance_kernels._C")
    except ImportError as exc:
        info = build_info()
        if not info.get("cuda_extension"):
            return None, f"_C not built: {info.get('skip_reason')}"
        return None, f"_C failed to import: {exc}"
    return module, None


def load() -> ModuleType | None:
    """The extension module, or None when it is not available."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """None when `_C` imports; otherwise why it does not."""
    return _load()[1]


def compiled_archs() -> list[str]:
    """The archs `_C` carries code for (from the extension itself when it is loaded)."""
    module = load()
    if module is not None and hasattr(module, "compiled_archs"):
        return list(module.compiled_archs())
    archs = build_info().get("archs")
    return archs.replace(",", ";").split(";") if archs else []

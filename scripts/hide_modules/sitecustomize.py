"""Make modules unimportable, as on a machine that does not have them (the GPU image has no diffusers).

Active only when this folder is on ``PYTHONPATH`` and ``GK_HIDE_MODULES`` names top-level modules
(comma-separated), e.g. ``GK_HIDE_MODULES=diffusers``. Python imports ``sitecustomize`` at start-up,
so every process of a run, subprocesses included, sees the same environment. The path finder is
wrapped, so ``import diffusers`` raises ``ModuleNotFoundError: No module named 'diffusers'`` and
``importlib.util.find_spec("diffusers")`` returns None, exactly as when the package is absent
(only its distribution metadata stays visible to ``importlib.metadata``).
"""

import os
import sys

_HIDDEN = frozenset(filter(None, (name.strip() for name in os.environ.get("GK_HIDE_MODULES", "").split(","))))


class _HidingPathFinder:
    """``importlib.machinery.PathFinder`` minus the hidden top-level packages."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self._finder, attr)


if _HIDDEN:
    from importlib.machinery import PathFinder

    sys.meta_path[:] = [_HidingPathFinder(f) if f is PathFinder else f for f in sys.meta_path]
    for _name in [m for m in sys.modules if m.partition(".")[0] in _HIDDEN]:
        del sys.modules[_name]

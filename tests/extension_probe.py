"""Drives the ``cuda`` backend's Python glue into a real, freshly built ``guidance_kernels._C``
(tests/test_extension_build.py runs this in a subprocess with the built copy first on sys.path).

Without a GPU the kernels cannot run, but everything up to the launch can: the public API validates,
the glue plans and calls the pybind launcher with CPU tensors, and the launcher must answer with its
own "must be a CUDA tensor" check. A signature mismatch between glue and bindings would surface as
pybind's TypeError instead. Prints one JSON object.
"""

from __future__ import annotations

import json
import traceback

import torch

import guidance_kernels as gk
from guidance_kernels import _extension, backends


def _outcome(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type and message are the result
        return {"type": type(exc).__name__, "message": str(exc).splitlines()[0][:300],
                "trace": traceback.format_exc()[-1500:]}
    return {"type": None, "message": "returned without reaching a launcher check"}


def main() -> None:
    ext = _extension.load()
    report = {"reason": _extension.unavailable_reason(), "file": getattr(ext, "__file__", None),
              "archs": list(ext.compiled_archs()) if ext is not None else None, "calls": {}}
    if ext is not None:
        # The cuda backend for CPU tensors: only the launcher's device check stands in the way.
        backends.select = lambda op, tensor, facts=(), backend=None: "cuda"
        g = torch.Generator().manual_seed(0)
        x3 = torch.randn(6, 4, 16, 16, generator=g)
        u, c, p = x3.chunk(3)
        x2 = x3[:4]
        buf = torch.zeros(2, 4, 16, 16)
        x0 = torch.randn(2, 4, 32, 24, generator=g)
        mass = torch.rand(2, 8 * 6, generator=g) * 2
        calls = {
            "guidance_combine": lambda: gk.guidance_combine(x3, gk.cfg(7.5) + gk.pag(3.0)),
            "guidance_combine_rescale_tensors": lambda: gk.guidance_combine(
                [u, c, p], gk.cfg(torch.tensor([7.5, 5.0])) + gk.pag(3.0), rescale=torch.tensor(0.7)),
            "apg_combine": lambda: gk.apg_combine(x2, 5.0, norm_threshold=2.0, eta=0.0),
            "apg_combine_momentum": lambda: gk.apg_combine(x2, 5.0, momentum=-0.5, momentum_buffer=buf),
            "cfg_zero_star_combine": lambda: gk.cfg_zero_star_combine(x2, 5.0, rescale=0.3),
            "sag_degrade_ddpm": lambda: gk.sag_degrade(x0, mass, grid=(8, 6), eps=torch.randn_like(x0),
                                                       alpha_cumprod=torch.tensor([0.5, 0.7])),
            "sag_degrade_kdiff_mask": lambda: gk.sag_degrade(x0, torch.rand(2, 8, 6, generator=g) > 0.5, sigma=2.0,
                                                             x_t=torch.randn_like(x0), return_degraded=True),
        }
        report["calls"] = {name: _outcome(fn) for name, fn in calls.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

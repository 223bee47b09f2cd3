"""``python -m guidance_kernels bench``: every op at real diffusion shapes, side by side.

Each op family contributes a module ``cases_<family>.py`` with ``OPS`` (the op stems it times) and
``cases(device, quick) -> list[Case]`` (see :mod:`.harness`); :data:`FAMILIES` lists them in the
order they are run. Families are filtered before their cases are built (building a case allocates
its inputs and models).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch

from . import harness

FAMILIES = ["guidance_combine", "sag", "guided_attention", "diffusers", "dit", "comfyui", "parallel"]


def collect(device: torch.device, quick: bool, ops: list[str] | None = None) -> list[harness.Case]:
    cases = []
    for family in FAMILIES:
        module = importlib.import_module(f"guidance_kernels.bench.cases_{family}")
        if ops is not None and family not in ops and not set(module.OPS) & set(ops):
            continue
        for case in module.cases(device, quick):
            if ops is None or case.op in ops or family in ops:
                cases.append(case)
    return cases


def run(device: str | None = None, quick: bool | None = None, ops: list[str] | None = None,
        out_dir: str | Path = "bench-out", log=print) -> dict:
    """Run the benchmark; returns the paths written. ``quick`` defaults to True on CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quick is None:
        quick = dev.type == "cpu"
    torch.manual_seed(0)
    started = time.perf_counter()
    env = harness.environment(dev)
    log(f"guidance_kernels bench on {env['device_name']} ({dev.type}); torch {env['torch']}, "
        f"triton {env['triton']}, CUDA extension: {env['cuda_extension']}")
    ceilings = harness.measure_ceilings(dev, quick)
    log("ceilings: " + ", ".join(f"{k} = {v:.1f}" for k, v in ceilings.items()))
    cases = collect(dev, quick, ops)
    results = []
    for case in cases:
        log(f"  {case.op:<22} {case.name} {case.shape} {case.dtype}")
        sys.stdout.flush()
        results += harness.run_case(case, dev, ceilings, quick)
    table = harness.format_table(results, cases)
    log(table)
    paths = harness.write_outputs(Path(out_dir), env, ceilings, results, cases, table)
    log(f"\nwrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - started:.0f} s")
    return paths

"""``python -m guidance_kernels bench``: every op at real diffusion shapes, side by side.

Each op contributes a module ``cases_<op>.py`` (the combine family's three ops share
``cases_guidance_combine.py``; ``cases_diffusers.py``, ``cases_dit.py``, ``cases_guiders.py`` and ``cases_comfyui.py``
time whole denoising steps and sampler runs) with ``OPS`` (the op stems it times), optionally
``REQUIRES`` (modules it needs beyond the package's own dependencies: a family whose requirement is
missing, or whose cases raise ImportError, is skipped and the table says why) and
``cases(setup) -> list[Case]`` (see :mod:`.harness`). :data:`FAMILIES` lists them in the order
they are run. Families are filtered before their cases are built (building a case allocates its
inputs and models).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

from . import harness, report

FAMILIES = ["guidance_combine", "tcfg_combine", "mag_combine", "fdg_combine", "gaussian_blur_2d", "guided_attention",
            "attention_key_mass", "sag_degrade", "diffusers", "dit", "guiders", "comfyui", "parallel"]


def family_module(family: str) -> ModuleType:
    return importlib.import_module(f"guidance_kernels.bench.cases_{family}")


def known_names() -> list[str]:
    """Every name ``--ops`` accepts: the families and the op stems they time."""
    names = list(FAMILIES)
    for family in FAMILIES:
        names += [op for op in family_module(family).OPS if op not in names]
    return names


def missing_requirement(module: ModuleType) -> str | None:
    """Why a family cannot run here (a module in its ``REQUIRES`` is not installed), or None. Looked
    up without importing it (importing ComfyUI changes process-wide settings)."""
    for name in getattr(module, "REQUIRES", ()):
        if importlib.util.find_spec(name) is None:
            return f"needs {name}, which is not installed here"
    return None


def make_setup(device: str | None = None, quick: bool | None = None, shapes: str | None = None,
               compile: str | None = None) -> harness.Setup:
    """Defaults: real shapes and ``--full`` on a GPU, small shapes and quick on a CPU; ``torch.compile``
    everywhere with ``--full``, only where a goal uses it when quick, never for tiny shapes."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = dev.type == "cpu" if quick is None else quick
    shapes = shapes or ("real" if dev.type == "cuda" else "small")
    compile = compile or ("none" if shapes == "tiny" else "goals" if quick else "all")
    return harness.Setup(dev, shapes=shapes, compile=compile, quick=quick)


def collect(setup: harness.Setup, ops: list[str] | None, run: report.Run, log=print) -> None:
    """Build the selected families' cases into ``run`` (a missing requirement skips a family; an
    error while building one is recorded in ``run.failed`` and the others still run)."""
    for family in FAMILIES:
        module = family_module(family)
        if ops is not None and family not in ops and not set(module.OPS) & set(ops):
            continue
        why = missing_requirement(module)
        if why is not None:
            run.skipped[family] = why
            log(f"  {family}: skipped: {why}")
            continue
        try:
            cases = module.cases(setup)
        except ImportError as exc:  # something the requirement itself needs is missing
            run.skipped[family] = f"an import failed: {exc}"
            log(f"  {family}: skipped: {exc}")
            continue
        except Exception as exc:  # reported, not fatal: the other families still run
            run.failed[family] = f"{type(exc).__name__}: {exc}"
            log(f"  {family}: building its cases failed:\n{traceback.format_exc()}")
            continue
        for case in cases:
            if ops is None or case.op in ops or family in ops:
                case.family = family
                run.cases.append(case)


def run(device: str | None = None, quick: bool | None = None, ops: list[str] | None = None,
        out_dir: str | Path = "bench-out", *, shapes: str | None = None, compile: str | None = None,
        stem: str | None = None, log=print) -> report.Run:
    """Run the benchmark and write its JSON, table and PNG into ``out_dir``."""
    if ops is not None:
        unknown = sorted(set(ops) - set(known_names()))
        if unknown:
            raise ValueError(f"bench: ops: unknown {', '.join(map(repr, unknown))} "
                             f"(choose from {', '.join(known_names())})")
    setup = make_setup(device, quick, shapes, compile)
    torch.manual_seed(0)
    started = time.perf_counter()
    env = report.environment(setup)
    log(f"guidance_kernels bench on {env['device_name']} ({setup.device.type}, {setup.shapes} shapes, "
        f"torch.compile: {setup.compile}); torch {env['torch']}, triton {env['triton']}, "
        f"CUDA extension: {env['cuda_extension']}")
    result = report.Run(env=env, ceilings=harness.measure_ceilings(setup))
    log("ceilings: " + ", ".join(f"{k} = {v:.1f}" for k, v in result.ceilings.items()))
    collect(setup, ops, result, log)
    try:
        for case in result.cases:
            log(f"  {case.op:<22} {case.name} {case.shape} {case.dtype}")
            sys.stdout.flush()
            rows = harness.run_case(case, setup, result.ceilings)
            result.results += rows
            by_name = {r.provider: r for r in rows}
            result.verdicts += harness.evaluate(case, by_name, result.ceilings, setup)
            if case.report is not None:
                result.notes[(case.op, case.name)] = case.report(by_name)
            result.measured += 1
    except KeyboardInterrupt:  # a time limit (SIGINT): keep what was measured
        log(f"interrupted after {result.measured} of {len(result.cases)} cases: writing what was measured")
        result.cases = result.cases[: result.measured]
        result.interrupted = True
    table = report.format_table(result)
    log(table)
    paths = report.write(Path(out_dir), result, table, stem)
    log("")
    for line in report.summary_lines(result):
        log(line)
    log(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - started:.0f} s")
    return result

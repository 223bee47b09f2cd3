"""What a bench run writes: the text table, ``bench-<device>.json`` (raw), ``.md`` (table with the
environment) and ``.png`` (:mod:`.plot`)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import guidance_kernels

from .harness import Case, Result, Setup, Verdict

LEGEND = ("time ms: GPU kernel time (CUDA events, L2 flushed) on a GPU, wall clock on a CPU; host us: wall clock "
          "per call of back-to-back calls (synchronised, no flush); speed-up / host x: against the case's baseline "
          "(the eager formula unless named); * = this package's backends")


@dataclass
class Run:
    """Everything one bench run produced."""

    env: dict
    ceilings: dict
    cases: list[Case] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (op, case) -> report lines
    skipped: dict[str, str] = field(default_factory=dict)  # family -> the optional dependency it lacks
    failed: dict[str, str] = field(default_factory=dict)  # family -> the error that stopped building its cases
    measured: int = 0  # cases measured so far
    interrupted: bool = False  # stopped early (SIGINT): only the cases measured are reported

    def rows(self, case: Case) -> list[Result]:
        return [r for r in self.results if r.op == case.op and r.case == case.name]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(guidance_kernels.__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(setup: Setup) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import _extension

    device = setup.device
    return {
        "guidance_kernels": guidance_kernels.__version__,
        # GK_COMMIT: for copies of the tree without git metadata (a GPU machine's working copy)
        "commit": os.environ.get("GK_COMMIT") or _git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "shapes": setup.shapes,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cuda_extension": _extension.unavailable_reason() or "built",
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) + suffix


HEADER = (f"{'provider':<34} {'time ms':>10} {'speed-up':>9} {'host us':>9} {'host x':>7} {'GB/s':>8} "
          f"{'TFLOP/s':>8} {'% ceil':>7} {'MiB':>8}")


def _row(r: Result) -> str:
    name = ("* " if r.ours else "  ") + r.provider
    if r.error:
        return f"{name:<34} {'error':>10}  {r.error}"
    return (f"{name:<34} {_fmt(r.ms, '.4f'):>10} {_fmt(r.speedup, '.2f', 'x'):>9} {_fmt(r.host_us, '.1f'):>9} "
            f"{_fmt(r.host_speedup, '.2f', 'x'):>7} {_fmt(r.gbps, '.1f'):>8} {_fmt(r.tflops, '.1f'):>8} "
            f"{_fmt(r.pct_of_ceiling, '.1f'):>7} {_fmt(r.peak_mib, '.1f'):>8}")


def format_table(run: Run) -> str:
    """A plain-text table grouped by case, with each goal's verdict and the case's report lines."""
    lines = [LEGEND]
    for case in run.cases:
        lines += ["", f"== {case.op} | {case.name} | {case.shape} | {case.dtype}"]
        lines += [f"   goal: {v.line(where=False)}" for v in run.verdicts if v.op == case.op and v.case == case.name]
        lines += [f"   {note}" for note in run.notes.get((case.op, case.name), [])]
        lines.append("   " + HEADER)
        lines += ["   " + _row(r) for r in run.rows(case)]
    for family, why in run.skipped.items():
        lines += ["", f"== {family}: skipped: {why}"]
    for family, why in run.failed.items():
        lines += ["", f"== {family}: FAILED while building its cases: {why}"]
    if run.interrupted:
        lines += ["", f"== interrupted: only the {run.measured} cases above were measured"]
    return "\n".join(lines)


def summary_lines(run: Run) -> list[str]:
    """One line per goal (MET / NOT MET / n/a with numbers) and per skipped family."""
    lines = [f"goal {v.line()}" for v in run.verdicts]
    lines += [f"skipped {family}: {why}" for family, why in run.skipped.items()]
    lines += [f"FAILED  {family}: {why}" for family, why in run.failed.items()]
    if run.interrupted:
        lines.append(f"interrupted after {run.measured} cases")
    return lines


def write(out_dir: Path, run: Run, table: str, stem: str | None = None) -> dict[str, Path]:
    """``<stem>.json`` (raw), ``<stem>.md`` (table) and ``<stem>.png``; returns the paths written."""
    from . import plot

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"bench-{run.env['device']}"
    paths = {"json": out_dir / f"{stem}.json", "table": out_dir / f"{stem}.md"}
    payload = {"environment": run.env, "ceilings": run.ceilings,
               "goals": [asdict(v) for v in run.verdicts],
               "notes": [{"op": op, "case": case, "lines": lines} for (op, case), lines in run.notes.items()],
               "skipped": run.skipped, "failed": run.failed,
               "interrupted": run.interrupted, "results": [asdict(r) for r in run.results]}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in run.env.items())
    ceil = ", ".join(f"{k} = {v:.1f}" for k, v in run.ceilings.items())
    paths["table"].write_text(f"# guidance_kernels benchmark ({run.env['device_name']}, {run.env['device']})\n\n"
                              f"{header}\n- ceilings: {ceil}\n\n```\n{table}\n```\n")
    png = plot.plot(run, out_dir / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths

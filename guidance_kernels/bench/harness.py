"""Benchmark harness behind ``python -m guidance_kernels bench``.

A :class:`Case` is one op at one shape with several :class:`Provider` s timed side by side in the
same run: the eager reference, ``torch.compile(reference)`` (the bar to beat), our backends, and
the best existing op where one exists (SDPA). On a GPU, times are kernel times from CUDA events
(``triton.testing.do_bench``, median, warm, L2 flushed between runs) and peak extra memory is
recorded; on a CPU they are wall-clock medians. Throughput is reported against ceilings measured
in the same run (a large ``copy_`` for bandwidth, a large bf16 matmul for FLOP/s).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import guidance_kernels


@dataclass
class Provider:
    name: str
    fn: Callable[[], object]  # runs the op once on prepared inputs
    ours: bool = False  # one of this package's backends


@dataclass
class Case:
    op: str  # op stem, e.g. "guidance_combine"
    name: str  # short description, e.g. "SDXL cfg+pag"
    shape: str
    dtype: str
    providers: list[Provider]
    bytes: int | None = None  # bytes an ideal implementation moves (for GB/s)
    flops: int | None = None  # useful FLOPs (for TFLOP/s)
    baseline: str = "eager reference"
    compare_to: str | None = None  # a second reference point (e.g. the best SDPA backend)
    goal: str = ""  # the issue's goal for this case, printed next to the result
    goal_check: Callable[[dict], bool | None] | None = None  # evaluates the goal on the results


@dataclass
class Result:
    op: str
    case: str
    shape: str
    dtype: str
    provider: str
    ours: bool
    ms: float | None
    error: str | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_of_ceiling: float | None = None
    speedup: float | None = None
    vs_compare: float | None = None
    peak_mib: float | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool) -> float:
    """Median time of one call in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                             return_mode="median"))
    fn()  # warm (compiles, caches)
    budget = 0.15 if quick else 0.5
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by one call beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    gc.collect()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) and, on GPU, bf16 matmul TFLOP/s, measured now."""
    n = (1 << 26) if device.type == "cuda" else (1 << 23)
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
    ceilings = {"copy_gbps": 2 * src.numel() * 4 / (ms * 1e-3) / 1e9}
    del src, dst
    if device.type == "cuda":
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        ms = time_ms(lambda: a @ b, device, quick=quick)
        ceilings["matmul_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
        del a, b
    return ceilings


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool) -> list[Result]:
    results = []
    for provider in case.providers:
        r = Result(case.op, case.name, case.shape, case.dtype, provider.name, provider.ours, None)
        try:
            r.ms = time_ms(provider.fn, device, quick=quick)
            r.peak_mib = peak_extra_mib(provider.fn, device)
        except Exception as exc:  # a provider that cannot run here is reported, not fatal
            r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if r.ms:
            if case.bytes:
                r.gbps = case.bytes / (r.ms * 1e-3) / 1e9
                r.pct_of_ceiling = 100 * r.gbps / ceilings["copy_gbps"]
            if case.flops:
                r.tflops = case.flops / (r.ms * 1e-3) / 1e12
                if "matmul_tflops" in ceilings:
                    r.pct_of_ceiling = 100 * r.tflops / ceilings["matmul_tflops"]
        results.append(r)
    by_name = {r.provider: r for r in results}
    base = by_name.get(case.baseline)
    comp = by_name.get(case.compare_to) if case.compare_to else None
    for r in results:
        if r.ms and base is not None and base.ms:
            r.speedup = base.ms / r.ms
        if r.ms and comp is not None and comp.ms:
            r.vs_compare = comp.ms / r.ms
    return results


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # GK_COMMIT: for copies of the tree without git metadata (e.g. a GPU machine's working copy).
    commit = os.environ.get("GK_COMMIT") or None
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(guidance_kernels.__file__).parent, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    env = {
        "guidance_kernels": guidance_kernels.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    from .. import _extension

    env["cuda_extension"] = _extension.unavailable_reason() or "built"
    return env


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_table(results: list[Result], cases: list[Case]) -> str:
    """A plain-text table grouped by case, our providers marked with '*'."""
    lines = []
    header = f"{'provider':<34} {'time ms':>10} {'speed-up':>9} {'GB/s':>8} {'TFLOP/s':>8} {'% ceil':>7} {'MiB':>8}"
    for case in cases:
        rows = [r for r in results if r.op == case.op and r.case == case.name]
        lines.append("")
        lines.append(f"== {case.op} | {case.name} | {case.shape} | {case.dtype}")
        if case.goal:
            verdict = case.goal_check(rows_by_provider(rows)) if case.goal_check else None
            mark = {True: "MET", False: "NOT MET", None: "n/a here"}[verdict]
            lines.append(f"   goal: {case.goal}  [{mark}]")
        lines.append("   " + header)
        for r in rows:
            name = ("* " if r.ours else "  ") + r.provider
            if r.error:
                lines.append(f"   {name:<34} {'error':>10}  {r.error}")
                continue
            speed = _fmt(r.speedup, ".2f") + "x" if r.speedup else "-"
            lines.append(f"   {name:<34} {_fmt(r.ms, '.4f'):>10} {speed:>9} {_fmt(r.gbps, '.1f'):>8} "
                         f"{_fmt(r.tflops, '.1f'):>8} {_fmt(r.pct_of_ceiling, '.1f'):>7} {_fmt(r.peak_mib, '.1f'):>8}")
    return "\n".join(lines)


def rows_by_provider(rows: list[Result]) -> dict:
    return {r.provider: r for r in rows}


def write_outputs(out_dir: Path, env: dict, ceilings: dict, results: list[Result], cases: list[Case],
                  table: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{env['device']}"
    paths = {"json": out_dir / f"{stem}.json", "table": out_dir / f"{stem}.md"}
    goals = []
    for case in cases:
        rows = rows_by_provider([r for r in results if r.op == case.op and r.case == case.name])
        if case.goal:
            goals.append({"op": case.op, "case": case.name, "goal": case.goal,
                          "met": case.goal_check(rows) if case.goal_check else None})
    payload = {"environment": env, "ceilings": ceilings, "goals": goals, "results": [asdict(r) for r in results]}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    ceil = ", ".join(f"{k} = {v:.1f}" for k, v in ceilings.items())
    paths["table"].write_text(f"# guidance_kernels benchmark ({env['device']})\n\n{header}\n- ceilings: {ceil}\n\n"
                              f"```\n{table}\n```\n")
    png = plot(results, cases, out_dir / f"{stem}.png", env)
    if png:
        paths["png"] = png
    return paths


def plot(results: list[Result], cases: list[Case], path: Path, env: dict) -> Path | None:
    """Speed-up over the eager reference, one bar per provider, one group per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{c.op}\n{c.name}" for c in cases]
    providers = []
    for r in results:
        if r.provider not in providers:
            providers.append(r.provider)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases) + 4), 5.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        values = []
        for c in cases:
            row = next((r for r in results if r.op == c.op and r.case == c.name and r.provider == provider), None)
            values.append(row.speedup if row is not None and row.speedup else 0.0)
        ax.bar([j + i * width for j in range(len(cases))], values, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over the eager reference (×)")
    ax.set_yscale("log")
    ax.set_title(f"guidance_kernels on {env['device_name']} (torch {env['torch']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

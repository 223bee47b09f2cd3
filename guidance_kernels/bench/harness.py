"""Benchmark harness behind ``python -m guidance_kernels bench``: cases, providers, goals, timing.

A :class:`Case` is one op at one shape with several :class:`Provider` s timed side by side in the
same run: the eager reference (the formula a pipeline writes today), ``torch.compile(reference)``
where a goal compares against it, our backends, and the best existing op where one exists (SDPA).

Two times per provider:

* ``ms``: on a GPU the kernel time from CUDA events (``triton.testing.do_bench``: median, warm, L2
  flushed between runs) — what the hardware spends; on a CPU the wall-clock median of one call.
* ``host_us``: wall clock per call in a stream of back-to-back calls, synchronised once at the end,
  no flush — what an eager pipeline pays per call. When it exceeds the GPU time the call is
  host-bound (Python, validation, launch), whatever its kernel does. On a CPU both are the same
  measurement.

Throughput is reported against ceilings measured in the same run (a large ``copy_`` for bandwidth,
a large bf16 matmul for FLOP/s). A :class:`Goal` states the time it allows, computed from the same
run's rows (a multiple of eager, of SDPA, of a copy...), so every verdict is against this machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backends

EAGER = "eager reference"
COMPILED = "torch.compile(reference)"


@dataclass(frozen=True)
class Setup:
    """What a run measures. ``shapes``: "real" (diffusion shapes, GPU default), "small" (CPU default)
    or "tiny" (smoke: odd shapes, every provider called once, no ``torch.compile``). ``compile``:
    "all" (``--full``), "goals" (only where a goal compares against it) or "none"."""

    device: torch.device
    shapes: str = "small"
    compile: str = "goals"
    quick: bool = True

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def smoke(self) -> bool:
        return self.shapes == "tiny"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.gpu else torch.float32

    def wants_compile(self, goal_uses_it: bool) -> bool:
        return self.compile == "all" or (self.compile == "goals" and goal_uses_it)


@dataclass
class Provider:
    name: str
    fn: Callable[[], object]  # runs the op once on prepared inputs
    ours: bool = False  # one of this package's backends


@dataclass
class Result:
    op: str
    case: str
    shape: str
    dtype: str
    provider: str
    ours: bool
    ms: float | None = None
    host_us: float | None = None
    error: str | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_of_ceiling: float | None = None
    speedup: float | None = None  # baseline time / this time
    host_speedup: float | None = None  # baseline host time / this host time
    vs_compare: float | None = None  # compare_to time / this time
    peak_mib: float | None = None


Rows = dict[str, Result]


def is_ours(row: Result) -> bool:
    return row.ours


@dataclass
class Goal:
    """A performance goal: the fastest provider that ``counts`` must take at most ``limit_ms(rows,
    ceilings)`` (computed from this run). Goals are GPU goals: elsewhere the verdict is None."""

    text: str
    limit_ms: Callable[[Rows, dict], float | None]
    counts: Callable[[Result], bool] = is_ours


@dataclass
class Verdict:
    op: str
    case: str
    goal: str
    met: bool | None  # None: not evaluated here (not a GPU run)
    best: str | None = None
    best_ms: float | None = None
    limit_ms: float | None = None
    required_speedup: float | None = None  # limit expressed as a speed-up over the baseline (the PNG's goal line)

    def line(self, where: bool = True) -> str:
        """'MET     op | case | goal: best ms vs limit ms' (``where=False``: without op and case)."""
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[self.met]
        numbers = ""
        if self.best_ms is not None and self.limit_ms is not None:
            numbers = f": {self.best} {self.best_ms:.4g} ms vs limit {self.limit_ms:.4g} ms"
        elif self.met is not None:
            numbers = ": no limit or no time (a provider it needs did not run)"
        return f"{mark:<7} " + (f"{self.op} | {self.case} | " if where else "") + self.goal + numbers


@dataclass
class Case:
    op: str  # op stem, e.g. "guidance_combine"
    name: str  # short description, e.g. "SDXL cfg+pag"
    shape: str
    dtype: str
    providers: list[Provider]
    bytes: int | None = None  # bytes an ideal implementation moves (for GB/s)
    flops: int | None = None  # useful FLOPs (for TFLOP/s)
    baseline: str = EAGER
    compare_to: str | None = None  # a second reference point (e.g. plain SDPA)
    goals: list[Goal] = field(default_factory=list)
    # extra lines for the table, computed from the measured rows (e.g. FLOP limits beside ratios)
    report: Callable[[Rows], list[str]] | None = None
    family: str = ""  # the cases_<family> module it comes from (set by bench.collect)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def usable_backends(op: str, x: torch.Tensor, facts: tuple = ()) -> list[str]:
    """Our backends that serve ``op`` on tensors like ``x`` without being forced."""
    return [b for b in backends.op_backends(op) if not backends.unsupported_reasons(
        op, b, backends.Request(x.device.type, x.device.index, x.dtype, tuple(sorted(facts))))]


def our_providers(op: str, x: torch.Tensor, call: Callable[[str], object], facts: tuple = ()) -> list[Provider]:
    """One provider per usable backend: ``call(backend)`` runs the public function with it."""
    return [Provider(b, (lambda b=b: call(b)), ours=True) for b in usable_backends(op, x, facts)]


def reference_providers(setup: Setup, ref: Callable[[], object], *, goal_uses_compile: bool = False) -> list[Provider]:
    """The eager reference, and ``torch.compile`` of it when the setup wants it."""
    providers = [Provider(EAGER, ref)]
    if setup.wants_compile(goal_uses_compile):
        providers.append(Provider(COMPILED, torch.compile(ref, fullgraph=True, dynamic=False)))
    return providers


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], setup: Setup) -> float:
    """Median time of one call in milliseconds (see the module docstring); one call when smoking."""
    if setup.smoke:
        start = time.perf_counter()
        fn()
        _sync(setup.device)
        return (time.perf_counter() - start) * 1e3
    if setup.gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if setup.quick else 25, rep=40 if setup.quick else 100,
                                             return_mode="median"))
    fn()  # warm (compiles, caches)
    budget = 0.15 if setup.quick else 0.5
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def host_us(fn: Callable[[], object], setup: Setup, kernel_ms: float) -> float | None:
    """Wall clock per call (µs) of back-to-back calls synchronised once per batch: median of 3 batches
    of ~2 ms of kernel time each. On a CPU this is what :func:`time_ms` measured."""
    if setup.smoke:
        return None
    if not setup.gpu:
        return kernel_ms * 1e3
    fn()
    _sync(setup.device)
    calls = max(1, min(200, int(2.0 / max(kernel_ms, 1e-3))))
    per_call = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(setup.device)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call) * 1e6


def peak_extra_mib(fn: Callable[[], object], setup: Setup) -> float | None:
    """Peak memory allocated by one call beyond what was allocated before it (GPU only)."""
    if not setup.gpu or setup.smoke:
        return None
    _sync(setup.device)
    gc.collect()
    before = torch.cuda.memory_allocated(setup.device)
    torch.cuda.reset_peak_memory_stats(setup.device)
    fn()
    _sync(setup.device)
    return (torch.cuda.max_memory_allocated(setup.device) - before) / 2**20


def measure_ceilings(setup: Setup) -> dict:
    """Copy bandwidth (GB/s, read + write) and, on GPU, bf16 matmul TFLOP/s, measured now."""
    device = setup.device
    n = 1 << 16 if setup.smoke else (1 << 26 if setup.gpu else 1 << 23)
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ceilings = {"copy_gbps": 2 * n * 4 / (time_ms(lambda: dst.copy_(src), setup) * 1e-3) / 1e9}
    if setup.gpu and not setup.smoke:
        m = 8192
        a, b = (torch.randn(m, m, dtype=torch.bfloat16, device=device) for _ in range(2))
        ceilings["matmul_tflops"] = 2 * m**3 / (time_ms(lambda: a @ b, setup) * 1e-3) / 1e12
    return ceilings


# --------------------------------------------------------------------------- running a case


def _measure(case: Case, provider: Provider, setup: Setup) -> Result:
    r = Result(case.op, case.name, case.shape, case.dtype, provider.name, provider.ours)
    try:
        r.ms = time_ms(provider.fn, setup)
        r.host_us = host_us(provider.fn, setup, r.ms)
        r.peak_mib = peak_extra_mib(provider.fn, setup)
    except Exception as exc:  # a provider that cannot run here is reported, not fatal
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        r.error = f"{type(exc).__name__}: {first}"
    return r


def _throughput(r: Result, case: Case, ceilings: dict) -> None:
    if not r.ms:
        return
    if case.bytes:
        r.gbps = case.bytes / (r.ms * 1e-3) / 1e9
        r.pct_of_ceiling = 100 * r.gbps / ceilings["copy_gbps"]
    if case.flops:
        r.tflops = case.flops / (r.ms * 1e-3) / 1e12
        if "matmul_tflops" in ceilings:
            r.pct_of_ceiling = 100 * r.tflops / ceilings["matmul_tflops"]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def run_case(case: Case, setup: Setup, ceilings: dict) -> list[Result]:
    results = [_measure(case, p, setup) for p in case.providers]
    rows = {r.provider: r for r in results}
    base, comp = rows.get(case.baseline), rows.get(case.compare_to) if case.compare_to else None
    for r in results:
        _throughput(r, case, ceilings)
        if base is not None:
            r.speedup, r.host_speedup = _ratio(base.ms, r.ms), _ratio(base.host_us, r.host_us)
        if comp is not None:
            r.vs_compare = _ratio(comp.ms, r.ms)
    return results


def evaluate(case: Case, rows: Rows, ceilings: dict, setup: Setup) -> list[Verdict]:
    verdicts = []
    base = rows.get(case.baseline)
    for goal in case.goals:
        v = Verdict(case.op, case.name, goal.text, None)
        if setup.gpu and not setup.smoke:
            v.limit_ms = goal.limit_ms(rows, ceilings)
            timed = [r for r in rows.values() if goal.counts(r) and r.ms]
            if timed:
                best = min(timed, key=lambda r: r.ms)
                v.best, v.best_ms = best.provider, best.ms
            v.met = bool(v.limit_ms is not None and v.best_ms is not None and v.best_ms <= v.limit_ms)
            if base is not None and base.ms and v.limit_ms:
                v.required_speedup = base.ms / v.limit_ms
        verdicts.append(v)
    return verdicts


# --------------------------------------------------------------------------- goal limits


def faster_than(provider: str, factor: float) -> Callable[[Rows, dict], float | None]:
    """Limit: ``provider``'s time / ``factor`` (a speed-up of ``factor`` over it)."""
    def limit(rows: Rows, ceilings: dict) -> float | None:
        row = rows.get(provider)
        return row.ms / factor if row is not None and row.ms else None
    return limit


def within(providers: tuple[str, ...], factor: float) -> Callable[[Rows, dict], float | None]:
    """Limit: ``factor`` × the fastest of ``providers``."""
    def limit(rows: Rows, ceilings: dict) -> float | None:
        times = [rows[p].ms for p in providers if p in rows and rows[p].ms]
        return factor * min(times) if times else None
    return limit


def at_bandwidth(nbytes: int, fraction: float) -> Callable[[Rows, dict], float | None]:
    """Limit: the time to move ``nbytes`` at ``fraction`` of the copy bandwidth measured in this run."""
    def limit(rows: Rows, ceilings: dict) -> float | None:
        return nbytes / (fraction * ceilings["copy_gbps"] * 1e9) * 1e3
    return limit


def both(*limits: Callable[[Rows, dict], float | None]) -> Callable[[Rows, dict], float | None]:
    """Limit: the tightest of several (every one must hold); None if any cannot be computed."""
    def limit(rows: Rows, ceilings: dict) -> float | None:
        values = [f(rows, ceilings) for f in limits]
        return None if any(v is None for v in values) else min(values)
    return limit

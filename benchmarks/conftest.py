"""``pytest benchmarks/``: the cases of ``python -m guidance_kernels bench`` as pytest-benchmark tests
(``pip install guidance_kernels[bench]``), one test per (case, provider), grouped by case so the
providers print side by side.

    pytest benchmarks/                                  # real shapes on a GPU, small ones on a CPU
    pytest benchmarks/ --gk-ops guidance_combine --benchmark-save=before
    pytest benchmarks/ --gk-ops guidance_combine --benchmark-compare    # against the last save

Options: ``--gk-shapes real|small|tiny``, ``--gk-ops`` (comma-separated families / op stems, as
``bench --ops``), ``--gk-compile all|goals|none`` (which cases time ``torch.compile(reference)``).
On a GPU the timer synchronises the device before each reading, so a round's time includes the work
it queued; rounds run back to back without flushing L2 — the steady-state cost per call an eager
pipeline sees (the bench's "host us" column), not the bench's flushed kernel time.
"""

from __future__ import annotations

import re
import time

import pytest
import torch


def cuda_sync_timer() -> float:
    """``time.perf_counter`` after the current device finished its queued work."""
    torch.cuda.synchronize()
    return time.perf_counter()


def pytest_addoption(parser):
    group = parser.getgroup("guidance_kernels bench")
    group.addoption("--gk-shapes", choices=["real", "small", "tiny"], help="default: real on a GPU, small on a CPU")
    group.addoption("--gk-ops", help="comma-separated families / op stems (default: all)")
    group.addoption("--gk-compile", choices=["all", "goals", "none"], help="default: goals (none for tiny)")
    group.addoption("--gk-device", choices=["cuda", "cpu"], help="default: cuda if available")


def pytest_configure(config):
    option = getattr(config.option, "benchmark_timer", None)
    if option is not None and torch.cuda.is_available() and str(option).endswith("perf_counter"):
        from pytest_benchmark.utils import NameWrapper

        config.option.benchmark_timer = NameWrapper(cuda_sync_timer)


def _ascii(text: str) -> str:
    text = text.replace("σ", "sigma").replace("∞", "inf").replace("≤", "<=")
    return re.sub(r"[^A-Za-z0-9.=+*()-]+", "_", text).strip("_")


def _parameters(config) -> list:
    """One pytest.param per (case, provider) of the selected families; a family that cannot run here
    is one skipped (missing dependency) or failing (error while building its cases) parameter."""
    from guidance_kernels import bench
    from guidance_kernels.bench import report

    ops = config.getoption("--gk-ops")
    ops = [o.strip() for o in ops.split(",") if o.strip()] if ops else None
    setup = bench.make_setup(config.getoption("--gk-device"), True, config.getoption("--gk-shapes"),
                             config.getoption("--gk-compile"))
    torch.manual_seed(0)
    run = report.Run(env={}, ceilings={})
    bench.collect(setup, ops, run, log=lambda *a: None)
    params = [pytest.param(case, provider, id=_ascii(f"{case.op}|{case.name}|{provider.name}"))
              for case in run.cases for provider in case.providers]
    params += [pytest.param(None, None, id=family, marks=pytest.mark.skip(reason=why))
               for family, why in run.skipped.items()]
    params += [pytest.param(None, why, id=family) for family, why in run.failed.items()]
    return params


def pytest_generate_tests(metafunc):
    if {"gk_case", "gk_provider"} <= set(metafunc.fixturenames):
        config = metafunc.config
        if not hasattr(config, "_gk_bench_params"):
            config._gk_bench_params = _parameters(config)  # built once: cases allocate their inputs
        metafunc.parametrize("gk_case,gk_provider", config._gk_bench_params)

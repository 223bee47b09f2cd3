"""Every (case, provider) of the bench as a pytest-benchmark test (see benchmarks/conftest.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (the [bench] extra)")


def test_provider(benchmark, gk_case, gk_provider):
    if gk_case is None:
        pytest.fail(f"building the family's cases failed: {gk_provider}")
    benchmark.group = f"{gk_case.op} | {gk_case.name} | {gk_case.shape} | {gk_case.dtype}"
    benchmark.extra_info.update(op=gk_case.op, case=gk_case.name, shape=gk_case.shape, dtype=gk_case.dtype,
                                provider=gk_provider.name, ours=gk_provider.ours)
    gk_provider.fn()  # warm: compiles, caches, lazy initialisation
    benchmark(gk_provider.fn)

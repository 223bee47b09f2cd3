"""The command line: ``python -m guidance_kernels info`` and ``bench`` (smoke runs at tiny shapes of
every op family), the goal arithmetic, the whole-step FLOP limits and ``pytest benchmarks/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guidance_kernels import backends, bench
from guidance_kernels.__main__ import main
from guidance_kernels.bench import harness

ROOT = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = __import__("importlib").util.find_spec("matplotlib") is not None


def _python_env() -> dict:
    # without pytest-xdist's worker variables: a pytest run started from a worker is not one of its workers
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_info_prints_every_op_with_its_status_and_a_matrix_per_dtype():
    proc = subprocess.run([sys.executable, "-m", "guidance_kernels", "info"], capture_output=True, text=True,
                          env=_python_env(), timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out and "_C:" in out
    lines = out.splitlines()
    for op in backends.registered_ops():
        order = backends.op_backends(op)
        at = lines.index(f"  {op}: priority {' > '.join(order)}")
        assert lines[at + 1].split()[0] in ("predicted", "measured"), lines[at + 1]  # from bench/status.py
        assert lines[at + 2].split() == ["backend", "float32", "float16", "bfloat16"]
        rows = [line.split()[0] for line in lines[at + 3: at + 3 + len(order)]]
        assert rows == list(order)
    # the torch backend serves every dtype everywhere; a backend that cannot says why in a footnote
    assert ["torch", "ok", "ok", "ok"] in [line.split() for line in lines]
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in out or "CPU tensors need TRITON_INTERPRET=1" in out


def _smoke(tmp_path: Path, ops: str) -> dict:
    assert main(["bench", "--smoke", "--device", "cpu", "--ops", ops, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert (tmp_path / "bench-cpu.md").read_text().startswith("# guidance_kernels benchmark")
    assert (tmp_path / "bench-cpu.png").exists() == HAS_MATPLOTLIB
    return payload


@pytest.mark.parametrize("family", bench.FAMILIES)
def test_bench_smoke_of_every_family(tmp_path, family):
    """Every provider of every case of the family runs at tiny shapes (eager, SDPA, our backends)."""
    module = bench.family_module(family)
    payload = _smoke(tmp_path, family)
    missing = bench.missing_requirement(module)
    if missing is not None:  # e.g. diffusers on the GPU image: skipped, and the table says why
        assert payload["skipped"] == {family: missing} and payload["results"] == []
        assert f"== {family}: skipped: needs" in (tmp_path / "bench-cpu.md").read_text()
        return
    results = payload["results"]
    assert results and not payload["skipped"] and not payload["failed"]
    assert {r["op"] for r in results} <= set(module.OPS) | {family}
    assert [r for r in results if r["error"]] == []
    assert any(r["ours"] for r in results)
    assert all(g["met"] is None for g in payload["goals"])  # goals are GPU goals


def test_bench_skips_a_family_whose_dependency_is_missing_and_reports_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.family_module("sag_degrade"), "REQUIRES", ("gk_module_that_does_not_exist",),
                        raising=False)
    payload = _smoke(tmp_path, "sag_degrade,cfg_zero_star_combine")
    assert list(payload["skipped"]) == ["sag_degrade"]
    assert "gk_module_that_does_not_exist" in payload["skipped"]["sag_degrade"]
    assert {r["op"] for r in payload["results"]} == {"cfg_zero_star_combine"}
    assert "== sag_degrade: skipped: needs gk_module_that_does_not_exist" in (tmp_path / "bench-cpu.md").read_text()


def test_bench_writes_what_it_measured_when_interrupted(tmp_path, monkeypatch):
    """A time limit (SIGINT) mid-run: the cases measured so far are written, marked interrupted."""
    module = bench.family_module("guidance_combine")
    real_cases = module.cases

    def cases(setup):
        out = real_cases(setup)
        out[1].providers[0].fn = lambda: (_ for _ in ()).throw(KeyboardInterrupt())
        return out

    monkeypatch.setattr(module, "cases", cases)
    payload = _smoke(tmp_path, "guidance_combine")
    assert payload["interrupted"] is True
    assert {r["case"] for r in payload["results"]} == {real_cases(bench.make_setup("cpu", shapes="tiny"))[0].name}


def test_bench_rejects_unknown_ops(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--smoke", "--ops", "guidance_combine,nope"])
    assert exc.value.code == 2
    assert "--ops: unknown 'nope' (choose from guidance_combine," in capsys.readouterr().err


# --------------------------------------------------------------------------- goal arithmetic


def _row(provider, ms, ours=False):
    return harness.Result("op", "case", "s", "bfloat16", provider, ours, ms=ms)


def test_goal_limits_come_from_the_same_run():
    gpu = harness.Setup(torch.device("cuda"), shapes="real")
    rows = {r.provider: r for r in [_row(harness.EAGER, 1.0), _row(harness.COMPILED, 0.5), _row("sdpa", 0.4),
                                    _row("triton", 0.3, ours=True), _row("torch", 0.2, ours=True)]}
    case = harness.Case("op", "case", "s", "bfloat16", [], goals=[
        harness.Goal("2.5x eager and <= compile", harness.both(harness.faster_than(harness.EAGER, 2.5),
                                                               harness.faster_than(harness.COMPILED, 1.0))),
        harness.Goal("<= 1.3x sdpa, triton only", harness.within(("sdpa",), 1.3),
                     counts=lambda r: r.provider == "triton"),
        harness.Goal("85% of copy", harness.at_bandwidth(10**9, 0.85)),
        harness.Goal("needs a provider that did not run", harness.within(("absent",), 1.0))])
    v = harness.evaluate(case, rows, {"copy_gbps": 4000.0}, gpu)
    assert (v[0].met, v[0].best, v[0].limit_ms, v[0].required_speedup) == (True, "torch", 0.4, 2.5)
    assert (v[1].met, v[1].best) == (True, "triton") and v[1].limit_ms == pytest.approx(0.52)
    assert v[2].limit_ms == pytest.approx(1e9 / (0.85 * 4000e9) * 1e3) and v[2].met is True
    assert v[3].met is False and "did not run" in v[3].line()
    assert "MET     op | case | 2.5x eager and <= compile: torch 0.2 ms vs limit 0.4 ms" == v[0].line()
    # not a GPU run: not evaluated
    assert [x.met for x in harness.evaluate(case, rows, {"copy_gbps": 1.0}, harness.Setup(torch.device("cpu")))] \
        == [None] * 4


def test_whole_step_flop_limits():
    from guidance_kernels.bench import cases_diffusers as D

    # issue 12 §4: f = 31.6% before SDXL's mid block -> (2 + 0.684) / 2 and 2 - f
    f = 0.316
    assert D.flop_ratio(f, D.UNET_BRANCHES["CFG+PAG mid (fork)"], D.UNET_BRANCHES[D.CFG_ONLY]) == pytest.approx(1.342)
    assert D.flop_ratio(f, D.UNET_BRANCHES["CFG+PAG+SEG mid (fork)"], D.UNET_BRANCHES[D.CFG_ONLY]) == \
        pytest.approx(1.684)
    assert D.flop_ratio(f, D.UNET_BRANCHES["CFG+PAG mid (no fork)"], D.UNET_BRANCHES[D.CFG_ONLY]) == pytest.approx(1.5)
    pytest.importorskip("diffusers", reason="counting the real SDXL UNet's FLOPs needs diffusers")
    from diffusers import UNet2DConditionModel

    counted = D.flop_prefix_fraction(UNet2DConditionModel, D.SDXL_UNET, D._unet_inputs, "mid_block")
    assert counted == pytest.approx(0.316, abs=0.002)


# --------------------------------------------------------------------------- pytest benchmarks/


def test_pytest_benchmark_times_the_bench_cases_provider_by_provider(tmp_path):
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark: the [bench] extra")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "--gk-shapes", "tiny", "--gk-device", "cpu", "--gk-ops", "cfg_zero_star_combine",
                           "--benchmark-json", str(out), "--benchmark-max-time", "0.001", "--benchmark-min-rounds",
                           "2", "--benchmark-warmup", "off"], capture_output=True, text=True, cwd=ROOT,
                          env=_python_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["benchmarks"]
    setup = bench.make_setup("cpu", shapes="tiny")
    expected = {(c.name, p.name) for c in bench.family_module("guidance_combine").cases(setup)
                if c.op == "cfg_zero_star_combine" for p in c.providers}
    assert {(r["extra_info"]["case"], r["extra_info"]["provider"]) for r in runs} == expected
    assert len({r["group"] for r in runs}) == len({case for case, _ in expected})  # providers side by side

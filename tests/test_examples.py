"""The examples run as documented (tiny sizes) and say what they measure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the example runs a diffusers pipeline (diffusers: pyproject [test])")

ROOT = Path(__file__).resolve().parents[1]


def test_guided_sampling_example_runs_and_both_paths_agree():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "guided_sampling.py"), "--steps", "2", "--size",
                           "16", "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"guidance_kernels\s+[\d.]+ ms/step", proc.stdout), proc.stdout
    assert re.search(r"without kernels .*\s[\d.]+ ms/step", proc.stdout), proc.stdout
    diff = float(re.search(r"max \|difference\| of the final latents: ([\d.e+-]+)", proc.stdout).group(1))
    assert diff < 1e-3, proc.stdout  # fp32: the fused path equals the anchors' formulations

"""Compile lanes that need no GPU.

Triton AOT: ``tests/triton_aot.py`` (a subprocess without TRITON_INTERPRET) compiles every kernel
launched by the ``CASES`` of ``tests/aot_*.py`` to sm_80 and sm_90 cubin with Triton's own compiler
and ptxas; every compile must succeed and no kernel may spill registers to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_TRITON
from helpers import needs

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def aot_records():
    needs(HAS_TRITON, "triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(HERE / "triton_aot.py")], capture_output=True, text=True, env=env,
                          cwd=HERE, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_triton_kernels_compile_for_sm80_and_sm90(aot_records):
    failures = [r for r in aot_records if not r["ok"]]
    assert not failures, "\n".join(f"{r['case']} {r['kernel']} {r['target']}: {r['error']}" for r in failures)
    cases = {r["case"] for r in aot_records}
    modules = {p.stem for p in HERE.glob("aot_*.py")}
    assert {c.split(":")[0] for c in cases} == modules, "every aot_*.py module must launch kernels"
    assert {r["target"] for r in aot_records} == {"sm_80", "sm_90"}


def test_triton_kernels_do_not_spill(aot_records):
    spilling = [r for r in aot_records if r.get("local", 0) or r.get("stack", 0)]
    assert not spilling, "\n".join(f"{r['case']} {r['kernel']} {r['target']}: local={r.get('local')} "
                                   f"stack={r.get('stack')}" for r in spilling)
    assert all("reg" in r for r in aot_records), "resource usage could not be read from the cubins"


def test_contiguous_combine_uses_128_bit_loads(aot_records):
    """The fast path must vectorise: a contiguous bf16 combine reads each branch with ld.global.v4."""
    rows = [r for r in aot_records if r["case"].endswith("combine-torch.bfloat16-contiguous")
            and r["kernel"] == "_combine_kernel"]
    assert rows and all(r["global_loads"].get("v4.b32", 0) >= 3 for r in rows), rows

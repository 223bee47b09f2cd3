"""Compile every Triton kernel our launchers launch, for real GPU targets, on a machine without a GPU.

Run as a script (it must not see ``TRITON_INTERPRET=1``: the interpreter replaces ``triton.jit``).
It replaces ``JITFunction.run`` so that a launch, instead of running, binds its arguments exactly
as Triton's launcher does (same specialisation on alignment and on 1), then compiles the kernel
to cubin for each target with Triton's own compiler and ptxas. The launchers are driven by the
``CASES`` of every ``tests/aot_<op>.py`` module with CPU tensors of representative shapes,
dtypes and layouts; only their data pointers' alignment and dtypes matter.

This catches what the interpreter does not (illegal constexpr use, type mismatches between
branches, unsupported ops) and reports registers and spills per kernel, as JSON on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

TARGETS = ((80, "sm_80"), (90, "sm_90"))


def _install_compiler(records: list[dict]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    def run(self, *args, grid, warmup, **kwargs):
        for capability, label in TARGETS:
            target = GPUTarget("cuda", capability, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(self.signature, self.params, backend)
            record = {"kernel": self.fn.__name__, "target": label, "case": _CURRENT_CASE[0]}
            try:
                bound, specialization, options = binder(*args, **kwargs)
                options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization,
                                                                        options)
                compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                meta = compiled.metadata
                record.update(ok=True, num_warps=getattr(meta, "num_warps", None),
                              shared=getattr(meta, "shared", None))
                record.update(_resource_usage(compiled.asm.get("cubin")))
                record["global_loads"] = _global_loads(compiled.asm.get("ptx", ""))
            except Exception as exc:  # reported, and the test fails on it
                record.update(ok=False, error="".join(traceback.format_exception_only(type(exc), exc)).strip())
            records.append(record)
        return None

    JITFunction.run = run


def _global_loads(ptx: str) -> dict:
    """Counts of global load instructions by width, e.g. {"v4.b32": 6, "b16": 2}: shows whether the
    contiguous fast path issues 128-bit vector loads."""
    import re

    counts: dict[str, int] = {}
    for match in re.finditer(r"ld\.global(?:\.[a-z_]+)*?((?:\.v[248])?\.[bfsu]\d+)", ptx):
        key = match.group(1).lstrip(".")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _resource_usage(cubin: bytes | None) -> dict:
    """Registers, stack and local (spill) bytes from the cubin (Triton reads them only when it
    loads a kernel on a GPU), via the cuobjdump that ships with Triton."""
    import subprocess
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cubin or not cuobjdump.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True)
    usage = {}
    names = {"REG": "reg", "STACK": "stack", "LOCAL": "local", "SHARED": "static_shared"}
    for token in out.stdout.replace(",", " ").split():
        if ":" in token:
            key, _, value = token.partition(":")
            if key in names and value.isdigit():
                # SHARED is the cubin's static shared memory only; "shared" (from Triton's
                # metadata) is what the launch requests, pipelining buffers included.
                usage[names[key]] = int(value)
    return usage


_CURRENT_CASE = [""]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_aot.py must run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    records: list[dict] = []
    _install_compiler(records)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    only = sys.argv[1:]
    for path in sorted(here.glob("aot_*.py")):
        module = importlib.import_module(path.stem)
        for name, case in module.CASES:
            if only and not any(o in f"{path.stem}:{name}" for o in only):
                continue
            _CURRENT_CASE[0] = f"{path.stem}:{name}"
            try:
                case()
            except Exception as exc:
                records.append({"case": _CURRENT_CASE[0], "ok": False, "kernel": None, "target": None,
                                "error": "launcher raised: " + "".join(
                                    traceback.format_exception_only(type(exc), exc)).strip()})
    json.dump(records, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

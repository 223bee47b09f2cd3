"""Compile every Triton kernel our launchers launch, for real GPU targets, on a machine without a GPU.

Run as a script (it must not see ``TRITON_INTERPRET=1``: the interpreter replaces ``triton.jit``).
It replaces ``JITFunction.run`` so that a launch, instead of running, binds its arguments exactly
as Triton's launcher does (same specialisation on alignment and on 1), then compiles the kernel
to cubin for each target with Triton's own compiler and ptxas. The launchers are driven by the
``CASES`` of every ``tests/aot_<op>.py`` module — ``(name, case)``, or ``(name, case, targets)``
for a case that only some targets run (TMA: sm_90) — with CPU tensors of representative shapes,
dtypes and layouts; only their data pointers' alignment and dtypes matter. Each case runs once per
target with ``guidance_kernels.triton._common.CPU_CAPABILITY`` set to it, so that the launchers pick
that GPU generation's tiles.

This catches what the interpreter does not (illegal constexpr use, type mismatches between
branches, unsupported ops) and reports per kernel, as JSON on stdout: registers and spills, shared
memory, the launch's constexprs (tiles, warps, stages), the PTX global-load widths, and a SASS
reading (:func:`sass_stats`, from the ``cuobjdump`` that ships with Triton): opcode counts of the
whole kernel and of each innermost loop — what ``tests/test_compile_lanes.py`` asserts on
(tensor-core instruction kind, 16-byte loads, shuffles and barriers per loop trip).

``GK_AOT_DUMP=<dir>`` also writes each kernel's PTX, TTGIR and SASS there (for reading by hand).
"""

from __future__ import annotations

import importlib
import json
import os
import re
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
            if label not in _CURRENT_TARGETS[0]:
                continue
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
                record["constants"] = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, str))}
                record.update(_resource_usage(compiled.asm.get("cubin")))
                record["global_loads"] = _global_loads(compiled.asm.get("ptx", ""))
                sass = _sass(compiled.asm.get("cubin"))
                record["sass"] = sass_stats(sass)
                _dump(record, compiled.asm, sass)
            except Exception as exc:  # reported, and the test fails on it
                record.update(ok=False, error="".join(traceback.format_exception_only(type(exc), exc)).strip())
            records.append(record)
        return None

    JITFunction.run = run


def _global_loads(ptx: str) -> dict:
    """Counts of global load instructions by width, e.g. {"v4.b32": 6, "b16": 2}: shows whether the
    contiguous fast path issues 128-bit vector loads."""
    counts: dict[str, int] = {}
    for match in re.finditer(r"ld\.global(?:\.[a-z_]+)*?((?:\.v[248])?\.[bfsu]\d+)", ptx):
        key = match.group(1).lstrip(".")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _sass(cubin: bytes | None) -> str:
    """The cubin's SASS as ``cuobjdump -sass`` prints it ("" when it cannot be read)."""
    import subprocess
    import tempfile

    if not cubin or not _cuobjdump().exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_cuobjdump()), "-sass", f.name], capture_output=True, text=True).stdout


# "/*0a30*/  @!P5 BRA 0x2350 ;": address, optional predicate, mnemonic, operands
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def sass_stats(sass: str) -> dict:
    """Opcode counts of a kernel's SASS: ``{"ops": {opcode: n}, "loops": [{"start", "end", "ops"}]}``.

    An opcode is the full mnemonic with its modifiers (``LDG.E.128``, ``HGMMA.64x128x16.F32.BF16``,
    ``SHFL.BFLY``); a loop is the address range of a backward branch (``BRA`` to an address at or
    before its own), and only innermost loops (containing no other) are listed, with their own
    opcode counts: one trip of a hot loop."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(sass)]
    ops: dict[str, int] = {}
    for _, op, _ in code:
        ops[op] = ops.get(op, 0) + 1
    spans = []
    for addr, op, rest in code:
        target = re.match(r"\s*(0x[0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for start, end in sorted(set(inner)):
        counts: dict[str, int] = {}
        for addr, op, _ in code:
            if start <= addr <= end:
                counts[op] = counts.get(op, 0) + 1
        loops.append({"start": start, "end": end, "ops": counts})
    return {"ops": ops, "loops": loops}


def _dump(record: dict, asm: dict, sass: str) -> None:
    folder = os.environ.get("GK_AOT_DUMP")
    if not folder:
        return
    stem = Path(folder) / f"{record['case'].replace(':', '_')}_{record['kernel']}_{record['target']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for key in ("ptx", "ttgir"):
        if key in asm:
            stem.with_suffix(f".{key}").write_text(asm[key])
    stem.with_suffix(".sass").write_text(sass)


def _resource_usage(cubin: bytes | None) -> dict:
    """Registers, stack and local (spill) bytes from the cubin (Triton reads them only when it
    loads a kernel on a GPU), via the cuobjdump that ships with Triton."""
    import subprocess
    import tempfile

    cuobjdump = _cuobjdump()
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
_CURRENT_TARGETS = [tuple(label for _, label in TARGETS)]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_aot.py must run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    records: list[dict] = []
    _install_compiler(records)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    only = sys.argv[1:]
    from guidance_kernels.triton import _common

    for path in sorted(here.glob("aot_*.py")):
        module = importlib.import_module(path.stem)
        for name, case, *targets in module.CASES:
            if only and not any(o in f"{path.stem}:{name}" for o in only):
                continue
            _CURRENT_CASE[0] = f"{path.stem}:{name}"
            # one launch per target: the launchers choose tiles per GPU generation, and CPU tensors
            # tile for _common.CPU_CAPABILITY
            for capability, label in TARGETS:
                if label not in (targets[0] if targets else (label,)):
                    continue
                _CURRENT_TARGETS[0] = (label,)
                _common.CPU_CAPABILITY = divmod(capability, 10)
                try:
                    case()
                except Exception as exc:
                    records.append({"case": _CURRENT_CASE[0], "ok": False, "kernel": None, "target": label,
                                    "error": "launcher raised: " + "".join(
                                        traceback.format_exception_only(type(exc), exc)).strip()})
    json.dump(records, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

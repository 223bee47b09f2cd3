"""Command line: ``python -m guidance_kernels info`` and ``python -m guidance_kernels bench``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

import guidance_kernels
from guidance_kernels import _extension, backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAME = 13  # width of the backend column


def _versions() -> list[str]:
    lines = [f"guidance_kernels {guidance_kernels.__version__}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if importlib.util.find_spec("triton") is not None:
        import triton

        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if interpret else ""))
    else:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU: none visible")
    why = _extension.unavailable_reason()
    archs = _extension.compiled_archs()
    lines.append("_C: " + ("built" + (f" for {', '.join(archs)}" if archs else "") if why is None else why))
    return lines


def capability_matrix(op: str, device_type: str, device_index: int | None) -> list[str]:
    """One row per backend (priority order), one column per dtype: 'ok' or a footnote letter."""
    from guidance_kernels.bench import status

    order = backends.op_backends(op)
    lines = [f"{op}: priority {' > '.join(order)}", f"    {status.describe(op)}",
             (f"    {'backend':<{_NAME}}" + "".join(f"{str(d).replace('torch.', ''):<12}" for d in DTYPES)).rstrip()]
    notes: dict[str, str] = {}
    for backend in order:
        cells = []
        for dtype in DTYPES:
            reasons = backends.unsupported_reasons(op, backend, backends.Request(device_type, device_index, dtype))
            if not reasons:
                cells.append("ok")
                continue
            text = "; ".join(reasons)
            mark = notes.setdefault(text, f"({chr(ord('a') + len(notes))})")
            cells.append(f"no {mark}")
        lines.append((f"    {backend:<{_NAME}}" + "".join(f"{c:<12}" for c in cells)).rstrip())
    lines += [f"    {mark} {text}" for text, mark in notes.items()]
    return lines


def info() -> str:
    lines = _versions()
    cuda = torch.cuda.is_available()
    device, index = ("cuda", torch.cuda.current_device()) if cuda else ("cpu", None)
    lines.append(f"backends per op on {device} (automatic choice: the first 'ok' in priority order):")
    for op in backends.registered_ops():
        lines += ["  " + line for line in capability_matrix(op, device, index)]
    forced = os.environ.get("GUIDANCE_KERNELS_BACKEND")
    if forced:
        lines.append(f"GUIDANCE_KERNELS_BACKEND={forced} forces these backends")
    return "\n".join(lines)


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark every op at real diffusion shapes (the main job)")
    bench.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    bench.add_argument("--quick", action="store_true", default=None, help="fewer repetitions (default on CPU)")
    bench.add_argument("--full", dest="quick", action="store_false", help="more repetitions (default on GPU)")
    bench.add_argument("--shapes", choices=["real", "small", "tiny"],
                       help="case sizes (default: real on a GPU, small on a CPU)")
    bench.add_argument("--smoke", dest="shapes", action="store_const", const="tiny",
                       help="tiny odd shapes, every provider called once, no torch.compile: checks that everything "
                            "runs (times are meaningless)")
    bench.add_argument("--compile", choices=["all", "goals", "none"],
                       help="which cases time torch.compile(reference) (default: all with --full, only where a goal "
                            "uses it when quick, none for tiny shapes)")
    bench.add_argument("--ops", help="comma-separated op stems or families to run (default: all)")
    bench.add_argument("--out", default="bench-out",
                       help="directory for the JSON, table and PNG (default: %(default)s)")
    bench.add_argument("--stem", help="file name stem of the outputs (default: bench-<device>)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guidance_kernels",
                                     description="Fused guidance kernels for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CUDA extension status and each op's backends per dtype")
    _bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from guidance_kernels import bench

    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    unknown = sorted(set(ops or ()) - set(bench.known_names()))
    if unknown:
        parser.error(f"--ops: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(bench.known_names())})")
    run = bench.run(device=args.device, quick=args.quick, ops=ops, out_dir=args.out, shapes=args.shapes,
                    compile=args.compile, stem=args.stem)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())

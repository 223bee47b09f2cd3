"""Command line: ``python -m guidance_kernels info`` and ``python -m guidance_kernels bench``."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

import guidance_kernels
from guidance_kernels import _extension, backends


def info() -> str:
    lines = [f"guidance_kernels {guidance_kernels.__version__}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if importlib.util.find_spec("triton") is not None:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if backends.triton_interpreter() else ""))
    else:
        lines.append("triton: not installed")
    cuda = torch.cuda.is_available()
    if cuda:
        lines.append(f"GPU: {torch.cuda.get_device_name()} (compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU: none visible")
    why = _extension.unavailable_reason()
    archs = _extension.compiled_archs()
    lines.append("_C: " + ("built" + (f" for {', '.join(archs)}" if archs else "") if why is None else why))
    device = "cuda" if cuda else "cpu"
    lines.append(f"backends per op on {device} (priority order; fastest measured first):")
    for dtype in (torch.bfloat16,):
        for op in backends.registered_ops():
            req = backends.Request(device, None if device == "cpu" else torch.cuda.current_device(), dtype)
            lines.append(f"  {op:<26} {backends.explain(op, req)}")
    forced = backends._ENV_FORCED
    if forced:
        lines.append(f"{backends.ENV_VAR} forces: {forced}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guidance_kernels",
                                     description="Fused guidance kernels for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CUDA extension status and usable backends per op")
    bench = sub.add_parser("bench", help="benchmark every op at real diffusion shapes (the main job)")
    bench.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    bench.add_argument("--quick", action="store_true", default=None, help="fewer repetitions (default on CPU)")
    bench.add_argument("--full", dest="quick", action="store_false", help="more repetitions (default on GPU)")
    bench.add_argument("--ops", help="comma-separated op stems or families to run (default: all)")
    bench.add_argument("--out", default="bench-out", help="directory for the JSON, table and PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from guidance_kernels import bench as bench_module

    ops = [o.strip() for o in args.ops.split(",")] if args.ops else None
    bench_module.run(device=args.device, quick=args.quick, ops=ops, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

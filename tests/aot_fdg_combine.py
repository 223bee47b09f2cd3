"""AOT-compile cases for fdg_combine's Triton launcher (see tests/triton_aot.py): every kernel and
specialisation it launches — one, two and three levels, with and without the cond pyramid's
statistics, data and frequency rescale, tensor scales, 16-bit inputs, channels-last and video."""

import torch

from guidance_kernels._library import FdgCombineArgs
from guidance_kernels.triton import fdg_combine as K


def _case(dtype, levels, *, stats=False, rescale="none", tensors=False, layout="contiguous", shape=(2, 4, 64, 64)):
    def case():
        pred = torch.zeros(2 * shape[0], *shape[1:], dtype=dtype)
        if layout == "channels_last":
            pred = pred.contiguous(memory_format=torch.channels_last)
        scale = torch.ones(shape[0]) if tensors else None
        scales = [5.0] * levels
        weights = [0.5 if stats else 1.0] * levels
        space = "freq" if rescale == "freq" else "data"
        phi = [0.7] * (levels if rescale == "freq" else 1) if rescale != "none" else [0.0]
        K.fdg_combine(FdgCombineArgs([pred], 2, 1, 0, scales, [scale] * levels, weights, phi, [None] * len(phi), space,
                                     False))
    return case


CASES = []
for _dtype in (torch.float32, torch.float16, torch.bfloat16):
    for _levels in (1, 2, 3):
        CASES.append((f"fdg-{_dtype}-{_levels}", _case(_dtype, _levels)))
        CASES.append((f"fdg-{_dtype}-{_levels}-stats", _case(_dtype, _levels, stats=True, tensors=True)))
    CASES.append((f"fdg-{_dtype}-freq", _case(_dtype, 2, rescale="freq")))
    CASES.append((f"fdg-{_dtype}-data-channels_last", _case(_dtype, 2, rescale="data", layout="channels_last")))
    CASES.append((f"fdg-{_dtype}-video", _case(_dtype, 2, shape=(1, 16, 5, 90, 160))))

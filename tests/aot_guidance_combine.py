"""AOT-compile cases for the combine family's Triton launchers (see tests/triton_aot.py)."""

import torch

from guidance_kernels._library import (ApgCombineArgs, ApgCombineMomentumArgs, CfgNormCombineArgs,
                                      CfgZeroStarCombineArgs, GuidanceCombineArgs, MagCombineArgs, MahiroCombineArgs,
                                      TcfgCombineArgs)
from guidance_kernels.triton import guidance_combine as K


def _pred(dtype, layout="contiguous", k=3, shape=(2, 4, 64, 64)):
    x = torch.zeros(k * shape[0], *shape[1:], dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _split(x, k):
    return [x], k


def _combine(dtype, layout, rescale, tensor_scale):
    def case():
        preds, k = _split(_pred(dtype, layout), 3)
        scale = torch.ones(2) if tensor_scale else None
        K.guidance_combine(GuidanceCombineArgs(preds, k, 0, [1, 1], [0, 2], [7.5, 3.0], [scale, None], rescale,
                                               torch.ones(1) if rescale and tensor_scale else None, 1))
    return case


def _projected(dtype, kind, momentum=False, original=False):
    def case():
        preds, k = _split(_pred(dtype, k=2), 2)
        if kind == "apg" and momentum:
            buf = torch.zeros(2, 4, 64, 64)
            K.apg_combine(ApgCombineMomentumArgs(preds, k, 1, 0, 5.0, None, 0.5, 15.0, -0.5, buf, "diffusers", 0.7,
                                                 None))
        elif kind == "apg":
            K.apg_combine(ApgCombineArgs(preds, k, 1, 0, 5.0, None, 0.5, 15.0, "diffusers", 0.7, None))
        elif kind == "apg-mix-cfg":
            buf = torch.zeros(2, 4, 64, 64)
            K.apg_combine(ApgCombineMomentumArgs(preds, k, 1, 0, 3.5, None, 1.0, 0.0, -0.5, buf, "cfg", 0.0, None))
        elif kind == "tcfg":
            K.tcfg_combine(TcfgCombineArgs(preds, k, 1, 0, 5.0, torch.ones(2), original, 0.7, None))
        elif kind == "mag":
            K.mag_combine(MagCombineArgs(preds, k, 1, 0, 5.0, torch.ones(2), 8.0, original, 0.7, None))
        else:
            K.cfg_zero_star_combine(CfgZeroStarCombineArgs(preds, k, 1, 0, 5.0, torch.ones(2), False, 0.7, None))
    return case


def _channel(dtype, layout, kind):
    def case():
        preds, k = _split(_pred(dtype, layout), 3)
        terms = (preds, k, 0, [1, 1], [0, 2], [0.0, 3.0], [torch.ones(2), None])
        if kind == "cfg_norm":
            K.guidance_combine_cfg_norm(CfgNormCombineArgs(*terms, 1.0, None, 1))
        else:
            K.guidance_combine_mahiro(MahiroCombineArgs(*terms))
    return case


CASES = []
for _dtype in (torch.float32, torch.float16, torch.bfloat16):
    for _layout in ("contiguous", "channels_last"):
        CASES.append((f"combine-{_dtype}-{_layout}", _combine(_dtype, _layout, 0.0, False)))
    CASES.append((f"combine-rescale-{_dtype}", _combine(_dtype, "contiguous", 0.7, True)))
    CASES.append((f"apg-{_dtype}", _projected(_dtype, "apg", False)))
    CASES.append((f"apg-momentum-{_dtype}", _projected(_dtype, "apg", True)))
    CASES.append((f"cfg0-{_dtype}", _projected(_dtype, "cfg0", False)))
    CASES.append((f"apg-mix-cfg-{_dtype}", _projected(_dtype, "apg-mix-cfg", True)))
    for _original in (False, True):
        CASES.append((f"tcfg-{_dtype}-original={_original}", _projected(_dtype, "tcfg", original=_original)))
        CASES.append((f"mag-{_dtype}-original={_original}", _projected(_dtype, "mag", original=_original)))
    for _layout in ("contiguous", "channels_last"):
        for _kind in ("cfg_norm", "mahiro"):
            CASES.append((f"{_kind}-{_dtype}-{_layout}", _channel(_dtype, _layout, _kind)))

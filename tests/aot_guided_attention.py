"""AOT-compile cases for guided_attention's Triton launchers (see tests/triton_aot.py).

The main kernel is compiled in the variants its flags select — "mixed": [none, identity, blur,
σ=∞] without text (V copy, blurred queries, broadcast mean rows); "joint": the same batch with
text tokens (joint PAG instead of the copy); "plain": attention only — with the blur and σ = ∞
pre-pass kernels launched alongside. Every head dim the kernels serve (40, 64, 80, 128, 160) is
compiled in bfloat16 in the two perturbed variants with each target's default tile config, and
every other tuning candidate of that target's table (:func:`attention_configs`: sm_80 and sm_90
differ) in the register-heaviest ("joint") variant; the
"plain" and one "joint" case also with K/V through TMA descriptors (sm_90 only: TMA is
Hopper's). float16 compiles to the same code as bfloat16 (a full sweep gave identical register
counts in every variant), so it covers the tightest cases only; float32 (IEEE dots, separate
tiles) covers its configurations; the triton_sdpa route (main kernel for the identity and σ = ∞
items only) runs once. The set is kept small: a cold compile costs ~2 s per kernel and target on
a CI core.
"""

import torch

from guidance_kernels._library import GuidedAttentionArgs
from guidance_kernels._spec import Mode
from guidance_kernels.triton import guided_attention as K

MIXED = [int(m) for m in (Mode.NONE, Mode.IDENTITY, Mode.BLUR, Mode.MEAN)]
PLAIN = [int(Mode.NONE)] * 2
JOINT_TEXT = 16
HOPPER = ("sm_90",)  # TMA descriptors: the launcher uses them on sm_90+ only


def _args(dtype, d, modes, text_tokens, heads=2, grid=(8, 8)):
    n = grid[0] * grid[1] + text_tokens
    # (B, N, heads, d) memory seen as (B, heads, N, d): how diffusers processors hold q, k, v
    q, k, v = (torch.zeros(len(modes), n, heads, d, dtype=dtype).transpose(1, 2) for _ in range(3))
    sigmas = [1.0 if m == Mode.BLUR else 0.0 for m in modes]
    sizes = [7 if m == Mode.BLUR else 0 for m in modes]
    return GuidedAttentionArgs(q, k, v, modes, sigmas, sizes, grid[0], grid[1], text_tokens, False, d ** -0.5, "bhnd")


def _attention(dtype, d, modes, text_tokens, route=K.guided_attention):
    def case():
        route(_args(dtype, d, modes, text_tokens))
    return case


def _config(dtype, d, modes, text_tokens, config, tma):
    """The main kernel with one given tile config (and TMA descriptors when ``tma``), after the
    pre-passes, as the tuner launches it."""
    def case():
        a = _args(dtype, d, modes, text_tokens)
        out = K.attention_out(a.q, a.layout)
        codes = K.work_codes(a.modes, a.text_tokens)
        slots, qb, part, n_part = K._prepare(a)
        K._launch(a, out, codes, slots, qb, part, n_part, config, tma=tma)
    return case


CASES = [("plain-bf16-d64", _attention(torch.bfloat16, 64, PLAIN, 0)),
         ("sdpa-bf16-d64", _attention(torch.bfloat16, 64, MIXED, 0, route=K.guided_attention_sdpa))]
for _d in (40, 64, 80, 128, 160):
    CASES.append((f"mixed-bf16-d{_d}", _attention(torch.bfloat16, _d, MIXED, 0)))
    CASES.append((f"joint-bf16-d{_d}", _attention(torch.bfloat16, _d, MIXED, JOINT_TEXT)))
    for _arch, _label in (((8, 0), "sm_80"), ((9, 0), "sm_90")):  # each generation's own table
        for _config_ in K.attention_configs(_d, torch.bfloat16, _arch)[1:]:
            CASES.append((f"candidate-{_label}-{'x'.join(map(str, _config_))}-joint-bf16-d{_d}",
                          _config(torch.bfloat16, _d, MIXED, JOINT_TEXT, _config_, False), (_label,)))
for _d in (64, 160):
    CASES.append((f"tma-plain-bf16-d{_d}",
                  _config(torch.bfloat16, _d, PLAIN, 0, K.attention_configs(_d, torch.bfloat16, (9, 0))[0], True),
                  HOPPER))
CASES.append(("tma-joint-bf16-d128",
              _config(torch.bfloat16, 128, MIXED, JOINT_TEXT, K.attention_configs(128, torch.bfloat16, (9, 0))[0],
                      True), HOPPER))
for _d in (40, 128):
    CASES.append((f"joint-fp16-d{_d}", _attention(torch.float16, _d, MIXED, JOINT_TEXT)))
# float32 with head dim > 128 is not served by the triton backend on CUDA (it spills).
for _d in (40, 64, 128):
    CASES.append((f"joint-fp32-d{_d}", _attention(torch.float32, _d, MIXED, JOINT_TEXT)))
CASES.append(("mixed-fp32-d64", _attention(torch.float32, 64, MIXED, 0)))

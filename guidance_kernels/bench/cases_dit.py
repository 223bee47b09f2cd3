"""Benchmark cases of guidance on diffusion transformers: per-step time of guided denoising.

GPU (bf16), random weights in the real configurations: ``FluxTransformer2DModel`` (Flux.1-dev:
19 double- + 38 single-stream blocks, 3072 wide, guidance embedding) at 1024×1024 (4096 image
tokens, 512 text tokens), and ``WanTransformer3DModel`` 2.1 T2V 1.3B (30 blocks, 1536 wide) at
480p × 33 frames (latent 9×60×104: 14 040 video tokens, 512 text tokens). Batch 1.

Per model and guidance combination (CFG + PAG / SEG σ=∞ / SLG, and all three), providers:

* ``CFG-only step``: the stock model on [uncond, cond] and the CFG combine — the baseline;
* ``per-branch path``: one model call per branch with the perturbation installed for its call,
  what diffusers' guiders do (``GuidedDenoiser(per_branch=True)``);
* ``one forward, full batch`` and ``one forward, forked``: every branch in one batched call,
  the perturbed branches computed from their first perturbed block on (forked) or from the start.

The speed-up column is against the CFG-only step (its inverse is the step's cost ratio). Each
case's name carries the FLOP limit of the forked step: its FLOPs over the CFG-only step's,
counted on the meta device with ``torch.utils.flop_counter`` (the reference formulations, so
identity attention with text tokens counts a full masked attention) — the ratio a step reaches
when the GPU is compute-bound and the extra launches cost nothing.

CPU: the same cases on tiny configurations, so the family runs everywhere (the ratios then mostly
show batching overheads, not GPU behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .harness import Case, Provider, Setup, dtype_name

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
WAN_2_1_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6)
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=64, num_layers=6, rope_max_seq_len=64)


@dataclass(frozen=True)
class _Spec:
    """One benchmarked model: its class, configuration, inputs and guidance combinations."""

    name: str
    cls: str
    config: dict
    inputs: Callable  # (device, dtype) -> (sample, timestep, cond kwargs, uncond kwargs, model_kwargs, token_grid)
    combos: dict  # label -> (GuidedDenoiser options, call scales)


def _flux_inputs(side: int, text: int, width: int, pooled: int, channels: int):
    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0) if device.type != "meta" else None
        rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
        ids = torch.zeros(side, side, 3, device=device, dtype=dtype)
        if device.type != "meta":
            ids[..., 1] = torch.arange(side, device=device)[:, None]
            ids[..., 2] = torch.arange(side, device=device)[None, :]
        cond = {"encoder_hidden_states": rand(1, text, width), "pooled_projections": rand(1, pooled)}
        uncond = {"encoder_hidden_states": rand(1, text, width), "pooled_projections": rand(1, pooled)}
        kw = {"img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
              "guidance": torch.full((1,), 3.5, device=device, dtype=dtype)}
        t = torch.full((1,), 0.5, device=device)
        return rand(1, side * side, channels), t, cond, uncond, kw, (side, side)

    return make


def _wan_inputs(frames: int, height: int, width: int, text: int, text_dim: int, channels: int):
    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0) if device.type != "meta" else None
        rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
        cond = {"encoder_hidden_states": rand(1, text, text_dim)}
        uncond = {"encoder_hidden_states": rand(1, text, text_dim)}
        t = torch.full((1,), 500.0, device=device)
        return rand(1, channels, frames, height, width), t, cond, uncond, {}, None

    return make


def _combos(pag, seg, slg) -> dict:
    p, q, r = 3.0, 3.0, 2.8
    return {f"CFG+PAG {pag}": (dict(pag_layers=pag), dict(pag_scale=p)),
            f"CFG+SEG inf {seg}": (dict(seg_layers=seg), dict(seg_scale=q)),
            f"CFG+SLG {slg}": (dict(slg_layers=slg), dict(slg_scale=r)),
            "CFG+PAG+SEG+SLG": (dict(pag_layers=pag, seg_layers=seg, slg_layers=slg),
                                dict(pag_scale=p, seg_scale=q, slg_scale=r))}


def _specs(gpu: bool) -> list[_Spec]:
    if gpu:
        flux = _Spec("Flux.1-dev 1024px", "FluxTransformer2DModel", FLUX_DEV, _flux_inputs(64, 512, 4096, 768, 64),
                     _combos("blocks.1", "blocks.1", [7, 8, 9]))
        wan = _Spec("Wan 2.1 1.3B 480p x 33 frames", "WanTransformer3DModel", WAN_2_1_1_3B,
                    _wan_inputs(9, 60, 104, 512, 4096, 16), _combos("blocks.8", "blocks.8", [8]))
    else:
        flux = _Spec("Flux tiny", "FluxTransformer2DModel", TINY_FLUX, _flux_inputs(16, 32, 32, 16, 16),
                     _combos("blocks.1", "blocks.1", [1]))
        wan = _Spec("Wan tiny", "WanTransformer3DModel", TINY_WAN, _wan_inputs(5, 16, 16, 32, 16, 4),
                    _combos("blocks.2", "blocks.2", [2]))
    return [flux, wan]


def _build(cls_name: str, config: dict, device: torch.device, dtype: torch.dtype):
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of 12B parameters on a CPU takes minutes
        model = getattr(diffusers, cls_name)(**config)
    model = model if dtype == torch.float32 else model.to(dtype)
    return model.eval().requires_grad_(False)


class _Installed:
    """One GuidedDenoiser installed at a time, switched only when another provider starts:
    installation is a one-off cost users do not pay per step."""

    def __init__(self):
        self.key, self.den = None, None

    def use(self, key, make):
        if key != self.key:
            if self.den is not None:
                self.den.remove()
            self.den, self.key = make(), key
        return self.den


def _call(den, sample, t, cond, uncond, kw, grid, scales):
    negative = {f"negative_{k}": v for k, v in uncond.items()}
    return den(sample, t, **cond, **negative, model_kwargs=kw, token_grid=grid, **scales)


def step_flops(spec: _Spec, dtype: torch.dtype, options: dict, scales: dict) -> int:
    """FLOPs of one forked guided step (CFG with ``scales``' branches), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..integrations import diffusers as gkd

    meta = torch.device("meta")
    model = _build(spec.cls, spec.config, meta, dtype)
    sample, t, cond, uncond, kw, grid = spec.inputs(meta, dtype)
    with gkd.GuidedDenoiser(model, reference=True, **options) as den, FlopCounterMode(display=False) as counter:
        _call(den, sample, t, cond, uncond, kw, grid, dict(guidance_scale=5.0, **scales))
    return counter.get_total_flops()


def _spec_cases(spec: _Spec, device: torch.device, dtype: torch.dtype) -> list[Case]:
    from ..integrations import diffusers as gkd

    model = _build(spec.cls, spec.config, device, dtype)
    sample, t, cond, uncond, kw, grid = spec.inputs(device, dtype)
    installed = _Installed()
    s = torch.tensor(5.0, device=device)

    def cfg_only():
        installed.use("stock", lambda: None)
        x = torch.cat([sample] * 2)
        ehs = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])
        extra = {k: torch.cat([uncond[k], cond[k]]) for k in cond if k != "encoder_hidden_states"}
        if "guidance" in kw:
            extra["guidance"] = torch.cat([kw["guidance"]] * 2)
        shared = {k: v for k, v in kw.items() if k != "guidance"}
        u, c = model(hidden_states=x, timestep=torch.cat([t] * 2), encoder_hidden_states=ehs, **extra, **shared,
                     return_dict=False)[0].chunk(2)
        return u + s * (c - u)

    def guided(label, options, scales, **mode):
        scales = {k: torch.tensor(v, device=device) for k, v in scales.items()}

        def run():
            den = installed.use((label, tuple(sorted(mode.items()))),
                                lambda: gkd.GuidedDenoiser(model, **options, **mode))
            return _call(den, sample, t, cond, uncond, kw, grid, dict(guidance_scale=s, **scales))

        return run

    cases = []
    shape = "x".join(str(d) for d in sample.shape)
    cfg_flops = step_flops(spec, dtype, {}, {})
    for label, (options, scales) in spec.combos.items():
        limit = step_flops(spec, dtype, options, scales) / cfg_flops
        providers = [Provider("CFG-only step", cfg_only),
                     Provider("per-branch path", guided(label, options, scales, per_branch=True), ours=True),
                     Provider("one forward, full batch", guided(label, options, scales, fork=False), ours=True),
                     Provider("one forward, forked", guided(label, options, scales, fork=True), ours=True)]
        cases.append(Case(op="dit", name=f"{spec.name} {label} (FLOP limit {limit:.2f}x the CFG-only step)",
                          shape=shape, dtype=dtype_name(dtype), providers=providers,
                          baseline="CFG-only step", compare_to="per-branch path"))
    installed.use("stock", lambda: None)
    return cases


# The op stems these cases time (bench --ops filters on them).
OPS = ["dit"]
REQUIRES = ("diffusers",)


def cases(setup: Setup) -> list[Case]:
    specs = _specs(setup.shapes == "real")
    if setup.smoke:  # one case per model: the combination that runs every perturbation
        specs = [replace(s, combos={k: v for k, v in s.combos.items() if k == "CFG+PAG+SEG+SLG"}) for s in specs]
    return [case for spec in specs for case in _spec_cases(spec, setup.device, setup.dtype)]

"""Benchmark cases of the modular-pipeline guiders: diffusers' guider vs ours on one pipeline.

The pipeline is diffusers' modular SDXL core denoise step (``StableDiffusionXLCoreDenoiseStep``:
the denoise loop, its scheduler steps and its guider calls) with random weights — on a GPU the
SDXL UNet in its real configuration at 1024×1024 in bf16, on a CPU the tiny UNet of
:mod:`.cases_diffusers` — from precomputed prompt embeddings to latents. A provider runs
:data:`STEPS` steps; the table's per-step lines divide by them. Guidance combinations:

* ``CFG``: diffusers' ``ClassifierFreeGuidance`` (two UNet calls per step) vs ours (one);
* ``CFG+PAG mid``: diffusers' ``PerturbedAttentionGuidance`` (three calls, hooks swapped between
  them) vs ours (one call, PAG forked at the mid block);
* ``CFG+PAG+SEG mid``: diffusers has no guider running both; its closest, the PAG guider (three
  calls, no SEG), is the baseline, against our ``PerturbedGuidance`` running all four branches in
  one call.

Both guiders follow diffusers' intervals: the perturbed branches are off at step 0 (its strict
``start < step``), so a run's first step is CFG alone in every provider.
"""

from __future__ import annotations

import torch

from .cases_diffusers import SDXL_UNET, TINY_UNET
from .harness import Case, Provider, Rows, Setup, dtype_name

OPS = ["guiders"]
REQUIRES = ("diffusers",)
STEPS = 3
MID = "mid_block.attentions.0.transformer_blocks"
THEIRS, OURS = "diffusers' guider", "ours (one UNet call per step)"


def _pipeline(unet, guider):
    from diffusers import EulerDiscreteScheduler
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep)

    blocks = StableDiffusionXLCoreDenoiseStep()
    _quiet(blocks)
    pipe = blocks.init_pipeline()
    pipe.update_components(unet=unet, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"), guider=guider)
    return pipe


def _quiet(blocks) -> None:
    """No progress bar in any loop block (the pipeline's own setter reaches its top-level blocks only)."""
    for block in getattr(blocks, "sub_blocks", {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        _quiet(block)


def _inputs(config: dict, device, dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    width = config["cross_attention_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    side = 8 * config["sample_size"]  # pixels: the VAE's factor 8
    return dict(prompt_embeds=rand(1, 77, width), negative_prompt_embeds=rand(1, 77, width),
                pooled_prompt_embeds=rand(1, pooled), negative_pooled_prompt_embeds=rand(1, pooled), height=side,
                width=side)


def _guiders(mid_layers: int) -> dict:
    """label -> {provider: guider factory}."""
    from diffusers import guiders as theirs
    from diffusers.hooks import LayerSkipConfig

    from ..integrations.diffusers import guiders as ours

    def pag(module):
        config = LayerSkipConfig(list(range(mid_layers)), fqn=MID, skip_attention=False, skip_attention_scores=True,
                                 skip_ff=False)
        return module.PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0,
                                                 perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                                 perturbed_guidance_config=config)

    return {"CFG": {THEIRS: lambda: theirs.ClassifierFreeGuidance(guidance_scale=5.0),
                    OURS: lambda: ours.ClassifierFreeGuidance(guidance_scale=5.0)},
            "CFG+PAG mid": {THEIRS: lambda: pag(theirs), OURS: lambda: pag(ours)},
            "CFG+PAG+SEG mid": {"diffusers' PAG guider (no SEG)": lambda: pag(theirs),
                                OURS: lambda: ours.PerturbedGuidance(guidance_scale=5.0, pag_scale=3.0,
                                                                     pag_layers="mid", seg_scale=3.0,
                                                                     seg_layers="mid")}}


def _per_step(rows: Rows) -> list[str]:
    return [f"  {name:<34} {row.ms / STEPS:9.2f} ms per step" for name, row in rows.items() if row.ms]


def cases(setup: Setup) -> list[Case]:
    import diffusers

    config = SDXL_UNET if setup.shapes == "real" else TINY_UNET
    if setup.smoke:  # odd and small: a 12x12 latent (mid block 6x6)
        config = dict(config, sample_size=12)
    torch.manual_seed(0)
    with torch.device(setup.device):
        unet = diffusers.UNet2DConditionModel(**config)
    unet = unet.to(setup.dtype).eval().requires_grad_(False)
    inputs = _inputs(config, setup.device, setup.dtype)
    mid_layers = len(unet.mid_block.attentions[0].transformer_blocks)
    combos = _guiders(mid_layers)
    if setup.smoke:
        combos = {k: v for k, v in combos.items() if k == "CFG+PAG+SEG mid"}
    latent = config["sample_size"]
    shape = f"1x4x{latent}x{latent}"
    out = []
    for label, providers in combos.items():
        def run(pipe):
            return lambda: pipe(**inputs, num_inference_steps=STEPS, output="latents")

        timed = [Provider(name, run(_pipeline(unet, make())), ours=name == OURS) for name, make in providers.items()]
        out.append(Case(op="guiders", name=f"SDXL UNet modular pipeline {label} ({STEPS} steps)", shape=shape,
                        dtype=dtype_name(setup.dtype), providers=timed, baseline=timed[0].name, report=_per_step))
    return out

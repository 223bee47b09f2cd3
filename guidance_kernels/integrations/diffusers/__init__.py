"""guidance_kernels as a backend for diffusers (optional dependency: this module imports diffusers).

Two ways in:

* ``enable(pipe)`` — for diffusers' own PAG pipelines (StableDiffusionPAGPipeline,
  StableDiffusionXLPAGPipeline, StableDiffusion3PAGPipeline, …): installs guidance_kernels'
  processors in place of diffusers' PAG processors, keeping the pipeline's layer choice
  (``pag_applied_layers``), matched exactly (``"blocks.1"`` never selects ``blocks.10``).

      pipe = StableDiffusionXLPAGPipeline.from_pretrained(..., pag_applied_layers=["mid"])
      guidance_kernels.integrations.diffusers.enable(pipe)
      image = pipe(prompt, guidance_scale=7.0, pag_scale=3.0).images[0]

* :class:`GuidedDenoiser` — for custom loops and for pipelines without PAG support: CFG, PAG,
  SEG, SLG / STG and SAG branches in one forward (perturbed branches forked from cond at their
  first perturbed block), combined by guidance_combine / apg_combine / cfg_zero_star_combine, for
  SD1.5 / SDXL UNets and the SD3 / SD3.5, Flux, Wan, LTX-Video and HunyuanVideo transformers.

      den = GuidedDenoiser(unet, pag_layers=["mid"], seg_layers=["mid"], sag=True, scheduler=scheduler)
      noise = den(latents, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                  added_cond_kwargs=cond_kw, negative_added_cond_kwargs=uncond_kw,
                  guidance_scale=7.5, pag_scale=3.0, seg_scale=3.0, sag_scale=0.75)

      den = GuidedDenoiser(wan, pag_layers="blocks.8", slg_layers=[9], seg_layers="blocks.8")
      noise = den(latents, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                  guidance_scale=5.0, pag_scale=1.0, slg_scale=1.0, seg_scale=1.0)
"""

from __future__ import annotations

import types

import torch

from .denoiser import SAG_LAYER, GuidedDenoiser
from .dit_processors import (
    GuidedFluxAttnProcessor,
    GuidedHunyuanVideoAttnProcessor,
    GuidedLTXAttnProcessor,
    GuidedWanAttnProcessor,
)
from .fork import BranchPlan, ForwardState, install_routers, plan_branches
from .layers import select_blocks, select_layers, self_attention_layers, top_level_blocks
from .models import SUPPORTED
from .ops import FUSED, REFERENCE, Ops
from .parallel import BranchParallel, BranchParallelError
from .processors import (
    GuidedAttnProcessor,
    GuidedJointAttnProcessor,
    PAGCFGIdentityAttnProcessor,
    PAGCFGJointAttnProcessor,
    PAGIdentityAttnProcessor,
    PAGJointAttnProcessor,
)

__all__ = [
    "enable",
    "GuidedDenoiser",
    "BranchParallel",
    "BranchParallelError",
    "SAG_LAYER",
    "SUPPORTED",
    "select_layers",
    "select_blocks",
    "self_attention_layers",
    "top_level_blocks",
    "BranchPlan",
    "ForwardState",
    "plan_branches",
    "install_routers",
    "Ops",
    "FUSED",
    "REFERENCE",
    "GuidedAttnProcessor",
    "GuidedJointAttnProcessor",
    "GuidedFluxAttnProcessor",
    "GuidedWanAttnProcessor",
    "GuidedLTXAttnProcessor",
    "GuidedHunyuanVideoAttnProcessor",
    "PAGCFGIdentityAttnProcessor",
    "PAGIdentityAttnProcessor",
    "PAGCFGJointAttnProcessor",
    "PAGJointAttnProcessor",
]


def _denoiser(pipe) -> torch.nn.Module:
    model = getattr(pipe, "unet", None)
    if model is None:
        model = getattr(pipe, "transformer", None)
    if model is None:
        raise TypeError(f"enable: pipe: {type(pipe).__name__} has neither a unet nor a transformer")
    return model


def enable(pipe, *, exact_layers: bool = True):
    """Make a diffusers PAG pipeline use guidance_kernels' PAG processors. Returns ``pipe``.

    The pipeline keeps its ``pag_applied_layers``; with ``exact_layers`` (default) they are resolved
    by :func:`select_layers` (exact module-name prefixes) instead of diffusers' regular-expression
    search, which also matches e.g. ``blocks.10`` for ``blocks.1``."""
    if not hasattr(pipe, "set_pag_applied_layers") or not hasattr(pipe, "_set_pag_attn_processor"):
        raise TypeError(f"enable: pipe: {type(pipe).__name__} is not a diffusers PAG pipeline "
                        "(use GuidedDenoiser for other pipelines)")
    model = _denoiser(pipe)
    joint = any(getattr(m, "add_q_proj", None) is not None for m in self_attention_layers(model).values())
    processors = (PAGCFGJointAttnProcessor(), PAGJointAttnProcessor()) if joint else (
        PAGCFGIdentityAttnProcessor(), PAGIdentityAttnProcessor())
    pipe.set_pag_applied_layers(pipe.pag_applied_layers, pag_attn_processors=processors)
    if exact_layers:
        select_layers(model, pipe.pag_applied_layers)  # fail now, not at the first call, on a bad selector
        pipe._set_pag_attn_processor = types.MethodType(_set_pag_attn_processor_exact, pipe)
    return pipe


def _set_pag_attn_processor_exact(self, pag_applied_layers, do_classifier_free_guidance):
    """diffusers' PAGMixin._set_pag_attn_processor with exact layer selection."""
    model = _denoiser(self)
    processor = self._pag_attn_processors[0 if do_classifier_free_guidance else 1]
    attention = self_attention_layers(model)
    for name in select_layers(model, pag_applied_layers):
        attention[name].processor = processor

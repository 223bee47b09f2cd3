"""diffusers' modular guiders, batched and fused: ``pipe.update_components(guider=ours)``.

diffusers 0.42's modular pipelines (``diffusers.modular_pipelines``) guide through guider objects
that call the denoiser once per branch and swap hooks between the calls. These guiders take the
same constructor arguments and config as diffusers' classes of the same names, and run every
active branch of a step in ONE batched model call — perturbed branches forked from the cond branch
at their first perturbed block (:class:`~..denoiser.GuidedDenoiser`) — combined by the fused ops::

    from guidance_kernels.integrations.diffusers import guiders
    from diffusers.hooks import LayerSkipConfig

    pipe.update_components(guider=guiders.PerturbedAttentionGuidance(
        guidance_scale=5.0, perturbed_guidance_scale=3.0,
        perturbed_guidance_config=LayerSkipConfig([0], fqn="mid_block.attentions.0.transformer_blocks",
                                                  skip_attention=False, skip_attention_scores=True,
                                                  skip_ff=False)))
    latents = pipe(prompt_embeds=..., ..., output="latents")

=====================================  ===========================================================
guider                                 its batch per step (the branches that are on)
=====================================  ===========================================================
ClassifierFreeGuidance                 [uncond, cond]
AdaptiveProjectedGuidance              [uncond, cond] → apg_combine (momentum buffer kept here)
ClassifierFreeZeroStarGuidance         [uncond, cond] → cfg_zero_star_combine ([cond] at zero-init)
TangentialClassifierFreeGuidance       [uncond, cond] → tcfg_combine
MagnitudeAwareGuidance                 [uncond, cond] → mag_combine
FrequencyDecoupledGuidance             [uncond, cond] → fdg_combine
PerturbedAttentionGuidance             [uncond, cond, pag] (pag forked at its first layer)
SmoothedEnergyGuidance                 [uncond, cond, seg]
SkipLayerGuidance                      [uncond, cond, slg]
AutoGuidance (dropout = 1)             [cond, weak] (not forked)
PerturbedGuidance (ours)               [uncond, cond, pag, seg, slg] in one forked forward
=====================================  ===========================================================

Serves the model classes of :data:`..models.SUPPORTED` (SDXL / SD1.5 UNets, SD3 / SD3.5, Flux,
Wan, LTX-Video, HunyuanVideo) in the modular denoise loops that call ``prepare_models`` before the
model and read the model inputs from the guider's batch (every loop diffusers 0.42 ships except
ControlNet's, whose ControlNet would get the batched conditioning with unbatched latents).
See docs/guiders.md for the semantics and where they differ from diffusers' guiders.
"""

from .batch import BatchedGuidance, Branch
from .classes import (
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    PerturbedGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
)

__all__ = [
    "BatchedGuidance",
    "Branch",
    "ClassifierFreeGuidance",
    "AdaptiveProjectedGuidance",
    "ClassifierFreeZeroStarGuidance",
    "TangentialClassifierFreeGuidance",
    "MagnitudeAwareGuidance",
    "FrequencyDecoupledGuidance",
    "PerturbedAttentionGuidance",
    "SmoothedEnergyGuidance",
    "SkipLayerGuidance",
    "AutoGuidance",
    "PerturbedGuidance",
]

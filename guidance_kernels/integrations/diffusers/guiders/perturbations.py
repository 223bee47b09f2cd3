"""diffusers' perturbation configs (``LayerSkipConfig``, ``SmoothedEnergyGuidanceConfig``) as
:class:`~..denoiser.GuidedDenoiser` branches and layer selectors.

==========================================================  ==================================
``LayerSkipConfig``                                         branch (GuidedDenoiser)
==========================================================  ==================================
``skip_attention_scores=True`` (PAG)                        ``"pag"``: identity attention
``skip_attention=True, skip_ff=True`` (SLG, the default)    ``"slg"``, ``slg_skip="block"``
``skip_attention=True, skip_ff=False``                      ``"slg"``, ``slg_skip="attention"``
``skip_attention=False, skip_ff=True``                      ``"slg"``, ``slg_skip="ff"``
==========================================================  ==================================

``indices`` are blocks of the block list ``fqn``: ``fqn="blocks", indices=[7]`` selects
``blocks.7`` exactly (:mod:`..layers`). ``fqn="auto"`` is the model's first block list
(``transformer_blocks`` / ``blocks``); diffusers picks it from an unordered set of names, which
for Flux and HunyuanVideo (two block lists) depends on the interpreter's hash seed. UNets have no
block list: give the fqn, e.g. ``"mid_block.attentions.0.transformer_blocks"``. ``dropout < 1``
(a random dropout of the skipped output) cannot be reproduced by a batched forward and is refused.
"""

from __future__ import annotations

import math

from ..models import Family
from guidance_kernels._spec import SEG_INF_SIGMA


def as_list(configs) -> list:
    if configs is None:
        return []
    return list(configs) if isinstance(configs, (list, tuple)) else [configs]


def skip_kind(fn: str, arg: str, configs) -> tuple[str, str]:
    """(branch kind, slg_skip mode) of a guider's ``LayerSkipConfig`` list."""
    kinds = set()
    for config in as_list(configs):
        if not math.isclose(config.dropout, 1.0):
            raise ValueError(f"{fn}: {arg}: dropout={config.dropout} drops the skipped outputs at random, which a "
                             "batched forward cannot reproduce; use dropout=1.0 (skip)")
        if config.skip_attention_scores and (config.skip_attention or config.skip_ff):
            raise ValueError(f"{fn}: {arg}: skip_attention_scores with skip_attention / skip_ff is not one "
                             "perturbation; use identity attention (skip_attention_scores) or a skip")
        if config.skip_attention_scores:
            kinds.add(("pag", "block"))
        elif config.skip_attention and config.skip_ff:
            kinds.add(("slg", "block"))
        elif config.skip_attention or config.skip_ff:
            kinds.add(("slg", "attention" if config.skip_attention else "ff"))
        else:
            raise ValueError(f"{fn}: {arg}: the config skips nothing (skip_attention, skip_ff and "
                             "skip_attention_scores are all False)")
    if len(kinds) != 1:
        raise ValueError(f"{fn}: {arg}: its configs must all perturb the same way (one branch); got "
                         f"{sorted(kinds) or 'none'}")
    return kinds.pop()


def selectors(fn: str, arg: str, family: Family, configs) -> list[str]:
    """The exact block prefixes (``"transformer_blocks.7"``) the configs select."""
    out = []
    for config in as_list(configs):
        fqn = config.fqn
        if fqn == "auto":
            if family.is_unet:
                raise ValueError(f"{fn}: {arg}: fqn='auto' finds no block list in a UNet; give the blocks' module "
                                 "path, e.g. fqn='mid_block.attentions.0.transformer_blocks'")
            fqn = family.block_lists[0]
        indices = [config.indices] if isinstance(config.indices, int) else list(config.indices)
        if not indices:
            raise ValueError(f"{fn}: {arg}: empty indices")
        out += [f"{fqn}.{i}" for i in indices]
    return out


def seg_sigma(fn: str, sigma: float, threshold: float) -> float:
    """GuidedDenoiser's σ for diffusers' ``seg_blur_sigma`` / ``seg_blur_threshold_inf``: σ above
    the threshold is the infinite blur (the grid mean)."""
    if sigma > threshold:
        return 9999999.0
    if sigma > SEG_INF_SIGMA:
        raise ValueError(f"{fn}: seg_blur_sigma: a finite blur of σ={sigma} > {SEG_INF_SIGMA} is not supported "
                         f"(σ > {SEG_INF_SIGMA} is the infinite blur here); lower seg_blur_threshold_inf or σ")
    return float(sigma)


def check_seg_configs(fn: str, configs) -> None:
    for config in as_list(configs):
        ids = getattr(config, "_query_proj_identifiers", None)
        if ids not in (None, ["to_q"]):
            raise ValueError(f"{fn}: seg_guidance_config: query projections {ids!r}: only to_q is supported")

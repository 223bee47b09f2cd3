"""The guiders: diffusers' guider classes with the batched protocol of :mod:`.batch` and the
combine of :mod:`.combine`. Each subclasses diffusers' class of the same name, so constructor,
config (``save_pretrained`` / ``from_pretrained``), start/stop and ``num_conditions`` are
diffusers' own; ``prepare_inputs`` / ``prepare_models`` / ``cleanup_models`` / ``__call__`` /
``forward`` are ours.

Where diffusers' guider is broken we do what it means (see docs/guiders.md):

* PAG on joint attention (SD3): image tokens get the identity, text tokens keep their attention
  (diffusers' PAG processors; the guider's hook makes text tokens identity too).
* SEG: the blur is applied (diffusers' guider never installs its hook, ``_count_prepared`` is
  never incremented, and its hook swaps the finite and infinite blurs and assumes a square grid).
* PAG / SEG / SLG without CFG: the perturbed branch is the cond branch perturbed (diffusers' runs
  the negative conditioning, unperturbed: ``prepare_inputs`` hands it tuple index 1 and
  ``is_conditional`` is False for the second call).
* MAG: Frobenius norms (diffusers' ``torch.norm`` with three dims raises on 4-D latents).
* CFG-Zero* with rescale during its zero-init steps: zeros (diffusers rescales them into NaN).
* FDG with a level outside its start/stop: that level keeps its cond band (diffusers adds the
  previous level's, a stale loop variable).

diffusers' step intervals are kept as they are, including the strict ``start < step`` of the
perturbation intervals of PAG / SEG / SLG (so they never run at step 0).
"""

from __future__ import annotations

import math

import torch
from diffusers import guiders as _dg

import guidance_kernels as gk
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from . import combine as _c
from . import perturbations as _p
from .batch import BatchedGuidance, Branch, branch
from ..models import require_family

UNCOND, COND = Branch("pred_uncond", "uncond", 1), Branch("pred_cond", "cond", 0)


def _pair(enabled: bool) -> list[Branch]:
    return [UNCOND, COND] if enabled else [COND]


class _Named:
    """``forward(pred_cond, pred_uncond, …)`` on separate predictions: the same combine."""

    def _forward(self, **preds) -> GuiderOutput:
        names = [b.name for b in self._active_branches()]
        missing = [n for n in names if preds.get(n) is None]
        if missing:
            raise ValueError(f"{self._fn}: {missing[0]}: required (its guidance is on at this step)")
        return self._combine([preds[n] for n in names], {n: i for i, n in enumerate(names)}, len(names))


def _output(out, pred, index, k) -> GuiderOutput:
    return GuiderOutput(pred=out, pred_cond=branch(pred, index, "pred_cond", k),
                        pred_uncond=branch(pred, index, "pred_uncond", k))


def _cfg_linear(self, pred, index, k, extra=()) -> GuiderOutput:
    """diffusers' CFG (+ ``extra`` terms ``(name, scale)``): base uncond (cond with the original
    formulation; the first extra branch without CFG), then rescale against cond."""
    c = index["pred_cond"]
    terms = [(c, index[name], s) for name, s in extra if name in index]
    if "pred_uncond" in index:
        terms.insert(0, (c, index["pred_uncond"], self.guidance_scale))
    if not terms:
        return _output(branch(pred, index, "pred_cond", k), pred, index, k)
    base = c if self.use_original_formulation else terms[0][1]
    out = _c.linear(pred, k, base, terms, rescale=self.guidance_rescale, cond=c)
    return _output(out, pred, index, k)


# --------------------------------------------------------------------------- CFG and its projections


class ClassifierFreeGuidance(_Named, BatchedGuidance, _dg.ClassifierFreeGuidance):
    """diffusers' ``ClassifierFreeGuidance``: ``u + s(c − u)`` (original: ``c + s(c − u)``), rescale."""

    _fn = "ClassifierFreeGuidance"

    def _active_branches(self):
        return _pair(self._is_cfg_enabled())

    def _combine(self, pred, index, k):
        return _cfg_linear(self, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


class AdaptiveProjectedGuidance(_Named, BatchedGuidance, _dg.AdaptiveProjectedGuidance):
    """diffusers' ``AdaptiveProjectedGuidance`` (momentum, norm threshold, eta) on apg_combine."""

    _fn = "AdaptiveProjectedGuidance"

    def _active_branches(self):
        if self.adaptive_projected_guidance_norm_dim is not None:
            raise ValueError(f"{self._fn}: adaptive_projected_guidance_norm_dim: only None (every non-batch dim) is "
                             f"supported, got {self.adaptive_projected_guidance_norm_dim!r}")
        if self._step == 0:  # diffusers starts a new momentum buffer at step 0
            self._momentum = None
        return _pair(self._is_apg_enabled())

    def _combine(self, pred, index, k):
        if "pred_uncond" not in index:
            return _output(branch(pred, index, "pred_cond", k), pred, index, k)
        momentum = self.adaptive_projected_guidance_momentum
        options = {}
        if momentum is not None:
            if getattr(self, "_momentum", None) is None:
                self._momentum = gk.apg_momentum_buffer(pred, num_branches=k)
            options = dict(momentum=float(momentum), momentum_buffer=self._momentum)
        out = gk.apg_combine(pred, self.guidance_scale, cond=index["pred_cond"], uncond=index["pred_uncond"],
                             num_branches=k, eta=self.eta, norm_threshold=self.adaptive_projected_guidance_rescale,
                             formulation="diffusers_original" if self.use_original_formulation else "diffusers",
                             rescale=self.guidance_rescale, **options)
        return _output(out, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


class ClassifierFreeZeroStarGuidance(_Named, BatchedGuidance, _dg.ClassifierFreeZeroStarGuidance):
    """diffusers' ``ClassifierFreeZeroStarGuidance`` on cfg_zero_star_combine; its zero-init steps
    run the cond branch alone (their output is zeros)."""

    _fn = "ClassifierFreeZeroStarGuidance"

    def _zero_init(self) -> bool:
        return self._enabled and self._step is not None and self._step < self.zero_init_steps

    def _active_branches(self):
        return _pair(self._is_cfg_enabled() and not self._zero_init())

    def _combine(self, pred, index, k):
        cond = branch(pred, index, "pred_cond", k)
        if self._zero_init():
            return _output(torch.zeros_like(cond), pred, index, k)
        if "pred_uncond" not in index:
            return _output(cond, pred, index, k)
        out = gk.cfg_zero_star_combine(pred, self.guidance_scale, cond=index["pred_cond"], uncond=index["pred_uncond"],
                                       num_branches=k, original_formulation=self.use_original_formulation,
                                       rescale=self.guidance_rescale)
        return _output(out, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


class TangentialClassifierFreeGuidance(_Named, BatchedGuidance, _dg.TangentialClassifierFreeGuidance):
    """diffusers' ``TangentialClassifierFreeGuidance`` on tcfg_combine."""

    _fn = "TangentialClassifierFreeGuidance"

    def _active_branches(self):
        return _pair(self._is_tcfg_enabled())

    def _combine(self, pred, index, k):
        if "pred_uncond" not in index:
            return _output(branch(pred, index, "pred_cond", k), pred, index, k)
        out = gk.tcfg_combine(pred, self.guidance_scale, cond=index["pred_cond"], uncond=index["pred_uncond"],
                              num_branches=k, original_formulation=self.use_original_formulation,
                              rescale=self.guidance_rescale)
        return _output(out, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


class MagnitudeAwareGuidance(_Named, BatchedGuidance, _dg.MagnitudeAwareGuidance):
    """diffusers' ``MagnitudeAwareGuidance`` on mag_combine (Frobenius norms)."""

    _fn = "MagnitudeAwareGuidance"

    def _active_branches(self):
        return _pair(self._is_mambo_g_enabled())

    def _combine(self, pred, index, k):
        if "pred_uncond" not in index:
            return _output(branch(pred, index, "pred_cond", k), pred, index, k)
        out = gk.mag_combine(pred, self.guidance_scale, cond=index["pred_cond"], uncond=index["pred_uncond"],
                             num_branches=k, alpha=self.alpha, original_formulation=self.use_original_formulation,
                             rescale=self.guidance_rescale)
        return _output(out, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


class FrequencyDecoupledGuidance(_Named, BatchedGuidance, _dg.FrequencyDecoupledGuidance):
    """diffusers' ``FrequencyDecoupledGuidance`` on fdg_combine; per-level start/stop (a level
    outside its interval has scale 1, 0 with the original formulation: it keeps the cond band).
    ``upcast_to_double`` is accepted and has no effect: fdg_combine's sums are fp32.
    diffusers' constructor needs kornia installed; the combine does not."""

    _fn = "FrequencyDecoupledGuidance"

    def _active_branches(self):
        return _pair(self._is_fdg_enabled())

    def _combine(self, pred, index, k):
        if "pred_uncond" not in index:
            return _output(branch(pred, index, "pred_cond", k), pred, index, k)
        off = 0.0 if self.use_original_formulation else 1.0  # a level at this scale keeps the cond level
        scales = [s if self._is_fdg_enabled_for_level(i) else off for i, s in enumerate(self.guidance_scales)]
        rescale = list(self.guidance_rescale) if self.guidance_rescale_space == "freq" else self.guidance_rescale[0]
        out = gk.fdg_combine(pred, scales, cond=index["pred_cond"], uncond=index["pred_uncond"], num_branches=k,
                             parallel_weights=list(self.parallel_weights), rescale=rescale,
                             rescale_space=self.guidance_rescale_space,
                             original_formulation=self.use_original_formulation)
        return _output(out, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


# --------------------------------------------------------------------------- perturbed branches


class _OnePerturbation(_Named):
    """PAG / SEG / SLG: CFG plus one perturbed cond branch ``_name`` at scale ``_scale()``."""

    _name = "pred_cond_skip"

    def _kind(self) -> tuple[str, str]:
        return _p.skip_kind(self._fn, self._config_arg, self.skip_layer_config)

    def _check_configuration(self):
        self._kind()

    def _active_branches(self):
        branches = _pair(self._is_cfg_enabled())
        if self._perturbation_enabled():
            branches.append(Branch(self._name, self._kind()[0], 0))
        return branches

    def _engine_options(self, model):
        family = require_family(self._fn, model)
        kind, mode = self._kind()
        layers = _p.selectors(self._fn, self._config_arg, family, self.skip_layer_config)
        if kind == "pag":
            return dict(pag_layers=layers)
        return dict(slg_layers=layers, slg_skip=mode)

    def _combine(self, pred, index, k):
        return _cfg_linear(self, pred, index, k, extra=[(self._name, self._scale())])

    def _scale(self) -> float:
        return self.skip_layer_guidance_scale

    def _perturbation_enabled(self) -> bool:
        return self._is_slg_enabled()


class PerturbedAttentionGuidance(_OnePerturbation, BatchedGuidance, _dg.PerturbedAttentionGuidance):
    """diffusers' ``PerturbedAttentionGuidance``: the PAG branch forked from cond at its first layer."""

    _fn, _config_arg = "PerturbedAttentionGuidance", "perturbed_guidance_config"

    def forward(self, pred_cond, pred_uncond=None, pred_cond_skip=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond, pred_cond_skip=pred_cond_skip)


class SkipLayerGuidance(_OnePerturbation, BatchedGuidance, _dg.SkipLayerGuidance):
    """diffusers' ``SkipLayerGuidance`` (SLG / STG): the skip branch forked from cond."""

    _fn, _config_arg = "SkipLayerGuidance", "skip_layer_config"

    def forward(self, pred_cond, pred_uncond=None, pred_cond_skip=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond, pred_cond_skip=pred_cond_skip)


class SmoothedEnergyGuidance(_OnePerturbation, BatchedGuidance, _dg.SmoothedEnergyGuidance):
    """diffusers' ``SmoothedEnergyGuidance``, with the blur actually applied (SEG-SDXL's: finite σ a
    Gaussian of the query projection over the real token grid, σ above the threshold its mean)."""

    _fn, _config_arg, _name = "SmoothedEnergyGuidance", "seg_guidance_config", "pred_cond_seg"

    def _kind(self):
        return "seg", "block"

    def _check_configuration(self):
        _p.check_seg_configs(self._fn, self.seg_guidance_config)
        _p.seg_sigma(self._fn, self.seg_blur_sigma, self.seg_blur_threshold_inf)

    def _engine_options(self, model):
        family = require_family(self._fn, model)
        return dict(seg_layers=_p.selectors(self._fn, self._config_arg, family, self.seg_guidance_config),
                    seg_sigma=_p.seg_sigma(self._fn, self.seg_blur_sigma, self.seg_blur_threshold_inf))

    def _scale(self):
        return self.seg_guidance_scale

    def _perturbation_enabled(self):
        return self._is_seg_enabled()

    def forward(self, pred_cond, pred_uncond=None, pred_cond_seg=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond, pred_cond_seg=pred_cond_seg)


class AutoGuidance(_Named, BatchedGuidance, _dg.AutoGuidance):
    """diffusers' ``AutoGuidance`` with skipped layers (``dropout=1``): its weak branch — the
    NEGATIVE conditioning through the model with the configured blocks skipped, as diffusers
    runs it — batched with cond (not forked: its conditioning differs from cond's)."""

    _fn = "AutoGuidance"

    def _kind(self):
        return _p.skip_kind(self._fn, "auto_guidance_config", self.auto_guidance_config)

    def _check_configuration(self):
        self._kind()

    def _active_branches(self):
        if not self._is_ag_enabled():
            return [COND]
        return [COND, Branch("pred_uncond", self._kind()[0], 1)]

    def _engine_options(self, model):
        family = require_family(self._fn, model)
        kind, mode = self._kind()
        layers = _p.selectors(self._fn, "auto_guidance_config", family, self.auto_guidance_config)
        options = dict(pag_layers=layers) if kind == "pag" else dict(slg_layers=layers, slg_skip=mode)
        return dict(options, fork=False)

    def _combine(self, pred, index, k):
        return _cfg_linear(self, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


# --------------------------------------------------------------------------- several at once


class PerturbedGuidance(_Named, BatchedGuidance, BaseGuidance):
    """CFG + PAG + SEG + SLG in one guider (no diffusers counterpart): every active branch in one
    forked forward, combined as diffusers' PAG pipelines do::

        out = u + s(c − u) + pag_scale(c − p_pag) + seg_scale(c − p_seg) + slg_scale(c − p_slg)

    (``c + …`` with ``use_original_formulation`` or without CFG), then ``guidance_rescale``.
    Layers are this package's exact selectors (:mod:`..layers`: ``"mid"``, ``"blocks.7"``, ``7``,
    ``"up_blocks.0.attentions.1"``); the defaults follow diffusers (``"mid"`` for UNets,
    ``"blocks.1"`` for transformers). ``seg_blur``: ``"frame"`` or ``"3d"`` (videos); ``slg_skip``:
    ``"block"``, ``"attention"`` or ``"ff"``. The perturbed branches are on at the steps
    ``int(perturbed_guidance_start·N) <= step < int(perturbed_guidance_stop·N)`` (CFG: ``start`` /
    ``stop`` alike) with a non-zero scale.
    """

    _fn = "PerturbedGuidance"
    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_pag", "pred_cond_seg", "pred_cond_slg"]

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, pag_scale: float = 0.0, pag_layers=None, seg_scale: float = 0.0,
                 seg_layers=None, seg_blur_sigma: float = 9999999.0, seg_blur: str = "frame", slg_scale: float = 0.0,
                 slg_layers=None, slg_skip: str = "block", perturbed_guidance_start: float = 0.0,
                 perturbed_guidance_stop: float = 1.0, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        if slg_scale and slg_layers is None:
            raise ValueError(f"{self._fn}: slg_layers: required with slg_scale (e.g. [7, 8, 9] for SD3.5 medium)")
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.pag_scale, self.seg_scale, self.slg_scale = pag_scale, seg_scale, slg_scale
        self.use_original_formulation = use_original_formulation

    @property
    def scales(self) -> dict:
        return {"pag": self.pag_scale, "seg": self.seg_scale, "slg": self.slg_scale}

    def _in(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        off = 0.0 if self.use_original_formulation else 1.0
        return self._enabled and self._in(self._start, self._stop) and not math.isclose(self.guidance_scale, off)

    def _on(self, kind: str) -> bool:
        config = self.config
        return self._enabled and self.scales[kind] != 0 and self._in(config.perturbed_guidance_start,
                                                                      config.perturbed_guidance_stop)

    @property
    def num_conditions(self) -> int:
        return 1 + self._is_cfg_enabled() + sum(self._on(k) for k in self.scales)

    def _active_branches(self):
        return _pair(self._is_cfg_enabled()) + [Branch(f"pred_cond_{k}", k, 0) for k in self.scales if self._on(k)]

    def _engine_options(self, model):
        config = self.config
        return dict(pag_layers=config.pag_layers, seg_layers=config.seg_layers, slg_layers=config.slg_layers,
                    slg_skip=config.slg_skip, seg_sigma=config.seg_blur_sigma, seg_blur=config.seg_blur)

    def _combine(self, pred, index, k):
        c = index["pred_cond"]
        terms = [(c, index[f"pred_cond_{kind}"], s) for kind, s in self.scales.items() if f"pred_cond_{kind}" in index]
        if "pred_uncond" in index:
            terms.insert(0, (c, index["pred_uncond"], self.guidance_scale))
        if not terms:
            return _output(branch(pred, index, "pred_cond", k), pred, index, k)
        cfg = "pred_uncond" in index and not self.use_original_formulation
        out = _c.linear(pred, k, index["pred_uncond"] if cfg else c, terms, rescale=self.guidance_rescale, cond=c)
        return _output(out, pred, index, k)

    def forward(self, pred_cond, pred_uncond=None, pred_cond_pag=None, pred_cond_seg=None, pred_cond_slg=None):
        return self._forward(pred_cond=pred_cond, pred_uncond=pred_uncond, pred_cond_pag=pred_cond_pag,
                             pred_cond_seg=pred_cond_seg, pred_cond_slg=pred_cond_slg)

"""GuidedDenoiser: CFG + PAG + SEG (+ SAG) with every branch in ONE denoiser forward.

Wraps a diffusers ``UNet2DConditionModel`` (SD1.5 / SDXL) or an SD3-style transformer
(``SD3Transformer2DModel``). Guided attention processors are installed once on the chosen layers;
per call the denoiser builds the batch ``[uncond, cond, pag, seg]`` (the branches that are on),
runs one forward in which each row gets its attention mode at each layer, captures SAG's key mass
of the uncond rows in that same forward, and combines the branches with
:func:`guidance_kernels.guidance_combine` (or APG / CFG-Zero*). With ``fork=True`` (default) the
perturbed branches join the batch at their first perturbed block (see :mod:`.fork`).

Scales are Python numbers or tensors (0-d or per-sample); a branch is on when its scale is a tensor
or a non-zero number (CFG: > 1 as in diffusers, or a tensor). Changing scales changes tensors only;
switching a branch on or off (guidance intervals) changes the batch, which a compiled model
retraces once per branch set. Nothing is swapped between steps.

SAG (UNet only) needs the scheduler: x0 and eps are computed from the uncond (or cond) prediction
as diffusers' SAG pipeline does, the blurred re-noised latent goes through one extra uncond forward,
and ``sag_scale · (D_uncond − D_degraded)`` joins the combine.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...ops import guidance_combine as _combine
from ... import terms as _terms
from . import layers as _layers
from .fork import BranchPlan, ForwardState, install_fork_hooks, plan_branches
from .processors import GuidedAttnProcessor, GuidedJointAttnProcessor

SAG_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"  # diffusers' SAG pipeline's capture layer


def _on(scale) -> bool:
    return isinstance(scale, torch.Tensor) or (scale is not None and float(scale) != 0.0)


def _cfg_on(scale) -> bool:
    return isinstance(scale, torch.Tensor) or (scale is not None and float(scale) > 1.0)


class GuidedDenoiser:
    """Guided denoiser step for a diffusers UNet or SD3-style transformer.

    Args:
        model: ``UNet2DConditionModel`` or ``SD3Transformer2DModel`` (or a compatible DiT).
        pag_layers / seg_layers: layer selectors (see :mod:`.layers`) perturbed by the PAG branch
            (identity attention) and the SEG branch (Gaussian-blurred queries). Defaults follow
            diffusers: ``"mid"`` for UNets, ``"blocks.1"`` for DiTs.
        seg_sigma: SEG's blur σ (> 9999 = infinite: every query is the grid mean; SEG-SDXL's default).
        sag: capture SAG's attention key mass (UNet; diffusers' mid-block layer) and add SAG when
            ``sag_scale`` is on; needs ``scheduler``.
        sag_blur_sigma: σ of SAG's 9×9 blur (diffusers 1.0; ComfyUI 2.0).
        fork: let perturbed branches join the batch at their first perturbed block (exact; faster).
        scheduler: a diffusers scheduler with ``alphas_cumprod`` and ``config.prediction_type`` (SAG).
        reference: compute every branch the way the anchors do — the references of
            :mod:`guidance_kernels.reference` (chunked SDPA, conv2d query blur, explicit attention
            map for SAG, eager combine) instead of the ops. The no-kernels baseline of the example
            and the benchmark; use ``fork=False`` with it for the stock batched forward.
    """

    def __init__(self, model: torch.nn.Module, *, pag_layers=None, seg_layers=None, seg_sigma: float = 9999999.0,
                 sag: bool = False, sag_blur_sigma: float = 1.0, fork: bool = True, scheduler: Any = None,
                 reference: bool = False):
        self.model = model
        self.unet = _layers.is_unet(model)
        default = "mid" if self.unet else "blocks.1"
        self.pag_layers = _layers.select_layers(model, default if pag_layers is None else pag_layers)
        self.seg_layers = _layers.select_layers(model, default if seg_layers is None else seg_layers)
        if not (seg_sigma > 0) or math.isnan(seg_sigma):
            raise ValueError(f"GuidedDenoiser: seg_sigma: must be > 0, got {seg_sigma}")
        self.seg_sigma = float(seg_sigma)
        if sag and not self.unet:
            raise ValueError("GuidedDenoiser: sag: self-attention guidance needs a UNet (its mid-block map)")
        if sag and scheduler is None:
            raise ValueError("GuidedDenoiser: scheduler: SAG needs the scheduler (alphas_cumprod, prediction_type)")
        self.sag = bool(sag)
        self.sag_blur_sigma = float(sag_blur_sigma)
        self.scheduler = scheduler
        self.fork = bool(fork)
        self.state = ForwardState()
        self.state.extras["seg_sigma"] = self.seg_sigma
        self.reference = bool(reference)
        self.state.extras["reference"] = self.reference
        self._plans: dict[tuple, BranchPlan] = {}
        self._original: dict[str, Any] = {}
        self._hooks = install_fork_hooks(model, self.state) if self.fork else []
        self._install()

    # ------------------------------------------------------------------ installation

    def _install(self) -> None:
        attention = _layers.self_attention_layers(self.model)
        layers = set(self.pag_layers) | set(self.seg_layers) | ({SAG_LAYER} if self.sag else set())
        processors = {}
        for name in layers:
            module = attention[name]
            self._original[name] = module.processor
            cls = GuidedJointAttnProcessor if getattr(module, "add_q_proj", None) is not None else GuidedAttnProcessor
            processors[name] = cls(self.state, name, pag=name in self.pag_layers, seg=name in self.seg_layers,
                                   sag=self.sag and name == SAG_LAYER)
            module.set_processor(processors[name])
        self.processors = processors

    def remove(self) -> None:
        """Restore the model's original processors and remove the fork hooks."""
        attention = _layers.self_attention_layers(self.model)
        for name, processor in self._original.items():
            attention[name].set_processor(processor)
        for handle in self._hooks:
            handle.remove()
        self._original, self._hooks = {}, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # ------------------------------------------------------------------ one step

    def _plan(self, kinds: list[str], batch: int) -> BranchPlan:
        layers = {"pag": self.pag_layers, "seg": self.seg_layers}
        key = (tuple(kinds), batch)
        if key not in self._plans:  # one plan object per branch set: the compiled model's guards stay stable
            perturbed = {k: layers[k] for k in kinds if k in layers}
            self._plans[key] = plan_branches(self.model, kinds, perturbed, batch, fork=self.fork)
        return self._plans[key]

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep, *, encoder_hidden_states: torch.Tensor,
                 negative_encoder_hidden_states: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                 negative_added_cond_kwargs: dict | None = None, pooled_projections: torch.Tensor | None = None,
                 negative_pooled_projections: torch.Tensor | None = None, guidance_scale=None, pag_scale=0.0,
                 pag_adaptive_scale: float = 0.0, seg_scale=0.0, sag_scale=0.0, guidance_rescale=0.0,
                 combine: str = "cfg", **combine_kwargs) -> torch.Tensor:
        """One guided prediction for ``sample`` (B, C, H, W) at ``timestep``.

        ``encoder_hidden_states`` / ``added_cond_kwargs`` / ``pooled_projections`` condition the
        cond branch (and the perturbed ones); the ``negative_*`` versions the uncond branch.
        ``combine``: ``"cfg"`` (diffusers' CFG + PAG/SEG/SAG terms and rescale), ``"apg"`` or
        ``"cfg_zero_star"`` (CFG only; ``combine_kwargs`` go to apg_combine / cfg_zero_star_combine).
        Returns the guided prediction (B, C, H, W) in the model's output dtype. Runs under
        ``torch.no_grad()`` (as diffusers pipelines do): the guidance ops are inference ops.
        """
        if combine not in ("cfg", "apg", "cfg_zero_star"):
            raise ValueError(f"GuidedDenoiser: combine: unknown {combine!r} (cfg, apg, cfg_zero_star)")
        b = sample.shape[0]
        cfg = _cfg_on(guidance_scale)
        if cfg and negative_encoder_hidden_states is None:
            raise ValueError("GuidedDenoiser: negative_encoder_hidden_states: required for CFG (guidance_scale > 1)")
        if pag_adaptive_scale and _on(pag_scale):
            pag_scale = _terms.adaptive_pag_scale(pag_scale, pag_adaptive_scale, timestep)
        kinds = (["uncond"] if cfg else []) + ["cond"]
        kinds += [k for k, s in (("pag", pag_scale), ("seg", seg_scale)) if _on(s)]
        sag = self.sag and _on(sag_scale)
        if combine != "cfg" and (not cfg or len(kinds) > 2 or sag):
            raise ValueError(f"GuidedDenoiser: combine={combine!r} needs CFG alone (no PAG/SEG/SAG branches)")
        plan = self._plan(kinds, b)
        inputs = {"uncond": (negative_encoder_hidden_states, negative_added_cond_kwargs, negative_pooled_projections),
                  "cond": (encoder_hidden_states, added_cond_kwargs, pooled_projections)}
        first = plan.kinds[: plan.initial]
        self.state.plan = plan
        self.state.grid = tuple(sample.shape[-2:])
        if not self.unet:
            patch = getattr(getattr(self.model, "config", None), "patch_size", 1) or 1
            self.state.extras["token_grid"] = (sample.shape[-2] // patch, sample.shape[-1] // patch)
        self.state.extras["sag_capture"] = sag
        try:
            pred = self._forward(sample, timestep, [inputs["uncond" if k == "uncond" else "cond"] for k in first])
            branches = list(pred.chunk(len(plan.kinds)))
            index = {k: i for i, k in enumerate(plan.kinds)}
            if sag:
                degraded = self._sag_degraded(sample, timestep, branches[index["uncond" if cfg else "cond"]],
                                              inputs["uncond" if cfg else "cond"])
                branches.append(degraded)
        finally:
            self.state.plan = None
            self.state.extras.pop("sag_mass", None)
        c = index["cond"]
        if combine != "cfg":
            return self._projected(combine, branches[c], branches[index["uncond"]], guidance_scale, guidance_rescale,
                                   combine_kwargs)
        spec = _terms.cfg(guidance_scale, uncond=index["uncond"], cond=c) if cfg else _terms.Guidance(c)
        for kind, scale, helper in (("pag", pag_scale, _terms.pag), ("seg", seg_scale, _terms.seg)):
            if kind in index:
                spec = spec + helper(scale, cond=c, perturbed=index[kind])
        if sag:
            spec = spec + _terms.sag(sag_scale, uncond=index["uncond"] if cfg else c, degraded=len(branches) - 1)
        if self.reference:
            from ... import reference as ref

            return ref.guidance_combine(branches, spec, rescale=guidance_rescale, rescale_ref=c)
        return _combine.guidance_combine(branches, spec, rescale=guidance_rescale, rescale_ref=c)

    def _projected(self, combine, cond, uncond, scale, rescale, kwargs):
        if self.reference:
            from ... import reference as ref

            fn = ref.apg_combine if combine == "apg" else ref.cfg_zero_star_combine
            return fn(cond, uncond, scale, rescale=rescale, **kwargs)
        fn = _combine.apg_combine if combine == "apg" else _combine.cfg_zero_star_combine
        return fn([uncond, cond], scale, rescale=rescale, **kwargs)

    def _forward(self, sample, timestep, branch_inputs) -> torch.Tensor:
        n = len(branch_inputs)
        x = torch.cat([sample] * n) if n > 1 else sample
        t = timestep
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == sample.shape[0] and n > 1:
            t = torch.cat([t] * n)
        ehs = torch.cat([bi[0] for bi in branch_inputs]) if n > 1 else branch_inputs[0][0]
        if self.unet:
            added = None
            if branch_inputs[0][1] is not None:
                added = {key: torch.cat([bi[1][key] for bi in branch_inputs]) for key in branch_inputs[0][1]}
            return self.model(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]
        pooled = torch.cat([bi[2] for bi in branch_inputs]) if n > 1 else branch_inputs[0][2]
        return self.model(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t,
                          return_dict=False)[0]

    # ------------------------------------------------------------------ SAG

    def _alpha_bar(self, timestep, like: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(like.device)
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        return alphas[t.to(alphas.device).long()].to(torch.float32)

    def _sag_degraded(self, sample, timestep, pred, branch_input) -> torch.Tensor:
        """diffusers' SAG step: x0/eps from ``pred``, blur where the captured key mass > 1, re-noise
        to the same level, and one more forward with ``branch_input``'s conditioning."""
        if self.reference:
            from ...reference import sag_degrade
        else:
            from ... import sag_degrade
        mass = self.state.extras.get("sag_mass")
        grid = self.state.extras.get("sag_grid")
        if mass is None:
            raise RuntimeError("GuidedDenoiser: SAG's key mass was not captured (is the mid block present?)")
        alpha_bar = self._alpha_bar(timestep, sample)
        a = alpha_bar.reshape(-1, *([1] * (sample.dim() - 1)))
        kind = self.scheduler.config.prediction_type
        s32, p32 = sample.float(), pred.float()
        if kind == "epsilon":
            x0, eps = (s32 - (1 - a) ** 0.5 * p32) / a**0.5, p32
        elif kind == "v_prediction":
            x0, eps = a**0.5 * s32 - (1 - a) ** 0.5 * p32, (1 - a) ** 0.5 * s32 + a**0.5 * p32
        elif kind == "sample":
            x0, eps = p32, (s32 - a**0.5 * p32) / (1 - a) ** 0.5
        else:
            raise ValueError(f"GuidedDenoiser: unsupported prediction_type {kind!r}")
        degraded = sag_degrade(x0.to(sample.dtype), mass, grid=grid, sigma=self.sag_blur_sigma,
                               alpha_cumprod=alpha_bar.reshape(-1), eps=eps.to(sample.dtype))
        self.state.extras["sag_capture"] = False
        self.state.plan = self._plan(["cond"], sample.shape[0])  # one plain branch, no perturbation
        return self._forward(degraded, timestep, [branch_input])

"""GuidedDenoiser: CFG + PAG + SEG + SLG/STG (+ SAG) with every branch in ONE denoiser forward.

Wraps a diffusers UNet (SD1.5 / SDXL) or transformer (SD3 / SD3.5, Flux, Wan, LTX-Video,
HunyuanVideo; see :mod:`.models`). Guided attention processors are installed once on the chosen
layers and routers on the blocks (:mod:`.fork`); per call the denoiser builds the batch
``[uncond, cond, pag, seg, slg]`` (the branches that are on), runs one forward in which each row
gets its perturbation at each layer, captures SAG's key mass of the uncond rows in that same
forward (UNet), and combines the branches with ``guidance_combine`` (or APG / CFG-Zero*). With
``fork=True`` (default) the perturbed branches are computed from their first perturbed block on
(before it they equal the cond branch).

Perturbations, in diffusers' terms (``LayerSkipConfig`` / ``SmoothedEnergyGuidanceConfig`` on
the chosen blocks):

======================================================  =====================================================
diffusers                                               here
======================================================  =====================================================
PAG, ``skip_attention_scores=True`` (STG-A as the STG   ``pag_layers``: self-attention output = V (joint
authors define it: attention output := V)               attention: text queries keep their attention, image
                                                        query i sees key i and the text keys)
SEG, blur of ``to_q``'s output                          ``seg_layers``, ``seg_sigma`` (> 9999: the mean),
                                                        ``seg_blur="frame"`` (per frame) or ``"3d"``
SLG / STG-R, ``skip_attention=True, skip_ff=True``      ``slg_layers``, ``slg_skip="block"``: the block
                                                        returns its inputs (in its own return order)
``skip_attention=True, skip_ff=False``                  ``slg_skip="attention"``: the block's self-attention
                                                        returns its input
``skip_attention=False, skip_ff=True``                  ``slg_skip="ff"``: the block's feed-forward returns
                                                        its input
======================================================  =====================================================

Scales are Python numbers or tensors (0-d or per-sample); a branch is on when its scale is a tensor
or a non-zero number (CFG: > 1 as in diffusers, or a tensor). Changing scales changes tensors only;
switching a branch on or off (guidance intervals) changes the batch, which a compiled model
retraces once per branch set. Nothing is swapped between steps.

SAG (UNet only) needs the scheduler: x0 and eps are computed from the uncond (or cond) prediction
as diffusers' SAG pipeline does, the blurred re-noised latent goes through one extra uncond forward,
and ``sag_scale · (D_uncond − D_degraded)`` joins the combine.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

import guidance_kernels as gk
from guidance_kernels import _checks

from . import layers as _layers
from . import parallel as _parallel
from .dit_processors import (GuidedFluxAttnProcessor, GuidedHunyuanVideoAttnProcessor, GuidedLTXAttnProcessor,
                             GuidedWanAttnProcessor)
from .fork import SKIP_MODES, BranchPlan, ForwardState, Perturbation, install_routers, plan_branches
from .models import Family, check_sample, require_family, token_grid
from .ops import FUSED, REFERENCE
from .processors import GuidedAttnProcessor, GuidedJointAttnProcessor
from .tokens import BLURS

SAG_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"  # diffusers' SAG pipeline's capture layer
FN = "GuidedDenoiser"
COMBINES = ("cfg", "apg", "cfg_zero_star", "tcfg", "mag", "fdg", "cfg_norm", "mahiro")
_TWO_BRANCH = ("apg", "cfg_zero_star", "tcfg", "mag", "fdg")  # CFG alone: (cond, uncond, scale, rescale, **options)
_PROCESSORS = {"unet": GuidedAttnProcessor, "sd3": GuidedJointAttnProcessor, "flux": GuidedFluxAttnProcessor,
               "wan": GuidedWanAttnProcessor, "ltx": GuidedLTXAttnProcessor,
               "hunyuan_video": GuidedHunyuanVideoAttnProcessor}


def _choice(arg: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{FN}: {arg}: must be one of {choices}, got {value!r}")
    return value


def _scale_on(arg: str, value, batch: int, device, *, cfg: bool = False) -> bool:
    """Validate a guidance scale by the caller's name; True when its branch is on."""
    if value is None and cfg:
        return False
    _checks.scale(FN, arg, value, batch, device)
    if isinstance(value, torch.Tensor):
        return True
    return float(value) > 1.0 if cfg else float(value) != 0.0


def _level_scales_on(value, batch: int, device) -> bool:
    """combine="fdg": ``guidance_scale`` is FDG's per-level list; True (the uncond branch runs)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{FN}: guidance_scale: combine='fdg' takes a non-empty list of per-level scales "
                        f"(e.g. [10.0, 5.0]), got {type(value).__name__}")
    for i, level in enumerate(value):
        _checks.scale(FN, f"guidance_scale[{i}]", level, batch, device)
    return True


def _post_cfg_check(combine: str, options: dict, cfg: bool, rescale) -> None:
    """combine="cfg_norm" / "mahiro": CFG on, no guidance_rescale, only CFGNorm's ``strength``."""
    allowed = {"strength"} if combine == "cfg_norm" else set()
    if set(options) - allowed:
        raise TypeError(f"{FN}: combine={combine!r} takes {sorted(allowed) or 'no options'}, got "
                        f"{sorted(set(options) - allowed)}")
    if not cfg:
        raise ValueError(f"{FN}: combine={combine!r} corrects CFG: guidance_scale must turn CFG on")
    if isinstance(rescale, torch.Tensor) or rescale:
        raise ValueError(f"{FN}: guidance_rescale: combine={combine!r} is an alternative post-CFG correction: "
                         "use one")


def _tensor_arg(arg: str, value, batch: int, *, like=None, like_name: str = ""):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{FN}: {arg}: expected a tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[0] != batch:
        raise ValueError(f"{FN}: {arg}: batch {value.shape[0] if value.dim() else '()'} differs from sample's "
                         f"{batch}")
    if like is not None and value.shape != like.shape:
        raise ValueError(f"{FN}: {arg}: shape {tuple(value.shape)} differs from {like_name} {tuple(like.shape)} "
                         "(the branches are batched: give both the same length)")


def _repeat(x, n: int):
    return x if n == 1 else torch.cat([x] * n)


class GuidedDenoiser:
    """Guided denoiser step for a diffusers UNet or transformer (see the module docstring).

    Args:
        model: ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
            ``WanTransformer3DModel``, ``LTXVideoTransformer3DModel`` or
            ``HunyuanVideoTransformer3DModel`` (or a subclass).
        pag_layers / seg_layers: layer selectors (see :mod:`.layers`) perturbed by the PAG branch
            (identity attention) and the SEG branch (Gaussian-blurred queries). Defaults follow
            diffusers: ``"mid"`` for UNets, ``"blocks.1"`` for transformers.
        slg_layers: block selectors skipped by the SLG / STG branch (transformers; e.g. ``[7, 8, 9]``
            for SD3.5 medium); ``slg_skip``: what is skipped there (``"block"``, ``"attention"``,
            ``"ff"``).
        seg_sigma: SEG's blur σ (> 9999 = infinite: the grid mean; SEG-SDXL's default).
        seg_blur: ``"frame"`` (each video frame over (H, W)) or ``"3d"`` (also along T).
        sag: capture SAG's attention key mass (UNet; diffusers' mid-block layer) and add SAG when
            ``sag_scale`` is on; needs ``scheduler``.
        sag_blur_sigma: σ of SAG's 9×9 blur (diffusers 1.0; ComfyUI 2.0).
        fork: compute perturbed branches from their first perturbed block on (exact; faster).
        per_branch: one model call per branch (what diffusers' guiders do; lower peak memory, and
            the baseline of the benchmark) instead of one batched call. A branch's call still runs
            a block it skips (diffusers' models need a non-empty batch) and takes its inputs back.
        scheduler: a diffusers scheduler with ``alphas_cumprod`` and ``config.prediction_type`` (SAG).
        reference: compute every branch the way the anchors do — the reference formulations of
            :mod:`.ops` (per-row SDPA, conv2d query blur, explicit attention map for SAG, eager
            combine) instead of the fused ops. The no-kernels baseline of the example and the
            benchmark; use ``fork=False`` with it for the stock batched forward.
        process_group: share the step's branches out over the ranks of a ``torch.distributed``
            process group (NCCL on GPUs, gloo on CPU), or a :class:`~.parallel.BranchParallel`
            (e.g. ``BranchParallel(size=N)``: the single-process run with an N-rank run's model
            calls). Every rank returns the same guided prediction; call the denoiser with the same
            arguments on every rank. See :mod:`.parallel`.
    """

    def __init__(self, model: torch.nn.Module, *, pag_layers=None, seg_layers=None, slg_layers=None,
                 slg_skip: str = "block", seg_sigma: float = 9999999.0, seg_blur: str = "frame", sag: bool = False,
                 sag_blur_sigma: float = 1.0, fork: bool = True, per_branch: bool = False, scheduler: Any = None,
                 reference: bool = False, process_group=None):
        self.family: Family = require_family(FN, model)
        self.parallel = _parallel.resolve(FN, process_group)
        self.model = model
        self.unet = self.family.is_unet
        seg_sigma = _checks.sigma(FN, "seg_sigma", seg_sigma)
        self.sag_blur_sigma = _checks.sigma(FN, "sag_blur_sigma", sag_blur_sigma)
        self.slg_skip = _choice("slg_skip", slg_skip, SKIP_MODES)
        seg_blur = _choice("seg_blur", seg_blur, BLURS)
        default = "mid" if self.unet else "blocks.1"
        self.pag_layers = self._select_layers("pag_layers", default if pag_layers is None else pag_layers)
        self.seg_layers = self._select_layers("seg_layers", default if seg_layers is None else seg_layers)
        self.blocks = _layers.top_level_blocks(model)
        self.slg_blocks = [] if slg_layers is None else self._select_blocks(slg_layers)
        if sag and not self.unet:
            raise ValueError(f"{FN}: sag: self-attention guidance needs a UNet (its mid-block map)")
        if sag and scheduler is None:
            raise ValueError(f"{FN}: scheduler: SAG needs the scheduler (alphas_cumprod, prediction_type)")
        self.sag = bool(sag)
        self.scheduler = scheduler
        self.fork = bool(fork)
        self.per_branch = bool(per_branch)
        self.ops = REFERENCE if reference else FUSED
        self.reference = bool(reference)
        self.state = ForwardState(ops=self.ops, seg_sigma=seg_sigma, seg_blur=seg_blur)
        self._plans: dict[tuple, BranchPlan] = {}
        self._original: dict[str, Any] = {}
        self._grid_ids = None  # (weakref to Flux's img_ids, its version, tokens, the grid read from it)
        self._install()

    # ------------------------------------------------------------------ layer choice

    def _select_layers(self, arg: str, selectors) -> list[str]:
        try:
            return _layers.select_layers(self.model, selectors)
        except (TypeError, ValueError) as exc:
            cross = self._cross_attention_named(selectors)
            if cross:
                layers = _layers.preview(list(_layers.self_attention_layers(self.model)))
                raise ValueError(f"{FN}: {arg}: {cross} is a cross-attention layer: PAG and SEG perturb "
                                 f"self-attention; layers: {layers}") from None
            raise type(exc)(f"{FN}: {arg}: {exc}") from None

    def _cross_attention_named(self, selectors) -> str | None:
        for selector in selectors if isinstance(selectors, (list, tuple)) else [selectors]:
            if isinstance(selector, str):
                try:
                    module = self.model.get_submodule(selector.strip())
                except AttributeError:
                    continue
                if hasattr(module, "processor") and selector.strip() not in _layers.self_attention_layers(self.model):
                    return selector
        return None

    def _select_blocks(self, selectors) -> list[str]:
        if self.unet:
            raise ValueError(f"{FN}: slg_layers: layer skips need a transformer model (its blocks pass their "
                             f"inputs through), not a {self.family.cls}")
        try:
            blocks = _layers.select_blocks(self.model, selectors)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{FN}: slg_layers: {exc}") from None
        for block in blocks:
            self._check_skippable(block)
        return blocks

    def _modules_of(self, block: str, what: str) -> list[str]:
        module = self.model.get_submodule(block)
        table = self.family.attention if what == "attention" else self.family.feed_forward
        return [f"{block}.{a}" for a in table.get(type(module).__name__, ()) if getattr(module, a, None) is not None]

    def _check_skippable(self, block: str) -> None:
        cls = type(self.model.get_submodule(block)).__name__
        if cls not in self.family.returns:
            raise ValueError(f"{FN}: slg_layers: {block} is a {cls}, whose return order is not known; skippable "
                             f"blocks: {', '.join(sorted(self.family.returns))}")
        if self.slg_skip == "block":
            return
        names = self._modules_of(block, self.slg_skip)
        if not names:
            kind = "self-attention" if self.slg_skip == "attention" else "feed-forward (diffusers FeedForward)"
            raise ValueError(f"{FN}: slg_layers: {block} ({cls}) has no {kind} module to skip; use slg_skip='block'"
                             + (" or 'attention'" if self.slg_skip == "ff" else ""))
        if self.slg_skip == "attention":
            for name in names:
                attn = self.model.get_submodule(name)
                out_dim = attn.to_out[0].out_features if getattr(attn, "to_out", None) is not None else \
                    attn.to_q.out_features
                if attn.to_q.in_features != out_dim:
                    raise ValueError(f"{FN}: slg_layers: {name} maps {attn.to_q.in_features} to {out_dim} features: "
                                     "a skip cannot pass its input through")

    # ------------------------------------------------------------------ installation

    def _install(self) -> None:
        attention = _layers.self_attention_layers(self.model)
        layers = set(self.pag_layers) | set(self.seg_layers) | ({SAG_LAYER} if self.sag else set())
        cls = _PROCESSORS[self.family.name]
        processors = {}
        for name in layers:
            module = attention[name]
            self._original[name] = module.processor
            processors[name] = cls(self.state, name, pag=name in self.pag_layers, seg=name in self.seg_layers,
                                   sag=self.sag and name == SAG_LAYER)
            module.set_processor(processors[name])
        self.processors = processors
        self._layer_blocks = {name: _layers.block_of(self.model, name) for name in layers}
        routed = self.blocks if (self.fork and not self.per_branch) else self.slg_blocks
        returns = {b: self.family.returns.get(type(self.model.get_submodule(b)).__name__, ("hidden_states",))
                   for b in routed}
        self._skip_modules = {}
        if self.slg_skip != "block":
            for block in self.slg_blocks:
                names = self._modules_of(block, self.slg_skip)
                self._skip_modules[block] = {self.slg_skip: names}
                returns.update({n: ("hidden_states", "encoder_hidden_states") for n in names})
                routed = list(routed) + names
        self._hooks = install_routers(self.model, self.state, list(routed), returns, self.family.shared_args)

    def remove(self) -> None:
        """Restore the model's original processors and remove the routing hooks."""
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

    # ------------------------------------------------------------------ forwards called by someone else

    def install(self) -> None:
        """Install the processors and routers again after :meth:`remove` (no-op while installed).
        The modular guiders install for each step's model call and remove afterwards, so the
        model is the stock one between steps (for diffusers' own guiders and hooks)."""
        if not self._original and not self._hooks:
            self._install()

    def route(self, kinds, batch: int, sample: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
              model_kwargs: dict | None = None, token_grid=None) -> BranchPlan:
        """Make the model's next forward — a call made elsewhere (a diffusers denoise loop) on the
        branches ``kinds`` (e.g. ``["uncond", "cond", "pag"]``), ``batch`` rows each, concatenated
        branch-major in the order of the returned plan's ``kinds`` — compute each branch as
        :meth:`__call__` does. ``sample`` / ``encoder_hidden_states`` / ``model_kwargs``: that
        call's arguments (the grids SEG needs are read from them). Undo with :meth:`unroute`."""
        plan = self._plan(list(kinds), batch)
        self._set_grids(sample, dict(model_kwargs or {}), token_grid, encoder_hidden_states, seg="seg" in plan.kinds)
        self.state.plan, self.state.sag_capture = plan, False
        return plan

    def unroute(self) -> None:
        """End :meth:`route`: the processors and routers act as the model's own again."""
        self.state.plan = None

    # ------------------------------------------------------------------ plans

    def _perturbation(self, kind: str) -> Perturbation:
        if kind == "slg":
            indices = [self.blocks.index(b) for b in self.slg_blocks]
            return Perturbation(min(indices), {i: self.slg_skip for i in indices})
        layers = self.pag_layers if kind == "pag" else self.seg_layers
        return Perturbation(min(self.blocks.index(self._layer_blocks[n]) for n in layers))

    def _plan(self, kinds: list[str], batch: int) -> BranchPlan:
        key = (tuple(kinds), batch)
        if key not in self._plans:  # one plan object per branch set: the compiled model's guards stay stable
            perturbations = {k: self._perturbation(k) for k in kinds if k in ("pag", "seg", "slg")}
            # Perturbed branches fork from cond only inside a call that holds cond (a rank of a
            # process group may hold a perturbed branch without it: it then runs whole).
            fork = self.fork and not self.per_branch and "cond" in kinds
            self._plans[key] = plan_branches(self.blocks, kinds, perturbations, batch, fork=fork,
                                             modules=self._skip_modules, layers=self._layer_blocks)
        return self._plans[key]

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep, *, encoder_hidden_states: torch.Tensor,
                 negative_encoder_hidden_states: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                 negative_added_cond_kwargs: dict | None = None, pooled_projections: torch.Tensor | None = None,
                 negative_pooled_projections: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None,
                 negative_encoder_attention_mask: torch.Tensor | None = None, model_kwargs: dict | None = None,
                 token_grid=None, guidance_scale=None, pag_scale=0.0, pag_adaptive_scale=0.0, seg_scale=0.0,
                 slg_scale=0.0, sag_scale=0.0, guidance_rescale=0.0, combine: str = "cfg",
                 **combine_kwargs) -> torch.Tensor:
        """One guided prediction for ``sample`` at ``timestep``.

        ``sample``: the model's latent input — ``(B, C, H, W)`` (UNet, SD3), ``(B, C, T, H, W)``
        (Wan, HunyuanVideo) or packed tokens ``(B, N, C)`` (Flux, LTX). ``encoder_hidden_states``,
        ``pooled_projections`` (SD3, Flux, HunyuanVideo), ``added_cond_kwargs`` (SDXL) and
        ``encoder_attention_mask`` (LTX, HunyuanVideo) condition the cond branch (and the
        perturbed ones); the ``negative_*`` versions the uncond branch. ``model_kwargs``: the
        model's other arguments, the same for every branch — e.g. Flux ``img_ids``, ``txt_ids``,
        ``guidance``; Wan ``encoder_hidden_states_image``; LTX ``num_frames``, ``height``,
        ``width``, ``rope_interpolation_scale``, ``video_coords``; HunyuanVideo ``guidance``. The
        per-sample ones among them (Flux / HunyuanVideo ``guidance``, Wan
        ``encoder_hidden_states_image``, LTX ``video_coords``; see :mod:`.models`) are repeated for
        every branch, the others passed as they are. ``token_grid``: the image-token grid
        ``(H, W)`` / ``(T, H, W)`` where the model takes packed tokens (Flux; default: read once
        from ``img_ids``, a host read).
        ``combine``: ``"cfg"`` (diffusers' CFG + PAG/SEG/SLG/SAG terms and rescale); ``"cfg_norm"``
        / ``"mahiro"``: that combine followed by ComfyUI's CFGNorm (``combine_kwargs``:
        ``strength``, default 1) or Mahiro instead of ``guidance_rescale``, on the model's
        prediction as it is (ComfyUI applies them to x0); CFG alone, ``combine_kwargs`` passed to
        the op of that name: ``"apg"``, ``"cfg_zero_star"``, ``"tcfg"``, ``"mag"`` (e.g. ``alpha``)
        and ``"fdg"`` (``guidance_scale`` is then the list of per-level scales, diffusers'
        ``guidance_scales``, e.g. ``[10.0, 5.0]``).
        Returns the guided prediction in ``sample``'s layout and the model's output dtype. Runs
        under ``torch.no_grad()`` (as diffusers pipelines do): the guidance ops are inference ops.
        """
        family = self.family
        _choice("combine", combine, COMBINES)
        check_sample(FN, family, sample)
        b, device = sample.shape[0], sample.device
        if combine == "fdg":
            cfg = _level_scales_on(guidance_scale, b, device)
        else:
            cfg = _scale_on("guidance_scale", guidance_scale, b, device, cfg=True)
        on = {k: _scale_on(f"{k}_scale", s, b, device) for k, s in (("pag", pag_scale), ("seg", seg_scale),
                                                                     ("slg", slg_scale), ("sag", sag_scale))}
        _checks.scale(FN, "pag_adaptive_scale", pag_adaptive_scale, b, device)
        _checks.scale(FN, "guidance_rescale", guidance_rescale, b, device)
        if on["slg"] and not self.slg_blocks:
            raise ValueError(f"{FN}: slg_scale: SLG needs blocks to skip (GuidedDenoiser(..., slg_layers=...))")
        inputs = self._branch_inputs(b, cfg, encoder_hidden_states, negative_encoder_hidden_states, added_cond_kwargs,
                                     negative_added_cond_kwargs, pooled_projections, negative_pooled_projections,
                                     encoder_attention_mask, negative_encoder_attention_mask)
        model_kwargs = dict(model_kwargs or {})
        if (isinstance(pag_adaptive_scale, torch.Tensor) or pag_adaptive_scale) and on["pag"]:
            pag_scale = gk.adaptive_pag_scale(pag_scale, pag_adaptive_scale, timestep)
        kinds = (["uncond"] if cfg else []) + ["cond"] + [k for k in ("pag", "seg", "slg") if on[k]]
        sag = self.sag and on["sag"]
        if combine in _TWO_BRANCH and (not cfg or len(kinds) > 2 or sag):
            raise ValueError(f"{FN}: combine={combine!r} needs CFG alone (no PAG/SEG/SLG/SAG branches)")
        if combine in ("cfg_norm", "mahiro"):
            _post_cfg_check(combine, combine_kwargs, cfg, guidance_rescale)
        plan = self._plan(kinds, b)
        self._set_grids(sample, model_kwargs, token_grid, encoder_hidden_states, seg=on["seg"])
        sag_base = ("uncond" if cfg else "cond") if sag else None
        order = plan.kinds + (("sag",) if sag else ())  # the combine's branch order
        if self.parallel is None:
            out = self._compute_branches(plan.kinds, sample, timestep, inputs, model_kwargs, sag_base)
            branches = [out[k] for k in order]
        else:
            branches = _parallel.denoiser_branches(self.parallel, self, order, sag_base, sample, timestep, inputs,
                                                   model_kwargs)
        index = {k: i for i, k in enumerate(plan.kinds)}
        return self._combine(branches, index, cfg, sag, combine, combine_kwargs, guidance_scale=guidance_scale,
                             pag=pag_scale, seg=seg_scale, slg=slg_scale, sag_scale=sag_scale,
                             rescale=guidance_rescale)

    def _branch_inputs(self, b, cfg, ehs, neg_ehs, added, neg_added, pooled, neg_pooled, mask, neg_mask) -> dict:
        """Per branch kind ("cond", "uncond"): the model arguments that differ between them."""
        family = self.family
        given = {"encoder_hidden_states": (ehs, neg_ehs), "added_cond_kwargs": (added, neg_added),
                 "pooled_projections": (pooled, neg_pooled), "encoder_attention_mask": (mask, neg_mask)}
        cond, uncond = {}, {}
        for name, (positive, negative) in given.items():
            accepted = name == "encoder_hidden_states" or name in family.branch_inputs
            if not accepted:
                if positive is not None or negative is not None:
                    raise ValueError(f"{FN}: {name}: {family.cls} takes no {name}")
                continue
            if positive is None:
                if name == "encoder_hidden_states" or name in family.required:
                    raise ValueError(f"{FN}: {name}: required by {family.cls}")
                cond[name] = uncond[name] = None
                continue
            if isinstance(positive, dict):
                for key, value in positive.items():
                    _tensor_arg(f"{name}[{key!r}]", value, b)
            else:
                _tensor_arg(name, positive, b)
            if cfg:
                if negative is None:
                    raise ValueError(f"{FN}: negative_{name}: required for CFG (guidance_scale > 1)")
                if isinstance(positive, dict):
                    if not isinstance(negative, dict) or set(negative) != set(positive):
                        raise ValueError(f"{FN}: negative_{name}: needs the keys of {name} {sorted(positive)}")
                    for key, value in negative.items():
                        _tensor_arg(f"negative_{name}[{key!r}]", value, b, like=positive[key],
                                    like_name=f"{name}[{key!r}]")
                else:
                    _tensor_arg(f"negative_{name}", negative, b, like=positive, like_name=name)
            cond[name], uncond[name] = positive, negative
        return {"cond": cond, "uncond": uncond}

    def _set_grids(self, sample, model_kwargs, given, ehs, *, seg: bool) -> None:
        """Latent / token grids of this call. A grid read from the latent's shape is always checked
        (a patch size that does not divide the latent would crop it); LTX's and Flux's grids come
        from their arguments and are read only when SEG needs them."""
        state = self.state
        if self.unet:
            state.latent_hw = tuple(sample.shape[-2:])
            return
        state.text_tokens = ehs.shape[1]
        from_shape = self.family.name in ("sd3", "wan", "hunyuan_video")
        if not (seg or from_shape):
            state.token_grid = None
            return
        ids = model_kwargs.get("img_ids")
        if given is None and self.family.name == "flux" and isinstance(ids, torch.Tensor):
            cached = self._grid_ids
            if cached is not None and cached[0]() is ids and cached[1:] == (ids._version, sample.shape[1]):
                state.token_grid = cached[3]  # img_ids read once, not every step (a host sync)
                return
        state.token_grid = token_grid(FN, self.family, self.model, sample, model_kwargs, given)
        if given is None and self.family.name == "flux" and isinstance(ids, torch.Tensor):
            self._grid_ids = (weakref.ref(ids), ids._version, sample.shape[1], state.token_grid)

    def _compute_branches(self, kinds, sample, timestep, inputs, model_kwargs, sag_base=None) -> dict:
        """The predictions of the branches ``kinds`` in this process: one batched call (perturbed
        branches forked from cond when cond is among them), or one call per branch with
        ``per_branch``; then SAG's degraded branch when ``sag_base`` (the branch whose key mass and
        prediction it uses) is among ``kinds``. Returns kind -> ``(B, …)``, ``"sag"`` the degraded one."""
        b = sample.shape[0]
        plan = self._plan(list(kinds), b)
        calls = [(k,) for k in plan.kinds] if self.per_branch else [plan.kinds]
        out = {}
        try:
            for call in calls:  # per branch: a one-branch plan each (its own perturbation)
                self.state.plan = self._plan(list(call), b) if self.per_branch else plan
                self.state.sag_capture = sag_base in call  # the key mass of the SAG base's own rows only
                out.update(zip(call, self._forward(call, sample, timestep, inputs, model_kwargs).chunk(len(call))))
            if sag_base in out:
                out["sag"] = self._sag_degraded(sample, timestep, out[sag_base], inputs[sag_base], model_kwargs)
        finally:
            self.state.plan, self.state.sag_mass, self.state.sag_capture = None, None, False
        return out

    def _forward(self, kinds, sample, timestep, inputs, model_kwargs) -> torch.Tensor:
        """One model call on the branches ``kinds`` (their conditioning concatenated)."""
        return self.model(**self._model_args(kinds, sample, timestep, inputs, model_kwargs), return_dict=False)[0]

    def _model_args(self, kinds, sample, timestep, inputs, model_kwargs) -> dict:
        """The model's keyword arguments for one call on the branches ``kinds``."""
        n, b = len(kinds), sample.shape[0]
        per = [inputs["uncond" if k == "uncond" else "cond"] for k in kinds]
        args = {self.family.sample_arg: _repeat(sample, n), "timestep": self._timesteps(timestep, b, n, sample)}
        for name, value in per[0].items():
            if value is None:
                args[name] = None
            elif isinstance(value, dict):
                args[name] = {key: torch.cat([p[name][key] for p in per]) if n > 1 else value[key] for key in value}
            else:
                args[name] = torch.cat([p[name] for p in per]) if n > 1 else value
        for name, value in model_kwargs.items():
            per_sample = name in self.family.per_sample_kwargs and isinstance(value, torch.Tensor) and \
                value.dim() > 0 and value.shape[0] == b
            args[name] = _repeat(value, n) if per_sample else value
        return args

    def _timesteps(self, timestep, b: int, n: int, sample):
        if self.unet:  # UNets broadcast a scalar timestep themselves
            if isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.shape[0] == b:
                return _repeat(timestep, n)
            return timestep
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(float(timestep), device=sample.device)
        if t.dim() == 0 or (t.shape[0] == 1 and b > 1):
            t = t.reshape(1, *t.shape[1:]).expand(b, *t.shape[1:])
        if t.shape[0] != b:
            raise ValueError(f"{FN}: timestep: batch {t.shape[0]} differs from sample's {b}")
        return _repeat(t, n)

    # ------------------------------------------------------------------ combine

    def _combine(self, branches, index, cfg, sag, combine, combine_kwargs, *, guidance_scale, pag, seg, slg, sag_scale,
                 rescale):
        c = index["cond"]
        ops = self.ops
        if combine in _TWO_BRANCH:
            fn = getattr(ops, f"{combine}_combine")
            return fn(branches[c], branches[index["uncond"]], guidance_scale, rescale, **combine_kwargs)
        spec = gk.cfg(guidance_scale, uncond=index["uncond"], cond=c) if cfg else gk.Guidance(c)
        for kind, scale in (("pag", pag), ("seg", seg), ("slg", slg)):
            if kind in index:  # each is diffusers' "+ scale · (cond − perturbed)"
                spec = spec + gk.pag(scale, cond=c, perturbed=index[kind])
        if sag:
            spec = spec + gk.sag(sag_scale, uncond=index["uncond"] if cfg else c, degraded=len(branches) - 1)
        if combine == "cfg_norm":
            return ops.guidance_combine(branches, spec, rescale, c, cfg_norm=combine_kwargs.get("strength", 1.0))
        return ops.guidance_combine(branches, spec, rescale, c, mahiro=combine == "mahiro")

    # ------------------------------------------------------------------ SAG

    def _alpha_bar(self, timestep, like: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(like.device)
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        return alphas[t.to(alphas.device).long()].to(torch.float32)

    def _sag_degraded(self, sample, timestep, pred, branch_input, model_kwargs) -> torch.Tensor:
        """diffusers' SAG step: x0/eps from ``pred``, blur where the captured key mass > 1, re-noise
        to the same level, and one more forward with ``branch_input``'s conditioning."""
        state = self.state
        if state.sag_mass is None:
            raise RuntimeError(f"{FN}: SAG's key mass was not captured (is the mid block present?)")
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
            raise ValueError(f"{FN}: scheduler: unsupported prediction_type {kind!r}")
        degraded = self.ops.sag_degrade(x0.to(sample.dtype), state.sag_mass, grid=state.sag_grid,
                                        sigma=self.sag_blur_sigma, alpha_cumprod=alpha_bar.reshape(-1),
                                        eps=eps.to(sample.dtype))
        state.sag_capture = False
        state.plan = self._plan(["cond"], sample.shape[0])  # one plain branch, no perturbation
        return self._forward(("cond",), degraded, timestep, {"cond": branch_input}, model_kwargs)

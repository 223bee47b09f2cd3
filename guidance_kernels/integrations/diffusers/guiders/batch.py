"""One batched model call per denoising step inside diffusers' modular denoise loops.

Every modular denoise loop of diffusers 0.42 runs, per step::

    guider.set_state(step, num_inference_steps, t)
    batches = guider.prepare_inputs(fields)            # or prepare_inputs_from_block_state
    for batch in batches:
        guider.prepare_models(model)
        batch.noise_pred = model(latents, t, **fields of batch, …)[0]
        guider.cleanup_models(model)
    noise_pred = guider(batches)[0]

diffusers' guiders return one batch per branch. :class:`BatchedGuidance` returns ONE batch whose
fields hold every active branch's conditioning concatenated branch-major (``(K·B, …)``, the
order of :class:`~..fork.BranchPlan`), so the loop calls the model once. ``prepare_models``
installs, for that call only, a forward pre-hook on the model that repeats what the loop passes
once per sample (the latents, a per-sample timestep, the family's per-sample arguments such as
Wan's image embeddings) to the K branches, and — when a branch is perturbed — a
:class:`~..denoiser.GuidedDenoiser` for the model (built once per model and layer choice) whose
processors and routers perturb and fork the branches in that forward. ``cleanup_models`` removes
all of it: between steps the model is the stock one, so diffusers' own guiders and hooks work on
it again. ``guider(batches)`` splits the ``(K·B, …)`` prediction by branch (views, no copies) and
combines it with the fused ops.

A branch whose guidance is off this step (outside its start/stop, scale 1 for CFG or 0 for a
perturbation) leaves the batch; with the cond branch alone the loop's call is the plain one and
nothing is installed. Guidance scales never reach the model: changing them cannot recompile a
compiled model; switching a branch on or off changes the batch (one trace per branch set).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch

from . import arguments as _arguments
from ..denoiser import GuidedDenoiser
from ..models import require_family

_MISSING = object()


@dataclass(frozen=True)
class Branch:
    """One prediction of a guider: ``name`` — diffusers' identifier (``"pred_cond"``,
    ``"pred_uncond"``, ``"pred_cond_skip"``, …); ``kind`` — the :class:`GuidedDenoiser` branch kind
    (``"uncond"``, ``"cond"``, ``"pag"``, ``"seg"``, ``"slg"``); ``source`` — the element of the
    loop's ``(cond, uncond)`` field tuples that conditions it (0 or 1)."""

    name: str
    kind: str
    source: int


@dataclass
class _Step:
    """The batch of the current step: its branches (canonical order), rows per branch, and the
    plan the model call used (set by the pre-hook)."""

    branches: list[Branch]
    batch: int
    plan: object = None
    installed: list = field(default_factory=list)  # hook handles of this step's call
    engine: GuidedDenoiser | None = None


def _positional_names(module: torch.nn.Module) -> list[str]:
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in positional]


class BatchedGuidance:
    """Mixin placed before a diffusers guider class (``class X(BatchedGuidance, diffusers.X)``):
    the loop protocol of the module docstring. A subclass says which branches are active this step
    (:meth:`_active_branches`), which perturbations a model gets (:meth:`_engine_options`) and how
    the predictions combine (:meth:`_combine`)."""

    _fn = "guider"  # the name in error messages (the class name)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_fn" in cls.__dict__ and not getattr(cls.__init__, "_guider_checked", False):
            cls.__init__ = _arguments.checked(cls._fn, cls.__init__)

    def _check_configuration(self) -> None:
        """Checks of the constructed guider (its perturbation configs); after :mod:`.arguments`'."""

    # ------------------------------------------------------------------ what subclasses define

    def _active_branches(self) -> list[Branch]:
        raise NotImplementedError

    def _engine_options(self, model: torch.nn.Module) -> dict | None:
        """GuidedDenoiser keyword arguments for the perturbed branches on ``model`` (None: none)."""
        return None

    def _combine(self, pred, index: dict[str, int], num_branches: int):
        """GuiderOutput from ``pred`` — one ``(K·B, …)`` tensor or a list of K — with
        ``index[name]`` the branch position of each active prediction."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop protocol

    @property
    def is_conditional(self) -> bool:
        return True  # the one batch always holds the cond branch

    def prepare_inputs(self, data: dict) -> list:
        return self._prepare(dict(data))

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        fields = {}
        for key, value in input_fields.items():
            if isinstance(value, str):
                if hasattr(data, value):
                    fields[key] = getattr(data, value)
            elif isinstance(value, tuple):
                fields[key] = tuple(getattr(data, v, _MISSING) for v in value)
        return self._prepare(fields)

    def _prepare(self, fields: dict) -> list:
        from diffusers.modular_pipelines.modular_pipeline import BlockState

        self._release()
        branches = self._active_branches()
        batch = _rows(fields)
        state = {}
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                per = [value] * len(branches)
            elif isinstance(value, tuple):
                per = [value[b.source] if b.source < len(value) else _MISSING for b in branches]
            else:
                continue  # diffusers' guiders skip non-tensor fields too
            if any(p is _MISSING for p in per):
                continue
            state[key] = self._concat(key, per, batch)
        self._batched = _Step(branches, batch)
        identifier = "+".join(b.name for b in branches)
        return [BlockState(**state, **{self._identifier_key: identifier})]

    def _concat(self, key: str, per: list, batch: int):
        if all(p is None for p in per):
            return None
        for p in per:
            if p is None:
                raise ValueError(f"{self._fn}: {key}: None for one branch but given for another (the negative "
                                 "conditioning is missing: pass the negative prompt embeddings, or disable CFG)")
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{self._fn}: {key}: expected tensors, got {type(p).__name__}")
        if len(per) == 1:
            return per[0]
        if per[0].dim() == 0 or per[0].shape[0] != batch:
            if all(p is per[0] for p in per):
                return per[0]  # not per sample: every branch gets it as it is (as diffusers' guiders do)
            raise ValueError(f"{self._fn}: {key}: leading dimension {tuple(per[0].shape)[:1]} differs from the "
                             f"batch {batch}")
        return torch.cat(per)

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        step = getattr(self, "_batched", None)
        if step is None or len(step.branches) == 1 or step.installed:
            return
        model = getattr(denoiser, "_orig_mod", denoiser)  # a torch.compile'd model: its module
        family = require_family(self._fn, model)
        perturbed = any(b.kind not in ("uncond", "cond") for b in step.branches)
        if perturbed:
            step.engine = self._engine(model)
            step.engine.install()
        names = _positional_names(model)
        state = weakref.ref(step)

        def before(module, args, kwargs):
            current = state()
            if current is None:
                return None
            call = dict(zip(names, args))
            call.update(kwargs)
            self._expand(current, family, call)
            return (), call

        def after(module, args, output):
            current = state()
            if current is not None and current.engine is not None:
                current.engine.unroute()

        step.installed = [denoiser.register_forward_pre_hook(before, with_kwargs=True),
                          denoiser.register_forward_hook(after)]

    def _expand(self, step: _Step, family, call: dict) -> None:
        """Repeat the per-sample arguments of the loop's call to the K branches; route the call."""
        k, b = len(step.branches), step.batch
        ehs = call.get("encoder_hidden_states")
        if not isinstance(ehs, torch.Tensor) or ehs.shape[0] != k * b:
            rows = ehs.shape[0] if isinstance(ehs, torch.Tensor) else None
            raise RuntimeError(f"{self._fn}: the denoise loop called the model with encoder_hidden_states of {rows} "
                               f"rows, not the {k}×{b} of the batch from prepare_inputs (use the fields of that "
                               "batch)")
        sample = call.get(family.sample_arg)
        if not isinstance(sample, torch.Tensor) or sample.shape[0] not in (b, k * b):
            raise RuntimeError(f"{self._fn}: {family.sample_arg}: expected {b} or {k * b} rows")
        for name in (family.sample_arg, "timestep", *family.per_sample_kwargs):
            value = call.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
                call[name] = torch.cat([value] * k)
        if step.engine is not None:
            rest = {n: v for n, v in call.items() if n not in (family.sample_arg, "timestep")}
            step.plan = step.engine.route([br.kind for br in step.branches], b, call[family.sample_arg],
                                          encoder_hidden_states=ehs, model_kwargs=rest)
            if [_source(step, kind) for kind in step.plan.kinds] != [br.source for br in step.branches]:
                raise RuntimeError(f"{self._fn}: the branch order of the plan does not match the batch")

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._release()

    def _release(self) -> None:
        """Remove this step's hooks and perturbations (also after a model call that raised)."""
        step = getattr(self, "_batched", None)
        if step is None:
            return
        for handle in step.installed:
            handle.remove()
        step.installed = []
        if step.engine is not None:
            step.engine.unroute()
            step.engine.remove()

    def _engine(self, model: torch.nn.Module) -> GuidedDenoiser:
        """The GuidedDenoiser of ``model`` for this guider's layers (kept between steps; uninstalled)."""
        options = self._engine_options(model)
        key = repr(sorted(options.items()))
        engines = self.__dict__.setdefault("_engines", weakref.WeakKeyDictionary())
        cached = engines.get(model)
        if cached is None or cached[0] != key:
            try:
                engine = GuidedDenoiser(model, **options)
            except (TypeError, ValueError) as exc:  # name the guider, keep the denoiser's argument names
                raise type(exc)(f"{self._fn}: {str(exc).removeprefix('GuidedDenoiser: ')}") from None
            engine.remove()
            cached = engines[model] = (key, engine)
        return cached[1]

    def __call__(self, data: list):
        step = getattr(self, "_batched", None)
        if step is None or len(data) != 1:
            raise ValueError(f"{self._fn}: expected the one batch of prepare_inputs, got {len(data)}")
        pred = data[0].noise_pred
        kinds = [b.kind for b in step.branches] if step.plan is None else list(step.plan.kinds)
        if len(kinds) > 1 and step.plan is None and step.engine is not None:
            raise RuntimeError(f"{self._fn}: the model was not called between prepare_models and cleanup_models")
        index = {b.name: kinds.index(b.kind) for b in step.branches}
        return self._combine(pred, index, len(kinds))


def _source(step: _Step, kind: str) -> int:
    return next(b.source for b in step.branches if b.kind == kind)


def _rows(fields: dict) -> int:
    """Rows per branch: the leading dimension of the first conditioning tensor."""
    for value in fields.values():
        first = value[0] if isinstance(value, tuple) and value else value
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return first.shape[0]
    raise ValueError("guider: prepare_inputs: no conditioning tensor among the fields")


def branch(pred, index: dict[str, int], name: str, num_branches: int):
    """One branch of ``pred`` (a view of the stacked tensor, or the list entry); None if inactive."""
    if name not in index:
        return None
    if isinstance(pred, (list, tuple)):
        return pred[index[name]]
    b = pred.shape[0] // num_branches
    return pred[index[name] * b:(index[name] + 1) * b]

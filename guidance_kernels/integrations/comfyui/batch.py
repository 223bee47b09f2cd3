"""One model call for every guidance branch: the ``CALC_COND_BATCH`` wrapper and the routing it hands
to the attention and block patches.

ComfyUI's sampler asks for ``calc_cond_batch(model, [cond, uncond], x, sigma, options)`` once per
step; the stock PAG/SEG/SLG nodes then call it again, once per perturbed branch. Here a node adds a
:class:`Participant` to the patched model instead, and ONE wrapper (:func:`calc_cond_batch_wrapper`,
registered once per model under :data:`KEY`) extends the sampler's request:

* every active participant with a branch appends a copy of ``cond`` to the list; ComfyUI batches
  the copies with cond and uncond as chunks of one model call, and its ``cond_or_uncond`` list
  tells each patch which chunk is which (the appended copies get the indices 2, 3, …);
* a :class:`Routing` — which chunk index belongs to which participant, and which participants
  record something (SAG's key mass) — travels to the patches in ``transformer_options[KEY]``;
* the branches' predictions are kept on their participants, keyed by the very latent tensor of
  the call, and the sampler gets back exactly what it asked for: ``[cond, uncond]``.

The post-CFG functions then read their branch with :meth:`Participant.take` (``args["input"]`` is
the same tensor object). Where ComfyUI splits the batch into several model calls under memory
pressure, the routing and ``cond_or_uncond`` still describe each call, so every result stays right.
When a prediction was not kept for that latent (another node re-ran the model on another input,
context windows, …) the participant's branch is computed by one separate call, as the stock nodes
always do. Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KEY = "guidance_kernels"  # transformer_options: the Routing of the current model call; wrapper key
PARTICIPANTS = "guidance_kernels_participants"  # transformer_options: the patched model's participants


class Shared:
    """ComfyUI deep-copies ``model_options`` on every ``ModelPatcher.clone()``; the objects the
    patches, the wrapper and the post-CFG functions share must stay ONE object per node."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class Participant(Shared):
    """One guidance method's share of the step's main model call (the state of one node).

    ``branch``: the method appends a copy of ``cond`` (PAG, SEG, SLG); ``records``: its patches
    capture something from the uncond chunk (SAG's key mass). :meth:`active` says whether it takes
    part in the step at ``sigma`` (scale 0 and sigma windows drop the branch from the batch)."""

    branch = True
    records = False

    def __init__(self, name: str):
        self.name = name
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def active(self, sigma: torch.Tensor, x: torch.Tensor) -> bool:
        return True

    def keep(self, x: torch.Tensor, value: torch.Tensor) -> None:
        self._kept = (x, value)

    def kept(self, x: torch.Tensor) -> bool:
        return self._kept is not None and self._kept[0] is x

    def take(self, x: torch.Tensor) -> torch.Tensor | None:
        """The value kept for the latent ``x`` (the same tensor object), once; None if there is none."""
        if not self.kept(x):
            return None
        value, self._kept = self._kept[1], None
        return value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@dataclass(frozen=True, eq=False)
class Routing(Shared):
    """What the patches of one model call need to know: ``branches`` maps a ``cond_or_uncond``
    chunk index to the participant whose branch it is; ``recorders`` read the chunk ``uncond``."""

    x: torch.Tensor
    branches: dict = field(default_factory=dict)
    recorders: tuple = ()
    uncond: int | None = 1

    def participant(self, chunk: int) -> Participant | None:
        return self.branches.get(chunk)


def routed(model_options: dict, routing: Routing) -> dict:
    """A shallow copy of ``model_options`` whose transformer options carry ``routing``."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), KEY: routing}
    return options


def participants(model_options: dict) -> tuple:
    return model_options.get("transformer_options", {}).get(PARTICIPANTS, ())


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """``WrappersMP.CALC_COND_BATCH`` wrapper: the sampler's ``[cond, uncond]`` request (uncond may be
    None: ComfyUI's CFG-1 short-cut) gains one chunk per active participant's branch. Other requests
    (a node's own extra call, an already routed call) pass through untouched."""
    options = model_options.get("transformer_options", {})
    members = options.get(PARTICIPANTS, ())
    if not members or KEY in options or len(conds) != 2 or conds[0] is None:
        return executor(model, conds, x_in, timestep, model_options)
    active = [p for p in members if p.active(timestep, x_in)]
    if not active:
        return executor(model, conds, x_in, timestep, model_options)
    branches = {}
    for p in active:
        if p.branch:
            branches[len(conds) + len(branches)] = p
    routing = Routing(x_in, branches, tuple(p for p in active if p.records))
    out = executor(model, list(conds) + [conds[0]] * len(branches), x_in, timestep, routed(model_options, routing))
    for index, p in branches.items():
        p.keep(x_in, out[index])
    return out[: len(conds)]


def install(patcher, participant: Participant) -> None:
    """Add ``participant`` to the patched model ``patcher`` (a clone the caller owns) and make sure
    the one wrapper is registered."""
    from comfy.patcher_extension import WrappersMP

    to = dict(patcher.model_options.get("transformer_options", {}))
    to[PARTICIPANTS] = tuple(to.get(PARTICIPANTS, ())) + (participant,)
    patcher.model_options["transformer_options"] = to
    if not patcher.get_wrappers(WrappersMP.CALC_COND_BATCH, KEY):
        patcher.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, KEY, calc_cond_batch_wrapper)


def branch_prediction(participant: Participant, args: dict) -> torch.Tensor:
    """A post-CFG function's perturbed prediction: the one kept from the main call, else one separate
    call on ``[cond]`` routed to the participant (what the stock nodes do every step)."""
    x = args["input"]
    value = participant.take(x)
    if value is None:
        import comfy.samplers

        options = routed(args["model_options"], Routing(x, {0: participant}, (), uncond=None))
        (value,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], x, args["sigma"], options)
    return value


def recorded_uncond(recorder: Participant, args: dict) -> torch.Tensor:
    """A recorder's value for this step: the one captured in the main call, else one separate call on
    ``[uncond]`` that records it (its prediction is discarded)."""
    x = args["input"]
    value = recorder.take(x)
    if value is None:
        import comfy.samplers

        options = routed(args["model_options"], Routing(x, {}, (recorder,), uncond=0))
        comfy.samplers.calc_cond_batch(args["model"], [args["uncond"]], x, args["sigma"], options)
        value = recorder.take(x)
    return value

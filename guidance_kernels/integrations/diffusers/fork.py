"""Branch plans and shared-prefix forwards: perturbed branches join the batch at their first
perturbed block instead of recomputing the cond branch's prefix.

A PAG or SEG branch sees the same latent and condition as the cond branch, so every layer before
its first perturbed one computes exactly the cond activations. With forking, one denoiser call
starts with the unperturbed branches only (``[uncond, cond]``); at the top-level block holding a
branch's first perturbed layer, that branch joins as a copy of the cond rows. Every tensor a later
block takes from before the fork — UNet skip connections from the down blocks, the timestep
embedding, the text embeddings, a DiT's text-stream state, attention masks — is extended the same
way when that block receives it, by a forward pre-hook on each top-level block: a tensor's batch
size tells how many branches it carries (``n·b``), and the missing branches are cond copies. The
result equals the full batched forward (up to the rounding of different GEMM batch sizes); it is an
optimisation, not an approximation.

Hooks are installed once; what they do is read from a :class:`ForwardState` that the guided
denoiser sets before each call (no module swapping between steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layers import block_of, top_level_blocks


@dataclass(frozen=True)
class BranchPlan:
    """The branches of one denoiser call, in batch order, and where each joins the batch.

    ``kinds``: e.g. ``("uncond", "cond", "pag", "seg")``; ``batch``: samples per branch (b);
    ``joins``: per branch, the top-level block at which it joins (None: present from the start);
    ``blocks``: the model's top-level blocks in forward order.
    """

    kinds: tuple[str, ...]
    batch: int
    joins: tuple[str | None, ...]
    blocks: tuple[str, ...]
    cond: int = field(default=0)

    @property
    def initial(self) -> int:
        """Branches present when the forward starts."""
        return sum(1 for j in self.joins if j is None)

    def present_at(self, block: str) -> int:
        """Branches present once ``block`` starts (branches join in batch order)."""
        position = self.blocks.index(block)
        return sum(1 for j in self.joins if j is None or self.blocks.index(j) <= position)

    def kind_of_rows(self, rows: int) -> list[str]:
        """Branch kind of each of ``rows`` batch rows (rows = n·b, the first n branches)."""
        n = rows // self.batch
        return [kind for kind in self.kinds[:n] for _ in range(self.batch)]


def plan_branches(model: torch.nn.Module, kinds: list[str], perturbed_layers: dict[str, list[str]], batch: int,
                  *, fork: bool) -> BranchPlan:
    """Order the branches and decide where each perturbed one joins.

    ``kinds`` lists the unperturbed branches first (``uncond`` optional, then ``cond``) followed
    by the perturbed ones; ``perturbed_layers[kind]`` are the layers that kind perturbs. With
    ``fork``, perturbed branches are ordered by their first perturbed block and join there;
    without, every branch is present from the start (the full batched forward)."""
    blocks = tuple(top_level_blocks(model))
    plain = [k for k in kinds if k not in perturbed_layers]
    perturbed = [k for k in kinds if k in perturbed_layers]
    first = {k: min(blocks.index(block_of(model, layer)) for layer in perturbed_layers[k]) for k in perturbed}
    perturbed.sort(key=lambda k: first[k])
    ordered = tuple(plain + perturbed)
    joins = tuple(None if (k in plain or not fork) else blocks[first[k]] for k in ordered)
    return BranchPlan(kinds=ordered, batch=batch, joins=joins, blocks=blocks, cond=ordered.index("cond"))


class ForwardState:
    """What the installed hooks and processors read during one denoiser call."""

    def __init__(self) -> None:
        self.plan: BranchPlan | None = None
        self.grid: tuple[int, int] | None = None  # latent (H, W) of this call
        self.extras: dict = {}


def _extend(x, plan: BranchPlan, target: int):
    """``x`` with cond copies appended until it carries ``target`` branches; other values as is."""
    if isinstance(x, (tuple, list)):
        return type(x)(_extend(item, plan, target) for item in x)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    rows = x.shape[0]
    if rows % plan.batch != 0:
        return x
    have = rows // plan.batch
    if have >= target or have < plan.initial:
        return x
    cond = x[plan.cond * plan.batch:(plan.cond + 1) * plan.batch]
    return torch.cat([x] + [cond] * (target - have), dim=0)


def install_fork_hooks(model: torch.nn.Module, state: ForwardState) -> list:
    """Pre-hooks on every top-level block (and a DiT's ``norm_out``) that extend pre-fork tensors.
    Returns the hook handles (``handle.remove()`` uninstalls)."""
    handles = []
    blocks = top_level_blocks(model)
    for name in blocks:
        handles.append(model.get_submodule(name).register_forward_pre_hook(_make_hook(state, name), with_kwargs=True))
    norm_out = getattr(model, "norm_out", None)
    if norm_out is not None and not hasattr(model, "up_blocks"):
        handles.append(norm_out.register_forward_pre_hook(_make_hook(state, blocks[-1]), with_kwargs=True))
    return handles


def _make_hook(state: ForwardState, block: str):
    def hook(module, args, kwargs):
        plan = state.plan
        if plan is None or all(j is None for j in plan.joins):
            return None
        target = plan.present_at(block)
        return _extend(tuple(args), plan, target), {k: _extend(v, plan, target) for k, v in kwargs.items()}

    return hook

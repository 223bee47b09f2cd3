"""Branch plans and row routing: every branch in ONE batched forward, perturbed branches forked
from the cond branch at their first perturbed block, layer skips as a per-branch mode.

The denoiser hands the model the whole batch ``[uncond, cond, perturbed…]`` (``K`` branches of
``b`` rows each, branch-major). Everything outside the top-level blocks (embeddings, rotary
tables, the output projection) runs on all rows, as in a plain batched call. Inside, routers —
a forward pre-hook and a forward hook on a module — let the module compute only some branches'
rows and fill the others afterwards:

* a branch that has not joined yet (its first perturbed block is later) equals the cond branch
  there: the block runs without its rows, which become copies of the cond rows' output. So the
  shared prefix is computed once (``fork=True``); the result is exact, not an approximation.
* a branch that skips the block (SLG / STG-R, ``slg_skip="block"``) gets the block's inputs back
  in the block's own return order (Flux / SD3 blocks return ``(encoder, hidden)``, HunyuanVideo
  ``(hidden, encoder)``, Wan / LTX ``hidden``); with ``slg_skip="attention"`` / ``"ff"`` the same
  happens at the block's self-attention / feed-forward modules.

Which rows a module computes is read from the :class:`BranchPlan` in the :class:`ForwardState`
that the denoiser sets before each call (hooks are installed once; nothing is swapped between
steps). Arguments are routed when their leading dimension is the module's incoming row count,
except the family's shared arguments (rotary tables); nested tuples, lists and dicts are walked.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .ops import FUSED, Ops

SKIP_MODES = ("block", "attention", "ff")


@dataclass(frozen=True)
class Route:
    """The rows of one module call, in b-row groups.

    ``incoming``: the branch of each group the module receives; ``run``: the groups it computes
    (positions in ``incoming``, increasing); ``fill``: for every incoming group, where its output
    comes from — ``("run", i)`` the i-th computed group, ``("input", j)`` incoming group j of the
    module's own inputs (a skip), ``("copy", i)`` a copy of computed group i (the cond rows)."""

    incoming: tuple[int, ...]
    run: tuple[int, ...]
    fill: tuple[tuple[str, int], ...]


@dataclass(frozen=True, eq=False)
class BranchPlan:
    """The branches of one denoiser call, in batch order, and what each module computes.

    ``kinds``: e.g. ``("uncond", "cond", "pag", "slg")``; ``batch``: rows per branch (b);
    ``blocks``: the model's top-level blocks in forward order; ``joins``: per branch, the index
    of the block at which it joins (None: present from the start); ``routes``: module name →
    :class:`Route` where a module does not compute all its incoming rows; ``computes``: module
    name → branches whose rows the module computes, for the modules whose processors ask."""

    kinds: tuple[str, ...]
    batch: int
    blocks: tuple[str, ...]
    joins: tuple[int | None, ...]
    routes: dict = field(default_factory=dict)
    computes: dict = field(default_factory=dict)

    def kinds_at(self, module: str) -> tuple[str, ...]:
        """Kinds of the b-row groups ``module`` computes (all branches if it is not routed)."""
        return tuple(self.kinds[i] for i in self.computes.get(module, range(len(self.kinds))))


@dataclass(frozen=True)
class Perturbation:
    """Where one perturbed branch departs from cond: ``first`` (block index of its first perturbed
    layer) and, for a layer-skip branch, ``skips``: block index → skip mode."""

    first: int
    skips: dict = field(default_factory=dict)


def _route(incoming: tuple[int, ...], keep: list[bool], sources: list[str], cond: int) -> Route | None:
    """Route of a module receiving the groups of ``incoming`` and computing those with ``keep``;
    ``sources[i]`` fills a dropped group: ``"input"`` (its own input) or ``"copy"`` (cond's output)."""
    if all(keep):
        return None
    computed = keep if any(keep) else [True] * len(keep)  # models need a non-empty batch: compute, then replace
    run = tuple(i for i, k in enumerate(computed) if k)
    position = {i: n for n, i in enumerate(run)}
    fill = []
    for i in range(len(incoming)):
        if keep[i]:
            fill.append(("run", position[i]))
        elif sources[i] == "input":
            fill.append(("input", i))
        else:
            fill.append(("copy", position[incoming.index(cond)]))
    return Route(incoming, run, tuple(fill))


def plan_branches(blocks: list[str], kinds: list[str], perturbations: dict[str, Perturbation], batch: int, *,
                  fork: bool, modules: dict[str, dict[str, list[str]]] | None = None,
                  layers: dict[str, str] | None = None) -> BranchPlan:
    """Order the branches and decide which rows every routed module computes.

    ``kinds`` lists the unperturbed branches (``uncond`` optional, then ``cond``) and the
    perturbed ones; ``perturbations[kind]`` says where each perturbed kind departs from cond. With
    ``fork``, perturbed branches are ordered by their first perturbed block and join there; without,
    every branch is present from the start (the full batched forward). ``modules[block][mode]``:
    the attention / feed-forward module names a ``"attention"`` / ``"ff"`` skip routes in that
    block; ``layers``: layer name → its block, for the layers whose processors need their rows."""
    blocks = tuple(blocks)
    modules = modules or {}
    plain = [k for k in kinds if k not in perturbations]
    perturbed = sorted((k for k in kinds if k in perturbations), key=lambda k: perturbations[k].first)
    ordered = tuple(plain + perturbed)
    joins = tuple(perturbations[k].first if (k in perturbations and fork) else None for k in ordered)
    cond = ordered.index("cond") if "cond" in ordered else None  # a per-branch plan holds one branch
    routes, computes = {}, {}
    for index, block in enumerate(blocks):
        absent = [j is not None and j > index for j in joins]
        mode = [perturbations[k].skips.get(index) if k in perturbations else None for k in ordered]
        incoming = tuple(range(len(ordered)))
        keep = [not (absent[i] or mode[i] == "block") for i in incoming]
        route = _route(incoming, keep, ["input" if mode[i] == "block" else "copy" for i in incoming], cond)
        if route is not None:
            routes[block] = route
        block_run = incoming if route is None else tuple(incoming[i] for i in route.run)
        computes[block] = block_run
        for skip in ("attention", "ff"):
            if not any(m == skip for m in mode):
                continue
            sub_keep = [mode[i] != skip for i in block_run]
            for name in modules.get(block, {}).get(skip, ()):
                sub = _route(block_run, sub_keep, ["input"] * len(block_run), cond)
                routes[name] = sub
                computes[name] = tuple(block_run[i] for i in sub.run)
    for layer, block in (layers or {}).items():
        computes[layer] = computes.get(layer, computes[block])
    return BranchPlan(kinds=ordered, batch=batch, blocks=blocks, joins=joins, routes=routes, computes=computes)


@dataclass
class ForwardState:
    """What the installed hooks and processors read during one denoiser call.

    ``ops``: the operations (fused or reference, see :mod:`.ops`); ``seg_sigma`` / ``seg_blur``
    (``"frame"`` or ``"3d"``): SEG's blur; ``plan``: the branch plan of the current call (None:
    no guided call running; processors act as the model's own); ``latent_hw``: the UNet latent
    (H, W) (layer grids are derived from it); ``token_grid``: a DiT's (T, H, W) image/video token
    grid (None when no branch needs it); ``text_tokens``: text tokens of joint attention;
    ``sag_capture``: capture SAG's key mass in this forward; ``sag_mass`` / ``sag_grid``: the
    captured mass (uncond rows) and its (h, w) map grid."""

    ops: Ops = FUSED
    seg_sigma: float = 9999999.0
    seg_blur: str = "frame"
    plan: BranchPlan | None = None
    latent_hw: tuple[int, int] | None = None
    token_grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    sag_capture: bool = False
    sag_mass: torch.Tensor | None = None
    sag_grid: tuple[int, int] | None = None


# --------------------------------------------------------------------------- routing hooks


def _rows(x, groups: tuple[int, ...], b: int):
    """The rows of the b-row ``groups`` of ``x`` (a slice when they are contiguous)."""
    if groups == tuple(range(groups[0], groups[-1] + 1)):
        return x[groups[0] * b:(groups[-1] + 1) * b]
    return torch.cat([x[g * b:(g + 1) * b] for g in groups])


def _select(x, rows: int, groups: tuple[int, ...], b: int):
    if isinstance(x, torch.Tensor):
        return _rows(x, groups, b) if x.dim() > 0 and x.shape[0] == rows else x
    if isinstance(x, (tuple, list)):
        return type(x)(_select(item, rows, groups, b) for item in x)
    if isinstance(x, dict):
        return {k: _select(v, rows, groups, b) for k, v in x.items()}
    return x


def _assemble(out, route: Route, b: int, source):
    """Full-batch output from the computed groups (``out``) and the dropped ones' ``source``
    (the module's incoming tensor that output stands for; None where no group skips)."""
    if isinstance(out, (tuple, list)):
        sources = list(source) if isinstance(source, (tuple, list)) else [source]
        sources += [None] * (len(out) - len(sources))
        return type(out)(_assemble(o, route, b, s) for o, s in zip(out, sources))
    if isinstance(source, (tuple, list)):
        source = source[0]
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != len(route.run) * b:
        return out
    pieces, span = [], None
    for what, i in route.fill + (("end", 0),):
        if what == "run" and span is not None and i == span[1]:
            span = (span[0], i + 1)  # consecutive computed groups stay one slice
            continue
        if span is not None:
            pieces.append(out[span[0] * b:span[1] * b])
            span = None
        if what == "run":
            span = (i, i + 1)
        elif what == "copy":
            pieces.append(out[i * b:(i + 1) * b])
        elif what == "input":
            pieces.append(source[i * b:(i + 1) * b])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class Router:
    """Pre-hook + hook pair of one module (see the module docstring). ``returns``: the argument
    names the module's output positions stand for (what a skip passes through)."""

    def __init__(self, state: ForwardState, name: str, module: torch.nn.Module, returns: tuple[str, ...],
                 shared: frozenset):
        self.state, self.name, self.returns, self.shared = state, name, returns, shared
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.params = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in positional]
        self.saved = None

    def _source(self, args, kwargs):
        """The incoming tensors of the arguments the output positions stand for."""
        found = []
        for name in self.returns:
            if name in kwargs:
                found.append(kwargs[name])
            elif name in self.params and self.params.index(name) < len(args):
                found.append(args[self.params.index(name)])
            else:
                found.append(None)
        return found

    def before(self, module, args, kwargs):
        plan = self.state.plan
        route = None if plan is None else plan.routes.get(self.name)
        if route is None:
            return None
        b = plan.batch
        rows = len(route.incoming) * b
        if any(what == "input" for what, _ in route.fill):
            self.saved = self._source(args, kwargs)
        names = self.params[:len(args)]
        args = tuple(a if name in self.shared else _select(a, rows, route.run, b) for name, a in zip(names, args)) + \
            tuple(_select(a, rows, route.run, b) for a in args[len(names):])
        kwargs = {k: v if k in self.shared else _select(v, rows, route.run, b) for k, v in kwargs.items()}
        return args, kwargs

    def after(self, module, args, output):
        plan = self.state.plan
        route = None if plan is None else plan.routes.get(self.name)
        if route is None:
            return None
        source, self.saved = self.saved, None
        return _assemble(output, route, plan.batch, source)


def install_routers(model: torch.nn.Module, state: ForwardState, names: list[str], returns: dict[str, tuple],
                    shared: frozenset) -> list:
    """Routers on the named modules (``returns[name]``: what a skip of that module passes through).
    Returns the hook handles (``handle.remove()`` uninstalls)."""
    handles = []
    for name in names:
        module = model.get_submodule(name)
        router = Router(state, name, module, returns.get(name, ("hidden_states",)), shared)
        handles.append(module.register_forward_pre_hook(router.before, with_kwargs=True))
        handles.append(module.register_forward_hook(router.after))
    return handles

"""Branch-parallel guidance: the branches of one guided step shared out over the ranks of a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPU); every rank ends the step with the
same guided prediction, bit for bit the single-process one (see *Exactness*).

Three parts, each usable on its own — :class:`~.denoiser.GuidedDenoiser` uses all three through
``GuidedDenoiser(..., process_group=pg)``, a diffusers guider can do the same with its branches:

* **placement** (:func:`place`): a step's branches are :class:`Branch` es — a cost when computed
  alone and, optionally, the ``parent`` branch it forks from (its cost when computed forked
  inside the parent's call: a PAG / SEG / SLG branch from its first perturbed block on) or that it
  is ``pinned`` to (SAG's degraded branch needs its base branch's prediction and key mass). The
  placement minimises the step's makespan, the largest per-rank cost, over every partition of
  the branches into at most ``size`` groups: a forked branch is on its parent's rank (where its
  prefix is), one placed elsewhere is computed whole. With more ranks than branches this is
  whole-branch placement — every branch on a rank of its own, forked branches recomputing their
  prefix — unless pinning makes the step longer anyway. Ties go to less total work, then to the
  first partition in a fixed order: every rank computes the same placement without talking.
* **exchange** (:meth:`BranchParallel.run`): one ``all_to_all_single`` per step. Each rank sends
  its branches' predictions to every other rank and receives exactly those it lacks — (K − k_r)
  predictions for K branches, k_r of them its own; no padding to the busiest rank, no up-cast —
  plus one status element (a failed rank says so in the same collective).
* **combine**: not distributed. Every rank runs the same fused combine on the same bytes (all
  predictions, in the single-process branch order), so guidance rescale, APG and CFG-Zero* need no
  statistics collective and every rank's result is the single-process result. Summing per-rank
  partial combines (an all-reduce, which moves less when K > 2) adds in another order and changes
  the last bits — why other CFG-parallel implementations drift from their serial path.

**Exactness.** A rank computes its branches with the single-process code, the exchange copies
bytes, the combine is the same op on the same bytes. What can differ is the model's own
arithmetic: a rank's call holds fewer rows than the single-process call (``[uncond]`` and
``[cond, pag]`` instead of ``[uncond, cond, pag]``), and many kernels give a row a result that
depends on the rows around it — cuBLAS chooses its GEMM algorithm by the problem size, CPU kernels
take vectorised or scalar paths by position (the tiny fp32 test models differ by ~1e-6 relative).
guidance_kernels' own ops compute every row independently of the others. For bit-identity
whatever the model's kernels do, keep every model call the same in both runs:

* ``per_branch=True``: every model call holds one branch (B rows), in the single-process run and
  on every rank — the parallel result equals the single-process ``per_branch=True`` result bit for
  bit (branches are then computed whole, as in single-process per-branch mode);
* ``process_group=BranchParallel(size=N)``: the single-process run *with the N-rank run's calls*
  (each rank's share computed here, one after another) — equal bit for bit to the N-rank run,
  forks included. Use it to check a multi-GPU run on one GPU, or to reproduce its output.

**Failures.** A rank whose share raises (e.g. out of memory) still takes part in the step's
exchange, with its status set and its error text in place of its predictions, then re-raises.
The others raise :class:`BranchParallelError` naming that rank and its error (CPU tensors: read
on the host), or, on CUDA, fail a device-side assert at their next synchronisation (reading the
status on the host would synchronise every step); nobody waits for the failed rank. A rank that
dies without raising (killed, segfault) leaves the others to the process group's timeout.

Requirements: every rank calls with the same arguments (latents, conditioning, scales) and
builds the same model; the predictions' device is the group's (CUDA for NCCL, CPU for gloo).
No host synchronisation besides the collective; placements are plain Python computed once per
branch set and shape.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

MAX_BRANCHES = 10  # placements are found by enumerating partitions (Bell(10) = 115 975)
_ALIGN_BYTES = 128  # each rank's contribution starts this aligned in the exchange buffer
FAILED = 1.0  # the status element of a rank whose share raised
_TEXT_BYTES = 4096  # at most this much of a failed rank's error text is relayed


class BranchParallelError(RuntimeError):
    """Another rank of the process group failed in its share of the step (``rank``)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Branch:
    """One branch of a step, for :func:`place`.

    ``cost``: its cost computed alone (any unit; the denoiser counts FLOPs); ``parent``: the
    branch it forks from or depends on (None: independent); ``forked_cost``: its added cost when
    computed forked inside ``parent``'s call on the same rank (None: it does not fork; on its
    parent's rank it costs ``cost``); ``pinned``: it must run on its parent's rank."""

    name: str
    cost: float
    parent: str | None = None
    forked_cost: float | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Placement:
    """Where the branches of a step run.

    ``names``: every branch, in the combine's order; ``groups``: per rank, its branches (in
    ``names`` order; empty: an idle rank); ``forked``: the branches computed forked inside their
    parent's call; ``loads``: per rank, the cost it computes."""

    names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    forked: frozenset
    loads: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.groups)

    @property
    def makespan(self) -> float:
        return max(self.loads)

    def rank_of(self, name: str) -> int:
        return next(r for r, group in enumerate(self.groups) if name in group)


def _check_branches(fn: str, branches, size) -> tuple[Branch, ...]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{fn}: size: expected a positive int, got {size!r}")
    branches = tuple(branches)
    if not branches or not all(isinstance(b, Branch) for b in branches):
        raise TypeError(f"{fn}: branches: expected a non-empty sequence of Branch")
    if len(branches) > MAX_BRANCHES:
        raise ValueError(f"{fn}: branches: at most {MAX_BRANCHES} branches, got {len(branches)}")
    names = [b.name for b in branches]
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: branches: names must be unique, got {names}")
    for b in branches:
        for what, value in (("cost", b.cost), ("forked_cost", b.forked_cost)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{fn}: branches: {b.name!r}: {what} must be a finite number >= 0, got {value!r}")
        if b.parent is not None and (b.parent not in names or b.parent == b.name):
            raise ValueError(f"{fn}: branches: {b.name!r}: parent {b.parent!r} is not another branch of the step")
        if (b.pinned or b.forked_cost is not None) and b.parent is None:
            raise ValueError(f"{fn}: branches: {b.name!r}: pinned / forked_cost need a parent")
    return branches


def place(branches, size: int) -> Placement:
    """The placement of ``branches`` (a sequence of :class:`Branch`, the combine's order) on
    ``size`` ranks (see the module docstring): the minimal makespan, then the least total work,
    then the first such partition in restricted-growth order. Group i goes to rank i, groups
    ordered by their first branch; idle ranks come last."""
    branches = _check_branches("place", branches, size)
    index = {b.name: i for i, b in enumerate(branches)}
    parent = [index.get(b.parent) for b in branches]
    best: list = [None]

    def load(members: list[int], block: list[int]) -> float:
        total = 0.0
        for i in members:
            b = branches[i]
            forked = b.forked_cost is not None and block[parent[i]] == block[i]
            total += b.forked_cost if forked else b.cost
        return total

    def visit(block: list[int], used: int) -> None:
        i = len(block)
        if i == len(branches):
            if any(b.pinned and block[parent[j]] != block[j] for j, b in enumerate(branches)):
                return
            loads = [load([j for j in range(i) if block[j] == g], block) for g in range(used)]
            key = (max(loads), sum(loads))
            if best[0] is None or key < best[0][0]:
                best[0] = (key, tuple(block), loads)
            return
        for g in range(min(used + 1, size)):
            block.append(g)
            visit(block, max(used, g + 1))
            block.pop()

    visit([], 0)  # one group holding everything is always feasible
    _, block, loads = best[0]
    groups = [tuple(b.name for j, b in enumerate(branches) if block[j] == g) for g in range(size)]
    forked = frozenset(b.name for j, b in enumerate(branches)
                       if b.forked_cost is not None and block[parent[j]] == block[j])
    loads = tuple(loads) + (0.0,) * (size - len(loads))
    return Placement(tuple(b.name for b in branches), tuple(groups), forked, loads)


# --------------------------------------------------------------------------- exchange


def resolve(fn: str, process_group) -> BranchParallel | None:
    """``GuidedDenoiser(process_group=...)``: None, a ProcessGroup or a BranchParallel."""
    if process_group is None or isinstance(process_group, BranchParallel):
        return process_group
    if isinstance(process_group, dist.ProcessGroup):
        return BranchParallel(process_group)
    raise TypeError(f"{fn}: process_group: expected a torch.distributed ProcessGroup or a BranchParallel, got "
                    f"{type(process_group).__name__}")


class BranchParallel:
    """Placement and exchange of a step's branches on one process group.

    Args:
        process_group: the ranks that share the steps (``torch.distributed.group.WORLD``, a
            ``new_group``); None with ``size``: every rank's share runs in this process, one
            after another — the single-process run whose model calls are an N-rank run's.
        size: the number of ranks to emulate without a process group.

    Entry points: :meth:`place` (cached :func:`place`) and :meth:`run`.
    """

    def __init__(self, process_group=None, *, size: int | None = None):
        fn = "BranchParallel"
        if process_group is None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{fn}: size: without a process group, give the number of ranks to emulate "
                                 f"(a positive int), got {size!r}")
            self.group, self.rank, self.size = None, None, size
        else:
            if not isinstance(process_group, dist.ProcessGroup):
                raise TypeError(f"{fn}: process_group: expected a torch.distributed ProcessGroup, got "
                                f"{type(process_group).__name__}")
            if size is not None and size != process_group.size():
                raise ValueError(f"{fn}: size: {size} differs from the process group's {process_group.size()}")
            self.group, self.rank, self.size = process_group, process_group.rank(), process_group.size()
        self._placements: dict = {}
        self._flops = weakref.WeakKeyDictionary()  # denoiser -> {input signature: _Flops}

    def __repr__(self) -> str:
        where = "emulated in one process" if self.group is None else f"rank {self.rank}"
        return f"BranchParallel(size={self.size}, {where})"

    @property
    def placements(self) -> list[Placement]:
        """The placements made so far (one per branch set and cost), e.g. to see where a
        GuidedDenoiser's branches ran: ``den.parallel.placements``."""
        return list(self._placements.values())

    def place(self, branches) -> Placement:
        """:func:`place` on this group's size, cached per branch list."""
        branches = tuple(branches)
        if branches not in self._placements:
            self._placements[branches] = place(branches, self.size)
        return self._placements[branches]

    def run(self, placement: Placement, compute, *, shape, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Every branch's prediction, in ``placement.names`` order, identical on every rank.

        ``compute(names)`` computes the branches ``names`` (one rank's group, in ``names``
        order) in this process and returns ``{name: prediction}``; every prediction has ``shape``
        and ``dtype`` (one branch's, the same for all branches) and lives on ``device``. The
        returned tensors are views of one buffer (contiguous, one per branch)."""
        fn = "BranchParallel.run"
        if not isinstance(placement, Placement) or placement.size != self.size:
            raise ValueError(f"{fn}: placement: expected a Placement for {self.size} ranks")
        shape, device = tuple(shape), torch.device(device)
        numel = math.prod(shape)
        if self.group is None:
            flat = torch.cat([piece for r in range(self.size) for piece in self._contribution(
                self._share(placement, r, compute, shape, dtype), placement, r, numel, dtype, device)])
        else:
            try:
                local = self._share(placement, self.rank, compute, shape, dtype)
                failure = None
            except BaseException as exc:  # noqa: BLE001 - every failure is told to the peers, then re-raised
                local, failure = None, exc
            flat = self._exchange(local, failure, placement, numel, dtype, device)
        return self._views(flat, placement, shape, numel, dtype)

    # ------------------------------------------------------------------ internals

    def _share(self, placement, rank, compute, shape, dtype) -> list[torch.Tensor]:
        group = placement.groups[rank]
        if not group:
            return []
        out = compute(group)
        if not isinstance(out, dict) or set(out) != set(group):
            got = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise ValueError(f"BranchParallel.run: compute: must return {{name: prediction}} for {list(group)}, "
                             f"got {got}")
        for name in group:
            t = out[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"BranchParallel.run: compute: {name!r}: expected {shape} {dtype}, got {what}")
        return [out[name] for name in group]

    @staticmethod
    def _length(count: int, numel: int, dtype) -> int:
        """Elements of one rank's contribution: its predictions, a status element, padding."""
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        return -(-(count * numel + 1) // align) * align

    def _contribution(self, parts, placement, rank, numel, dtype, device, *, status: float = 0.0) -> list:
        """One rank's contribution, as pieces: its predictions flat, then zeros (to a 128-byte
        boundary) ending in the status element."""
        length = self._length(len(placement.groups[rank]), numel, dtype)
        tail = torch.zeros(length - len(parts) * numel, dtype=dtype, device=device)
        tail[-1] = status
        return [p.reshape(-1) for p in parts] + [tail]

    def _failure_contribution(self, exc, placement, numel, dtype, device) -> list:
        """A failed rank's contribution: status FAILED and, in its predictions' place, its error text."""
        (tail,) = self._contribution([], placement, self.rank, numel, dtype, device, status=FAILED)
        text = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        room = min(_TEXT_BYTES, (tail.numel() - 1) * tail.element_size()) - 1  # NUL-terminated
        if room > 0:
            data = torch.frombuffer(bytearray(text[:room]), dtype=torch.uint8)
            tail.view(torch.uint8)[:data.numel()] = data.to(device)
        return [tail]

    def _collect(self, send: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The step's one collective: ``send`` holds this rank's contribution once per rank (itself
        included); returns everyone's contributions concatenated in rank order (``lengths``: each
        rank's). Traceable by torch.compile (the c10d call becomes a functional collective)."""
        flat = send.new_empty(sum(lengths))
        dist.all_to_all_single(flat, send, output_split_sizes=lengths,
                               input_split_sizes=[lengths[self.rank]] * self.size, group=self.group)
        return flat

    def _exchange(self, local, failure, placement, numel, dtype, device) -> torch.Tensor:
        lengths = [self._length(len(g), numel, dtype) for g in placement.groups]
        try:
            if failure is None:
                pieces = self._contribution(local, placement, self.rank, numel, dtype, device)
            else:
                pieces = self._failure_contribution(failure, placement, numel, dtype, device)
            flat = self._collect(torch.cat(pieces * self.size), lengths)  # one copy per destination
        except BaseException as exc:  # noqa: BLE001
            if failure is not None:
                raise failure from None
            raise BranchParallelError(f"BranchParallel: rank {self.rank}: the exchange failed ({exc}); another "
                                      "rank may have died without reporting") from exc
        if failure is not None:
            raise failure
        starts = [sum(lengths[:r]) for r in range(self.size)]
        status = torch.stack([flat[s + n - 1] for s, n in zip(starts, lengths)])  # views: no host copy
        if status.device.type == "cpu":
            failed = [r for r, s in enumerate(status.tolist()) if s != 0]
            if failed:
                r = failed[0]
                raw = flat[starts[r]:starts[r] + lengths[r] - 1].view(torch.uint8)[:_TEXT_BYTES]
                text = bytes(raw.tolist()).split(b"\0", 1)[0].decode("utf-8", "replace")
                raise BranchParallelError(f"BranchParallel: rank {r} of the process group failed in its share of the "
                                          f"step: {text}", rank=r)
        else:  # a host read would synchronise every step: assert on the device instead
            torch._assert_async(status.eq(0).all(), "BranchParallel: a rank of the process group failed")
        return flat

    def _views(self, flat, placement, shape, numel, dtype) -> list[torch.Tensor]:
        where, start = {}, 0
        for group in placement.groups:
            for i, name in enumerate(group):
                where[name] = start + i * numel
            start += self._length(len(group), numel, dtype)
        return [flat[where[n]:where[n] + numel].view(shape) for n in placement.names]


# --------------------------------------------------------------------------- GuidedDenoiser


@dataclass(frozen=True)
class _Flops:
    """One branch's model call counted on the meta device: ``total`` FLOPs, ``modules``: FLOPs per
    module name (relative to the model), and the prediction's ``shape`` / ``dtype``."""

    total: int
    modules: dict
    shape: tuple
    dtype: torch.dtype


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    return x


def _signature(x):
    """What a FLOP count depends on: tensor shapes and dtypes, other values as they are."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in sorted(x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_signature(v) for v in x)
    return x if isinstance(x, (int, float, str, bool, type(None))) else type(x).__name__


def count_flops(den, sample, timestep, inputs, model_kwargs) -> _Flops:
    """FLOPs of one single-branch call of ``den``'s model, per module, counted by
    ``torch.utils.flop_counter`` on the meta device: the model's own forward run on meta copies of
    its parameters (``torch.func.functional_call``; nothing is computed or allocated), with the
    reference formulations of the guided layers so that their attention is counted as SDPA."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    from .ops import REFERENCE

    model = getattr(den.model, "_orig_mod", den.model)  # a torch.compile'd model: its module
    args = _to_meta(den._model_args(("cond",), sample, timestep, inputs, model_kwargs))
    params = {name: t.to("meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}
    ops, den.state.ops = den.state.ops, REFERENCE
    try:
        with FlopCounterMode(display=False) as counter:
            out = functional_call(model, params, (), {**args, "return_dict": False})[0]
    except Exception as exc:
        raise RuntimeError(f"GuidedDenoiser: process_group: counting the branches' FLOPs on the meta device failed "
                           f"({type(exc).__name__}: {exc}); the placement needs the model to run on meta tensors") \
            from exc
    finally:
        den.state.ops = ops
    root = type(model).__name__ + "."
    modules = {name[len(root):]: sum(counts.values()) for name, counts in counter.get_flop_counts().items()
               if name.startswith(root)}
    return _Flops(counter.get_total_flops(), modules, tuple(out.shape), out.dtype)


def denoiser_costs(den, order, sag_base, flops: _Flops) -> tuple[Branch, ...]:
    """The :class:`Branch` es of a GuidedDenoiser step with branches ``order`` (the combine's).

    uncond, cond: one full call, F FLOPs. A perturbed branch: F minus what it skips (SLG: its
    skipped blocks, or their attention / feed-forward modules; nothing with ``per_branch``, whose
    calls run a skipped block and take its inputs back); forked (``fork=True``) it adds its
    suffix on cond's rank — F minus the blocks before its first perturbed block, minus its
    skips. SAG's degraded branch: one full call, pinned to its base branch."""
    total = flops.total
    block = [flops.modules.get(name, 0) for name in den.blocks]
    out = []
    for kind in order:
        if kind == "sag":
            out.append(Branch("sag", total, parent=sag_base, pinned=True))
            continue
        if kind in ("uncond", "cond"):
            out.append(Branch(kind, total))
            continue
        p = den._perturbation(kind)
        skipped = 0
        if not den.per_branch:
            for i, mode in p.skips.items():
                names = [den.blocks[i]] if mode == "block" else den._skip_modules[den.blocks[i]][mode]
                skipped += sum(flops.modules.get(n, 0) for n in names)
        forked = total - sum(block[:p.first]) - skipped if den.fork and not den.per_branch else None
        out.append(Branch(kind, total - skipped, parent="cond", forked_cost=forked))
    return tuple(out)


def denoiser_branches(par: BranchParallel, den, order, sag_base, sample, timestep, inputs,
                      model_kwargs) -> list[torch.Tensor]:
    """One GuidedDenoiser step's branch predictions (``order``), computed on ``par``'s ranks."""
    key = _signature((sample, timestep if isinstance(timestep, torch.Tensor) else 0.0, inputs["cond"], model_kwargs))
    counts = par._flops.setdefault(den, {})
    if key not in counts:
        counts[key] = count_flops(den, sample, timestep, inputs, model_kwargs)
    flops = counts[key]
    placement = par.place(denoiser_costs(den, order, sag_base, flops))

    def compute(names):
        kinds = [n for n in names if n != "sag"]
        return den._compute_branches(kinds, sample, timestep, inputs, model_kwargs,
                                     sag_base if "sag" in names else None)

    return par.run(placement, compute, shape=flops.shape, dtype=flops.dtype, device=sample.device)

"""The patches that make one batched model call serve every branch.

:class:`AttentionPatch` is an ``attn1`` replace patch of a UNet block (``("middle", 0)``, …). It
receives q, k, v of the whole batch as ComfyUI's ``(B, N, heads·d)`` and the ``cond_or_uncond``
list of the call; the :class:`~.batch.Routing` of the call says which chunk is whose branch. All
chunks then go through ONE ``guidance_kernels.guided_attention`` call with a mode per batch item —
``"identity"`` for PAG chunks, ``"blur"`` for SEG chunks, ``"none"`` for the rest — and a SAG
recorder gets the uncond chunk's key mass from ``guidance_kernels.attention_key_mass`` without the
N×N map. A call without routing (a node's own extra call) runs ComfyUI's attention unchanged.

:class:`BlockSkipPatch` is a ``dit`` replace patch of a DiT block (``("double_block", i)``,
``("single_block", i)``): the rows of skip-layer-guidance chunks keep the block's input, the other
rows run the block.

Both stack: several of this package's nodes on one block share one patch (rules are added, the
patch object is replaced, never mutated), and a foreign patch found at the same key when a rule is
added keeps serving the chunks no rule perturbs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import guidance_kernels as gk

from .batch import KEY, Participant, Shared

IDENTITY = "identity"  # PAG: attention output := v
BLUR = "blur"  # SEG: queries blurred over the image grid
RECORD = "record"  # SAG: key mass of the uncond chunk


@dataclass(frozen=True, eq=False)
class Rule:
    """``participant``'s action at transformer ``index`` of the block (None: every transformer)."""

    participant: Participant
    action: str
    index: int | None = None
    sigma: float = math.inf  # BLUR: σ (inf: the mean)


def _chunk_rows(chunks: list[int], width: int, keep) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the chunks for which ``keep(position)`` holds, merged."""
    runs: list[tuple[int, int]] = []
    for pos in range(len(chunks)):
        if keep(pos):
            start = pos * width
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + width)
            else:
                runs.append((start, start + width))
    return runs


def _take_rows(t: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    parts = [t[a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _comfy_attention(q, k, v, extra_options):
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


class AttentionPatch(Shared):
    """``attn1`` replace patch of one UNet block: ``(q, k, v, extra_options) -> out``."""

    def __init__(self, rules: tuple[Rule, ...] = (), previous=None):
        self.rules = rules
        self.previous = previous  # a foreign patch found at this key: it serves the unperturbed chunks

    def with_rule(self, rule: Rule) -> AttentionPatch:
        return AttentionPatch(self.rules + (rule,), self.previous)

    def _plain(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return _comfy_attention(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        routing = extra_options.get(KEY)
        if routing is None:
            return self._plain(q, k, v, extra_options)
        chunks = list(extra_options["cond_or_uncond"])
        width = q.shape[0] // len(chunks)
        index = extra_options.get("block_index", 0)
        rules = [r for r in self.rules if r.index is None or r.index == index]
        actions = []  # per chunk: the perturbing rule or None
        for chunk in chunks:
            owner = routing.participant(chunk)
            actions.append(next((r for r in rules if r.participant is owner and r.action != RECORD), None)
                           if owner is not None else None)
        recorder = None
        if routing.uncond in chunks:
            recorder = next((r.participant for r in rules if r.action == RECORD and r.participant in routing.recorders
                             and not r.participant.kept(routing.x)), None)
        if recorder is None and not any(actions):
            return self._plain(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        uncond_rows = None
        if recorder is not None:
            start = chunks.index(routing.uncond) * width  # the first uncond chunk, as the stock SAG node
            uncond_rows = (start, start + width)
        if not any(actions) and self.previous is None:  # SAG alone here: the output and the mass in one call
            out, mass = gk.attention_key_mass(q, k, v, layout="bnd", heads=heads, items=range(*uncond_rows))
            recorder.keep(routing.x, mass)
            return out
        if not any(actions):
            out = self.previous(q, k, v, extra_options)
        elif self.previous is None:
            out = self._guided(q, k, v, actions, width, extra_options)
        else:
            out = self._split(q, k, v, chunks, actions, width, extra_options)
        if recorder is not None:
            a, b = uncond_rows
            _, mass = gk.attention_key_mass(q[a:b], k[a:b], v[a:b], layout="bnd", heads=heads)
            recorder.keep(routing.x, mass)
        return out

    @staticmethod
    def _guided(q, k, v, actions, width, extra_options):
        modes, sigmas, grid = [], [], None
        for rule in actions:
            mode = "none" if rule is None else rule.action
            modes += [mode] * width
            sigmas += [rule.sigma if mode == BLUR else None] * width
        if BLUR in modes:
            shape = extra_options["original_shape"]  # the UNet's input latent (B, C, H, W)
            grid = gk.sag_map_grid((shape[-2], shape[-1]), q.shape[1])
        return gk.guided_attention(q, k, v, modes=modes, sigma=sigmas if grid is not None else None, grid=grid,
                                   layout="bnd", heads=extra_options["n_heads"])

    def _split(self, q, k, v, chunks, actions, width, extra_options):
        """A foreign patch serves the unperturbed chunks (with its own ``cond_or_uncond``), one
        guided_attention call the perturbed ones; rows are put back in chunk order."""
        plain = _chunk_rows(chunks, width, lambda pos: actions[pos] is None)
        perturbed = _chunk_rows(chunks, width, lambda pos: actions[pos] is not None)
        out = q.new_empty((*q.shape[:2], v.shape[-1]))
        if plain:
            sub = dict(extra_options)
            sub["cond_or_uncond"] = [c for c, a in zip(chunks, actions) if a is None]
            out_plain = self.previous(_take_rows(q, plain), _take_rows(k, plain), _take_rows(v, plain), sub)
            _put_rows(out, plain, out_plain)
        todo = [a for a in actions if a is not None]
        out_pert = self._guided(_take_rows(q, perturbed), _take_rows(k, perturbed), _take_rows(v, perturbed), todo,
                                width, extra_options)
        _put_rows(out, perturbed, out_pert)
        return out


def _put_rows(out: torch.Tensor, runs: list[tuple[int, int]], values: torch.Tensor) -> None:
    offset = 0
    for a, b in runs:
        out[a:b] = values[offset: offset + b - a]
        offset += b - a


def _slice_batch(value, total: int, runs):
    """``value`` (a block argument) restricted to the rows ``runs`` where it has the batch dim."""
    if isinstance(value, torch.Tensor):
        return _take_rows(value, runs) if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_batch(v, total, runs) for v in value)
    return value


class BlockSkipPatch(Shared):
    """``dit`` replace patch of one DiT block: ``(args, extra) -> {"img": …, "txt": …}``; the rows of
    the chunks of ``participants`` (skip-layer guidance) return the block's input unchanged."""

    def __init__(self, participants: tuple[Participant, ...] = (), previous=None):
        self.participants = participants
        self.previous = previous

    def with_participant(self, participant: Participant) -> BlockSkipPatch:
        return BlockSkipPatch(self.participants + (participant,), self.previous)

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        options = args["transformer_options"]
        routing = options.get(KEY)
        chunks = list(options.get("cond_or_uncond", ()))
        skip = [routing is not None and routing.participant(c) in self.participants for c in chunks]
        if not any(skip):
            return self._run(args, extra)
        if all(skip):
            return args
        total = args["img"].shape[0]
        width = total // len(chunks)
        kept = _chunk_rows(chunks, width, lambda pos: not skip[pos])
        sub = {name: _slice_batch(value, total, kept) for name, value in args.items() if name != "transformer_options"}
        sub["transformer_options"] = {**options, "cond_or_uncond": [c for c, s in zip(chunks, skip) if not s]}
        ran = self._run(sub, extra)
        out = {}
        for name, value in ran.items():
            if isinstance(value, torch.Tensor) and isinstance(args.get(name), torch.Tensor) \
                    and args[name].shape[0] == total:
                full = args[name].clone()
                _put_rows(full, kept, value)
                out[name] = full
            else:
                out[name] = value
        return out


def _replace_dict(patcher, kind: str) -> dict:
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})


def add_attention_rule(patcher, block: str, number: int, rule: Rule) -> None:
    """Add ``rule`` to the ``attn1`` patch of UNet block ``(block, number)`` of ``patcher``.

    The rule goes to the block-level key and to every transformer-level key ``(block, number, t)``
    already present (ComfyUI looks those up first: a foreign patch there is kept as ``previous``)."""
    existing = _replace_dict(patcher, "attn1")
    keys = [(block, number)] + [key for key in existing if len(key) == 3 and key[:2] == (block, number)]
    for key in keys:
        current = existing.get(key)
        patch = current.with_rule(rule) if isinstance(current, AttentionPatch) else AttentionPatch((rule,), current)
        patcher.set_model_attn1_replace(patch, *key)


def add_block_skip(patcher, block: str, index: int, participant: Participant) -> None:
    """Make DiT block ``(block, index)`` (``"double_block"`` / ``"single_block"``) skip for ``participant``."""
    current = _replace_dict(patcher, "dit").get((block, index))
    patch = current.with_participant(participant) if isinstance(current, BlockSkipPatch) \
        else BlockSkipPatch((participant,), current)
    patcher.set_model_patch_replace(patch, "dit", block, index)

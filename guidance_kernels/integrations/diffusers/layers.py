"""Which attention layers and blocks a guidance method perturbs: exact selection by diffusers
module names.

diffusers' PAG pipelines match layer ids as regular expressions against module names, so
``"blocks.1"`` also selects ``transformer_blocks.10``…``19`` (diffusers #13594). Here a selector
is resolved to module-name PREFIXES compared component by component; it never matches a part of
a component. Accepted selectors:

===============================  ===============================================================
selector                         layers (PAG / SEG: the self-attention layers under the prefix;
                                 SLG: the top-level blocks under it)
===============================  ===============================================================
``"mid"`` / ``"down"`` / ``"up"``   every self-attention layer of the UNet's mid / down / up blocks
``"down_blocks.2"``               a diffusers module path prefix (any depth, e.g.
                                  ``"up_blocks.0.attentions.1"``, ``"transformer_blocks.8"``,
                                  ``"single_transformer_blocks"``, ``"transformer_blocks.3.attn2"``)
``"blocks.7"`` or ``7``           block 7 of a DiT's first block list (``transformer_blocks.7``;
                                  Wan ``blocks.7``; Flux / HunyuanVideo: a double-stream block)
``"d4"`` / ``"m0"`` / ``"u0"``       the n-th self-attention layer of the down / mid / up blocks, in
                                  forward order (the indexing of the original PAG/SAG code)
``"down.block_2.attentions_1"``   diffusers' older documented spelling of ``down_blocks.2.attentions.1``
===============================  ===============================================================

Models of the supported families (:mod:`.models`) list their self-attention modules explicitly;
other diffusers models (e.g. for :func:`~.enable` on a PAG pipeline) fall back to every
non-cross attention module (UNets: ``attn1``).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from .models import family_of


def _attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def _block_list_names(model: torch.nn.Module) -> tuple[str, ...]:
    family = family_of(model)
    if family is not None:
        return family.block_lists
    for name in ("transformer_blocks", "blocks"):
        if isinstance(getattr(model, name, None), torch.nn.ModuleList):
            return (name,)
    return ()


def is_unet(model: torch.nn.Module) -> bool:
    return hasattr(model, "down_blocks") and hasattr(model, "up_blocks")


def self_attention_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module guidance can perturb, by name, in forward order: UNet self-attention
    (``attn1``) and DiT self-attention (see :mod:`.models` for each family)."""
    family = family_of(model)
    if family is not None and not family.is_unet:
        found = {}
        for block in top_level_blocks(model):
            module = model.get_submodule(block)
            for attr in family.attention.get(type(module).__name__, ()):
                if getattr(module, attr, None) is not None:
                    found[f"{block}.{attr}"] = getattr(module, attr)
        return found
    return _generic_self_attention(model)


def _generic_self_attention(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    attention = _attention_class()
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, attention) or module.is_cross_attention:
            continue
        joint = getattr(module, "add_q_proj", None) is not None
        if is_unet(model):
            if name.endswith("attn1"):
                found[name] = module
        elif joint or not _has_joint_sibling(model, name):
            found[name] = module
    if is_unet(model):  # named_modules lists up_blocks before mid_block; forward order is down, mid, up
        group = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        found = dict(sorted(found.items(), key=lambda kv: (group.get(kv[0].split(".")[0], 3),
                                                           list(found).index(kv[0]))))
    return found


def _has_joint_sibling(model: torch.nn.Module, name: str) -> bool:
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    attention = _attention_class()
    return any(isinstance(m, attention) and getattr(m, "add_q_proj", None) is not None for m in parent.children())


_LEGACY = re.compile(r"^(down|up)\.block_(\d+)(?:\.attentions_(\d+))?$")
_INDEX = re.compile(r"^([dmu])(\d+)$")


def _prefixes(model: torch.nn.Module, selector, layers: list[str]) -> list[str]:
    """The module-name prefixes (or exact names) a selector stands for."""
    lists = _block_list_names(model)
    if isinstance(selector, bool) or not isinstance(selector, (str, int)):
        raise TypeError(f"layer selector {selector!r}: expected a str or an int")
    if isinstance(selector, int):
        if not lists:
            raise ValueError(f"layer selector {selector}: an integer selects a transformer block, but "
                             f"{type(model).__name__} has no block list")
        return [f"{lists[0]}.{selector}"]
    sel = selector.strip()
    if is_unet(model) and sel in ("mid", "down", "up"):
        return [{"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}[sel]]
    match = _INDEX.match(sel)
    if match and is_unet(model):
        group = {"d": "down_blocks", "m": "mid_block", "u": "up_blocks"}[match.group(1)]
        members = [n for n in layers if n.split(".")[0] == group]
        index = int(match.group(2))
        if index >= len(members):
            raise ValueError(f"layer selector {sel!r}: the {group} have {len(members)} self-attention layers "
                             f"({match.group(1)}0..{match.group(1)}{len(members) - 1})")
        return [members[index]]
    match = _LEGACY.match(sel)
    if match and is_unet(model):
        path = f"{match.group(1)}_blocks.{match.group(2)}"
        return [path + (f".attentions.{match.group(3)}" if match.group(3) is not None else "")]
    if sel.startswith("blocks.") and lists and lists[0] != "blocks":
        return [lists[0] + sel[len("blocks"):]]
    return [sel]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _as_list(selectors) -> list:
    if isinstance(selectors, (str, int)) or not isinstance(selectors, Iterable):
        return [selectors]
    return list(selectors)


def preview(names: list[str]) -> str:
    """The first names of a list, for error messages."""
    return ", ".join(names[:6]) + (", …" if len(names) > 6 else "")


def select_layers(model: torch.nn.Module, selectors: str | int | Iterable[str | int]) -> list[str]:
    """Names of the self-attention layers the selectors pick, in forward order (no duplicates).
    A selector that matches nothing raises ValueError listing the model's layers."""
    layers = list(self_attention_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no diffusers self-attention layers (expected a diffusers "
                         "UNet or transformer model)")
    chosen: set[str] = set()
    for selector in _as_list(selectors):
        matched = [n for p in _prefixes(model, selector, layers) for n in layers if _under(n, p)]
        if not matched:
            raise ValueError(f"layer selector {selector!r} matches no self-attention layer (exact module-name "
                             f"prefixes, e.g. 'mid', 'down_blocks.2', 'blocks.7'); layers: {preview(layers)}")
        chosen.update(matched)
    return [n for n in layers if n in chosen]


def select_blocks(model: torch.nn.Module, selectors) -> list[str]:
    """Names of the top-level blocks the selectors pick (for layer skips), in forward order.
    A selector inside a block (e.g. one attention module) or matching no block raises ValueError."""
    blocks = top_level_blocks(model)
    chosen: set[str] = set()
    for selector in _as_list(selectors):
        prefixes = _prefixes(model, selector, [])
        matched = [b for p in prefixes for b in blocks if _under(b, p)]
        inside = [b for p in prefixes for b in blocks if p.startswith(b + ".")]
        if inside:
            raise ValueError(f"block selector {selector!r} names a module inside block {inside[0]}: layer skips act "
                             "on whole blocks (choose what they skip with slg_skip)")
        if not matched:
            raise ValueError(f"block selector {selector!r} matches no block; blocks: {preview(blocks)}")
        chosen.update(matched)
    return [b for b in blocks if b in chosen]


def top_level_blocks(model: torch.nn.Module) -> list[str]:
    """The model's top-level blocks in forward order (the granularity at which branches fork and
    layers are skipped): UNet down_blocks.i, mid_block, up_blocks.i; DiT transformer_blocks.i (and
    Flux / HunyuanVideo single_transformer_blocks.i after them)."""
    if is_unet(model):
        names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        if getattr(model, "mid_block", None) is not None:
            names.append("mid_block")
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    lists = _block_list_names(model)
    if not lists:
        raise ValueError(f"{type(model).__name__}: neither a UNet (down/mid/up blocks) nor a DiT (transformer_blocks)")
    return [f"{name}.{i}" for name in lists for i in range(len(getattr(model, name)))]


def block_of(model: torch.nn.Module, layer: str) -> str:
    """The top-level block containing ``layer``."""
    for block in top_level_blocks(model):
        if _under(layer, block):
            return block
    raise ValueError(f"layer {layer!r} is not inside a top-level block of {type(model).__name__}")

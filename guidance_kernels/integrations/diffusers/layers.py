"""Which attention layers a guidance method perturbs: exact selection by diffusers module names.

diffusers' PAG pipelines match layer ids as regular expressions against module names, so
``"blocks.1"`` also selects ``transformer_blocks.10``…``19`` (diffusers #13594). Here a selector
is resolved to module-name PREFIXES compared component by component; it never matches a part of
a component. Accepted selectors (all resolve to self-attention layers under the prefix):

===============================  ===============================================================
selector                         layers
===============================  ===============================================================
``"mid"`` / ``"down"`` / ``"up"``   every self-attention layer of the UNet's mid / down / up blocks
``"down_blocks.2"``               a diffusers module path prefix (any depth, e.g.
                                  ``"up_blocks.0.attentions.1"``, ``"transformer_blocks.8"``)
``"blocks.7"`` or ``7``           transformer block 7 of a DiT (SD3, PixArt, …)
``"d4"`` / ``"m0"`` / ``"u0"``       the n-th self-attention layer of the down / mid / up blocks, in
                                  forward order (the indexing of the original PAG/SAG code)
``"down.block_2.attentions_1"``   diffusers' older documented spelling of ``down_blocks.2.attentions.1``
===============================  ===============================================================
"""

from __future__ import annotations

import re
from typing import Iterable

import torch


def _attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def _block_list_name(model: torch.nn.Module) -> str | None:
    for name in ("transformer_blocks", "blocks"):
        if isinstance(getattr(model, name, None), torch.nn.ModuleList):
            return name
    return None


def is_unet(model: torch.nn.Module) -> bool:
    return hasattr(model, "down_blocks") and hasattr(model, "up_blocks")


def self_attention_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module guidance can perturb, by name, in forward order: UNet self-attention
    (``attn1``) and DiT self-attention — for SD3-style joint blocks the joint attention ``attn``
    (image + text), not the image-only ``attn2`` of dual-attention blocks."""
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
    blocks = _block_list_name(model)
    if isinstance(selector, bool) or not isinstance(selector, (str, int)):
        raise TypeError(f"layer selector {selector!r}: expected a str or an int")
    if isinstance(selector, int):
        if blocks is None:
            raise ValueError(f"layer selector {selector}: an integer selects a transformer block, but the "
                             f"model has no block list")
        return [f"{blocks}.{selector}"]
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
    if sel.startswith("blocks.") and blocks is not None and blocks != "blocks":
        return [blocks + sel[len("blocks"):]]
    return [sel]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_layers(model: torch.nn.Module, selectors: str | int | Iterable[str | int]) -> list[str]:
    """Names of the self-attention layers the selectors pick, in forward order (no duplicates).
    A selector that matches nothing raises ValueError listing the model's layers."""
    if isinstance(selectors, (str, int)) or not isinstance(selectors, Iterable):
        selectors = [selectors]
    layers = list(self_attention_layers(model))
    chosen: set[str] = set()
    for selector in selectors:
        matched = [n for p in _prefixes(model, selector, layers) for n in layers if _under(n, p)]
        if not matched:
            preview = ", ".join(layers[:6]) + (", …" if len(layers) > 6 else "")
            raise ValueError(f"layer selector {selector!r} matches no self-attention layer (exact module-name "
                             f"prefixes, e.g. 'mid', 'down_blocks.2', 'blocks.7'); layers: {preview}")
        chosen.update(matched)
    return [n for n in layers if n in chosen]


def top_level_blocks(model: torch.nn.Module) -> list[str]:
    """The model's top-level blocks in forward order (the granularity at which branches fork):
    UNet down_blocks.i, mid_block, up_blocks.i; DiT transformer_blocks.i."""
    if is_unet(model):
        names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        if getattr(model, "mid_block", None) is not None:
            names.append("mid_block")
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    blocks = _block_list_name(model)
    if blocks is None:
        raise ValueError(f"{type(model).__name__}: neither a UNet (down/mid/up blocks) nor a DiT (transformer_blocks)")
    return [f"{blocks}.{i}" for i in range(len(getattr(model, blocks)))]


def block_of(model: torch.nn.Module, layer: str) -> str:
    """The top-level block containing ``layer``."""
    for block in top_level_blocks(model):
        if _under(layer, block):
            return block
    raise ValueError(f"layer {layer!r} is not inside a top-level block of {type(model).__name__}")

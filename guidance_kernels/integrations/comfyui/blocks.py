"""UNet layer selection in the PAG paper's notation, as the community PAG/SEG nodes' ``unet_block_list``.

``"d2.1, m0, u0-1"``: ``d``/``m``/``u`` pick the input (down), middle or output (up) blocks; the
number counts only the blocks that hold self-attention (``d0`` is the first input block with a
transformer), a range ``a-b`` takes several; ``.t`` (or ``.a-b``) narrows to transformer ``t`` of
that block, else every transformer of it is selected. The result is a list of ComfyUI patch keys
``(block_name, block_number, transformer_index | None)`` — ``block_number`` is ComfyUI's own (the
input/output block index; 0 for the middle block).
"""

from __future__ import annotations

import re

_PARTS = {"d": "input", "m": "middle", "u": "output"}
_MODULE = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def _self_attention_blocks(diffusion_model) -> dict[str, list[tuple[int, int]]]:
    """``{"input": [(block_number, transformer_count), …], …}`` in block order."""
    found: dict[str, dict[int, int]] = {"input": {}, "middle": {}, "output": {}}
    for name, module in diffusion_model.named_modules():
        if type(module).__name__ != "BasicTransformerBlock" or not hasattr(module, "attn1"):
            continue
        match = _MODULE.match(name)
        if match is None:
            continue
        part = match.group(1).split("_")[0]
        # ComfyUI numbers the middle block 0 (its transformer sits at middle_block.1).
        number = 0 if part == "middle" else int(match.group(2))
        found[part][number] = found[part].get(number, 0) + 1
    return {part: sorted(blocks.items()) for part, blocks in found.items()}


def _range(text: str, what: str, entry: str) -> range:
    bounds = text.split("-")
    if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
        raise ValueError(f"unet_block_list: {entry!r}: {what} must be a number or a range a-b, got {text!r}")
    low, high = int(bounds[0]), int(bounds[-1])
    if high < low:
        raise ValueError(f"unet_block_list: {entry!r}: empty {what} range {text!r}")
    return range(low, high + 1)


def parse_unet_blocks(diffusion_model, text: str) -> list[tuple[str, int, int | None]]:
    """The patch keys selected by ``text`` (see the module docstring) on ``diffusion_model``."""
    available = _self_attention_blocks(diffusion_model)
    keys: list[tuple[str, int, int | None]] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        part = _PARTS.get(entry[0])
        if part is None:
            raise ValueError(f"unet_block_list: {entry!r}: must start with d, m or u (down, middle, up)")
        numbers, _, transformers = entry[1:].partition(".")
        blocks = available[part]
        for i in _range(numbers, "block", entry):
            if i >= len(blocks):
                raise ValueError(f"unet_block_list: {entry!r}: block {i} out of range: the {part} blocks have "
                                 f"{len(blocks)} with self-attention")
            number, count = blocks[i]
            if not transformers:
                keys.append((part, number, None))
                continue
            for t in _range(transformers, "transformer", entry):
                if t >= count:
                    raise ValueError(f"unet_block_list: {entry!r}: transformer {t} out of range: block {i} has {count}")
                keys.append((part, number, t))
    if not keys:
        raise ValueError(f"unet_block_list: {text!r} selects no layer")
    return keys

"""ComfyUI nodes that run every guidance branch in one model call, on this package's fused kernels.

Nodes (V3 API; the stock nodes' inputs and defaults): Perturbed-Attention Guidance, Self-Attention
Guidance, Smoothed Energy Guidance (the community node's inputs; σ finite and infinite), Skip Layer
Guidance DiT, APG, CFG-Zero*, CFGNorm, TCFG, Mahiro and RescaleCFG. The perturbed branches join the
sampler's cond/uncond batch (:mod:`.batch`), their attention runs ``guided_attention`` and SAG's key
mass comes from ``attention_key_mass`` in that same call (:mod:`.patches`), and the combines are the
fused ops (:mod:`.combine`). See docs/comfyui.md for how results relate to the stock nodes.

Loading: ComfyUI calls :func:`comfy_entrypoint` of a package in ``custom_nodes/`` — link this
directory there, or put a one-line ``__init__.py`` into a folder there::

    from guidance_kernels.integrations.comfyui import comfy_entrypoint

Importing this package imports nothing from ComfyUI; :mod:`.nodes` does, when ComfyUI asks for the
node list.
"""

from __future__ import annotations


async def comfy_entrypoint():
    """ComfyUI's V3 extension entry point: the extension listing this package's nodes."""
    from guidance_kernels.integrations.comfyui.nodes import GuidanceKernelsExtension

    return GuidanceKernelsExtension()

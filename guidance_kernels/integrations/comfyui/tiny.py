"""Tiny ComfyUI models built in code (no checkpoint), for the tests, the benchmark and for trying the
nodes: an SD1.5 and an SDXL UNet, an SD3 MMDiT and a Flux DiT, every parameter and floating buffer
drawn from a seeded generator.

Importing this module imports nothing from ComfyUI. :func:`import_comfy` imports it the way a
script or a test must when ComfyUI is used as a library rather than run as its server: ComfyUI
parses ``sys.argv``, ``COMFYUI_*`` variables and any ``config.{yaml,json,cfg,ini}`` in the working
directory on first import, so the import happens with an empty argument list from a clean
temporary directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import warnings

import torch

# A small SD1.5 UNet: two levels (one downsampling), one transformer per attention level, 2 heads.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 2,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# A small SDXL UNet: linear transformer projections, 16-wide heads, two transformers in the middle,
# the real ADM input (pooled CLIP-G 1280 + six 256-wide size embeddings).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# A small SD3 MMDiT: hidden = 64·depth and depth heads by construction.
SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 3, "input_size": None,
    "adm_in_channels": 64, "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 192}},
}
# A small Flux DiT (the schnell layout: no guidance embedding).
FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
    "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
    "depth_single_blocks": 3, "axes_dim": [4, 14, 14], "theta": 10000, "qkv_bias": True,
    "guidance_embed": False, "txt_ids_dims": [],
}
# (latent channels, context width, pooled width) of each model's conditioning.
CONDITIONING = {"sd15": (4, 64, None), "sdxl": (4, 64, 1280), "sd3": (16, 64, 64), "flux": (16, 64, 32)}


@contextlib.contextmanager
def _clean_import_context():
    """An empty argument list and a clean working directory; the process-wide settings ComfyUI's
    import changes (fp32 matmul precision "high" — TF32 on CUDA —, environment variables, the root
    logger, warning filters) are put back afterwards."""
    argv, cwd, environ = sys.argv, os.getcwd(), dict(os.environ)
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    filters = list(warnings.filters)
    with tempfile.TemporaryDirectory(prefix="gk-comfy-") as clean:
        sys.argv = argv[:1]
        os.chdir(clean)
        try:
            yield
        finally:
            os.chdir(cwd)
            sys.argv = argv
            os.environ.clear()
            os.environ.update(environ)
            torch.set_float32_matmul_precision(precision)
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            root.setLevel(level)
            root.handlers[:] = handlers
            warnings.filters[:] = filters


def import_comfy(device: str | torch.device = "cpu"):
    """Import ComfyUI's sampling stack as a library and return the ``comfy`` package; the caller's
    process-wide settings are left as they were (see :func:`_clean_import_context`).

    On a CPU device ``COMFYUI_CPU=1`` is set first (unless already set) so that ComfyUI selects the
    CPU cleanly. Raises ImportError if ComfyUI (or what it imports, e.g. torchvision) is missing."""
    if torch.device(device).type == "cpu":
        os.environ.setdefault("COMFYUI_CPU", "1")
    with _clean_import_context():
        import comfy
        import comfy.model_management  # noqa: F401  (parses the command line and config once)
        import comfy.model_patcher  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.supported_models  # noqa: F401
    return comfy


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every parameter and floating buffer of ``module`` from ``torch.Generator(seed)``.

    Matrices and kernels: N(0, 1/fan_in) (unit-variance activations, attention logits of order 1);
    vectors named ``*weight``/``*scale`` (norm gains): 1 + N(0, 0.1²); other vectors: N(0, 0.1²).
    ComfyUI's layers skip ``reset_parameters()``: without this their weights are uninitialised."""
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, tensor in tensors:
            # drawn where the tensor lives: initialising a real-size model on the CPU takes minutes
            generator = generators.setdefault(tensor.device, torch.Generator(tensor.device).manual_seed(seed))
            value = torch.randn(tensor.shape, generator=generator, device=tensor.device)
            if tensor.dim() >= 2:
                value /= math.sqrt(tensor[0].numel())
            elif name.endswith(("weight", "scale")):
                value = 1 + 0.1 * value
            else:
                value *= 0.1
            tensor.copy_(value)
    return module


def build(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          config: dict | None = None):
    """A ``comfy.model_patcher.ModelPatcher`` around a tiny ``kind`` model (``"sd15"``, ``"sdxl"``,
    ``"sd3"``, ``"flux"``) with seeded weights; ``config`` overrides entries of the model config."""
    comfy = import_comfy(device)
    classes = {"sd15": (comfy.supported_models.SD15, SD15_UNET), "sdxl": (comfy.supported_models.SDXL, SDXL_UNET),
               "sd3": (comfy.supported_models.SD3, SD3_MMDIT), "flux": (comfy.supported_models.FluxSchnell, FLUX_DIT)}
    if kind not in classes:
        raise ValueError(f"build: kind: must be one of {sorted(classes)}, got {kind!r}")
    cls, unet_config = classes[kind]
    model_config = cls({**unet_config, **(config or {})})
    model_config.set_inference_dtype(dtype, None)
    device = torch.device(device)
    model = model_config.get_model({}, device=device)
    seeded_init_(model.diffusion_model, seed)  # not model_sampling: its buffers are the noise schedule
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(kind: str, *, seed: int = 1, tokens: int = 7, batch: int = 1, width: int | None = None,
                 pooled: int | None = None):
    """Random ``(positive, negative)`` ComfyUI conditioning lists for a tiny ``kind`` model;
    ``width`` / ``pooled`` override the context and pooled widths (real-size configurations)."""
    _, tiny_width, tiny_pooled = CONDITIONING[kind]
    width = width or tiny_width
    pooled = pooled or tiny_pooled
    generator = torch.Generator().manual_seed(seed)

    def one():
        extra = {} if pooled is None else {"pooled_output": torch.randn(batch, pooled, generator=generator)}
        return [[torch.randn(batch, tokens, width, generator=generator), extra]]

    return one(), one()


def latent_noise(kind: str, height: int, width: int, *, seed: int = 2, batch: int = 1) -> torch.Tensor:
    """Seeded noise for a ``(batch, C, height, width)`` latent of a tiny ``kind`` model."""
    channels = CONDITIONING[kind][0]
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))

"""Tiny random-weight diffusers models for integration tests (built in the test; no downloads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional test dependency (pyproject [test]); "
                    "the GPU image has none")


def unet_sd(seed: int = 0, dtype=torch.float32):
    """An SD1.5-shaped UNet: cross-attention down block, plain down block, attention mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=16, norm_num_groups=8,
        in_channels=4, out_channels=4)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def unet_sdxl(seed: int = 0, dtype=torch.float32):
    """An SDXL-shaped UNet: text_time additional embeddings, two transformer layers in the mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=16, norm_num_groups=8,
        in_channels=4, out_channels=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16, transformer_layers_per_block=(1, 2),
        use_linear_projection=True)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def sd3(seed: int = 0, dtype=torch.float32, num_layers: int = 4):
    """An SD3-shaped joint-attention transformer (no qk norm, as SD3 medium)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers,
                                  attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                  joint_attention_dim=32, pooled_projection_dim=16, out_channels=4)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def unet_inputs(batch: int = 1, hw=(16, 16), seed: int = 1, sdxl: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *hw, generator=g, dtype=dtype)
    cond = torch.randn(batch, 7, 32, generator=g, dtype=dtype)
    uncond = torch.randn(batch, 7, 32, generator=g, dtype=dtype)
    kw = {}
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=g, dtype=dtype),
                                   "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch, dtype=dtype)}
        kw["negative_added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=g, dtype=dtype),
                                            "time_ids": kw["added_cond_kwargs"]["time_ids"].clone()}
    return sample, cond, uncond, kw


def sd3_inputs(batch: int = 1, hw=(16, 16), seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *hw, generator=g, dtype=dtype)
    cond = torch.randn(batch, 6, 32, generator=g, dtype=dtype)
    uncond = torch.randn(batch, 6, 32, generator=g, dtype=dtype)
    pooled = torch.randn(batch, 16, generator=g, dtype=dtype)
    neg_pooled = torch.randn(batch, 16, generator=g, dtype=dtype)
    return sample, cond, uncond, pooled, neg_pooled


# --------------------------------------------------------------------------- transformers (DiTs)
# Tiny configs: 2 heads, head dim 12-16, a few blocks; grids are non-square on purpose.


def sd35(seed: int = 0, dtype=torch.float32):
    """An SD3.5-shaped transformer: qk-norm and dual-attention blocks (attn + image-only attn2)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                  pooled_projection_dim=8, out_channels=4, dual_attention_layers=(0, 1),
                                  qk_norm="rms_norm")
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def flux(seed: int = 0, dtype=torch.float32):
    """A Flux-dev-shaped transformer: 2 double-stream + 2 single-stream blocks, guidance embedding."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def wan(seed: int = 0, dtype=torch.float32, image: bool = False):
    """A Wan-2.1-shaped video transformer (T2V; ``image=True``: I2V with image cross-attention)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    extra = dict(image_dim=16, added_kv_proj_dim=24) if image else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                                  rope_max_seq_len=32, **extra)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def ltx(seed: int = 0, dtype=torch.float32):
    """An LTX-Video-shaped transformer (packed video tokens, text-padding mask on cross-attention)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                                       cross_attention_dim=24, num_layers=3, caption_channels=16)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def hunyuan_video(seed: int = 0, dtype=torch.float32):
    """A HunyuanVideo-shaped transformer: 2 double-stream + 2 single-stream blocks, guidance embedding."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(4, 4, 4), guidance_embeds=True)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def dit_inputs(family: str, batch: int = 1, seed: int = 1, dtype=torch.float32, frames: int = 3, hw=(8, 12)):
    """Inputs of one denoiser call: ``sample``, the cond / uncond conditioning (GuidedDenoiser
    argument names), ``model_kwargs`` (shared) and the image-token grid (T, H, W)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    h, w = hw
    text = 5
    cond, uncond, kw = {}, {}, {}
    if family == "sd35":
        sample, grid = rand(batch, 4, h, w), (1, h // 2, w // 2)
        cond["encoder_hidden_states"], uncond["encoder_hidden_states"] = rand(batch, text, 16), rand(batch, text, 16)
        cond["pooled_projections"], uncond["pooled_projections"] = rand(batch, 8), rand(batch, 8)
    elif family == "flux":
        gh, gw = h // 2, w // 2
        sample, grid = rand(batch, gh * gw, 16), (1, gh, gw)
        cond["encoder_hidden_states"], uncond["encoder_hidden_states"] = rand(batch, text, 32), rand(batch, text, 32)
        cond["pooled_projections"], uncond["pooled_projections"] = rand(batch, 16), rand(batch, 16)
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1], ids[..., 2] = torch.arange(gh)[:, None], torch.arange(gw)[None, :]
        kw = {"img_ids": ids.reshape(-1, 3).to(dtype), "txt_ids": torch.zeros(text, 3, dtype=dtype),
              "guidance": torch.full((batch,), 3.5, dtype=dtype)}
    elif family in ("wan", "wan_i2v"):
        sample, grid = rand(batch, 4, frames, h, w), (frames, h // 2, w // 2)
        text = 512 if family == "wan_i2v" else text  # Wan's image cross-attention assumes 512 text tokens
        cond["encoder_hidden_states"], uncond["encoder_hidden_states"] = rand(batch, text, 16), rand(batch, text, 16)
        if family == "wan_i2v":
            kw = {"encoder_hidden_states_image": rand(batch, 7, 16)}
    elif family == "ltx":
        gh, gw = h // 2, w // 2
        sample, grid = rand(batch, frames * gh * gw, 8), (frames, gh, gw)
        cond["encoder_hidden_states"], uncond["encoder_hidden_states"] = rand(batch, text, 16), rand(batch, text, 16)
        cond["encoder_attention_mask"] = torch.ones(batch, text, dtype=dtype)
        uncond["encoder_attention_mask"] = torch.tensor([[1.0] * 3 + [0.0] * (text - 3)] * batch, dtype=dtype)
        kw = {"num_frames": frames, "height": gh, "width": gw, "rope_interpolation_scale": (1.0, 1.0, 1.0)}
    elif family == "hunyuan_video":
        sample, grid = rand(batch, 4, frames, h, w), (frames, h // 2, w // 2)
        cond["encoder_hidden_states"], uncond["encoder_hidden_states"] = rand(batch, text, 16), rand(batch, text, 16)
        cond["encoder_attention_mask"] = torch.tensor([[1] * 4 + [0] * (text - 4)] * batch)
        uncond["encoder_attention_mask"] = torch.tensor([[1] * 2 + [0] * (text - 2)] * batch)
        cond["pooled_projections"], uncond["pooled_projections"] = rand(batch, 8), rand(batch, 8)
        kw = {"guidance": torch.full((batch,), 6000.0, dtype=dtype)}
    else:
        raise ValueError(family)
    return sample, cond, uncond, kw, grid

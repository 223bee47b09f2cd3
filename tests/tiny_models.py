"""Tiny random-weight diffusers models for integration tests (built in the test; no downloads)."""

from __future__ import annotations

import torch


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

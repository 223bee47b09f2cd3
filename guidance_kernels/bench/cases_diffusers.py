"""Benchmark cases of the diffusers integration: per-step time of guided denoising.

GPU (bf16): the SDXL UNet in its real configuration with random weights at 1024×1024 (latent
128×128), batch 1 — a CFG-only step (2 branches, stock processors) against CFG+PAG (mid),
CFG+SEG (σ = ∞, mid) and CFG+PAG+SEG through the GuidedDenoiser with and without forking, and
stock diffusers' PAG step (3 branches, diffusers' PAG processors and combine). Goals: ≤ 1.35×
the CFG-only step for CFG+PAG and CFG+SEG, ≤ 1.7× for CFG+PAG+SEG. The fraction of UNet time
spent before the fork (mid block) is measured in the same run. An SD3-style transformer (24
blocks, SD3-medium widths) with PAG at block 7 reports the fork's saving over the full batch.

CPU: the same cases on tiny models, so the benchmark runs everywhere (the ratios then mostly
show batching overheads, not GPU behaviour).
"""

from __future__ import annotations

import time

import torch

from .harness import Case, Provider

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), cross_attention_dim=64,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
                 norm_num_groups=16)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TINY_SD3 = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=8, attention_head_dim=16, num_attention_heads=4,
                joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4)


class _Configs:
    """Installs one model configuration at a time (processors, denoiser hooks), switching only when a
    different provider starts: installation is a one-off cost users do not pay per step."""

    def __init__(self, model, default_processor):
        self.model, self.default, self.key, self.undo = model, default_processor, None, None

    def use(self, key, install):
        if key != self.key:
            if self.undo is not None:
                self.undo()
            self.model.set_attn_processor(self.default())
            self.undo = install()
            self.key = key


def _build(cls, config, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of 2.6B parameters on CPU takes minutes
        model = cls(**config)
    model = model if dtype == torch.float32 else model.to(dtype)
    return model.eval().requires_grad_(False)


def _ratio_goal(limit: float, name: str, device: torch.device):
    def check(rows) -> bool | None:
        if device.type != "cuda":
            return None
        base, row = rows.get("CFG-only step"), rows.get(name)
        if not (base and base.ms and row and row.ms):
            return False
        return row.ms / base.ms <= limit

    return check


def _prefix_fraction(model, call, fork_block: str, device: torch.device) -> float:
    """Share of one forward's time spent before ``fork_block`` starts (CUDA events / wall clock)."""
    marks = {}

    def stamp(name):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks[name] = event
        else:
            marks[name] = time.perf_counter()

    handle = model.get_submodule(fork_block).register_forward_pre_hook(lambda *a: stamp("fork"))
    try:
        call()  # warm
        stamp("start")
        call()
        stamp("end")
    finally:
        handle.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return marks["start"].elapsed_time(marks["fork"]) / marks["start"].elapsed_time(marks["end"])
    return (marks["fork"] - marks["start"]) / (marks["end"] - marks["start"])


def _unet_cases(device, dtype, gpu) -> list[Case]:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import (AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0)

    from ..integrations import diffusers as gkd

    config = SDXL_UNET if gpu else TINY_UNET
    unet = _build(UNet2DConditionModel, config, device, dtype)
    side = 128 if gpu else 32
    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(1, 4, side, side, device=device, dtype=dtype, generator=g)
    width, pooled_dim = (2048, 1280) if gpu else (64, 32)
    cond = torch.randn(1, 77, width, device=device, dtype=dtype, generator=g)
    uncond = torch.randn(1, 77, width, device=device, dtype=dtype, generator=g)
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device, dtype=dtype)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled_dim, device=device, dtype=dtype, generator=g),
                                "time_ids": ids},
          "negative_added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled_dim, device=device, dtype=dtype),
                                         "time_ids": ids}}
    t = torch.tensor(500, device=device)
    scales = {k: torch.tensor(v, device=device) for k, v in (("s", 7.0), ("p", 3.0), ("q", 3.0))}
    added = lambda n: {k: torch.cat([kw["negative_added_cond_kwargs"][k]] + [kw["added_cond_kwargs"][k]] * (n - 1))  # noqa: E731
                       for k in kw["added_cond_kwargs"]}

    def stock_step(n):
        x = torch.cat([sample] * n)
        ehs = torch.cat([uncond] + [cond] * (n - 1))
        noise = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added(n)).sample
        parts = noise.chunk(n)
        out = parts[0] + 7.0 * (parts[1] - parts[0])
        return out + 3.0 * (parts[1] - parts[2]) if n == 3 else out

    configs = _Configs(unet, AttnProcessor2_0)

    def cfg_only():
        configs.use("stock", lambda: None)
        return stock_step(2)

    def install_diffusers_pag():
        layers = gkd.self_attention_layers(unet)
        for name in gkd.select_layers(unet, "mid"):
            layers[name].set_processor(PAGCFGIdentitySelfAttnProcessor2_0())

    def diffusers_pag():
        configs.use("diffusers-pag", install_diffusers_pag)
        return stock_step(3)

    holder = {}

    def guided(pag: bool, seg: bool, fork: bool):
        def install():
            holder["den"] = gkd.GuidedDenoiser(unet, pag_layers="mid", seg_layers="mid", fork=fork)
            return holder["den"].remove

        def run():
            configs.use(("guided", fork), install)
            return holder["den"](sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                                 guidance_scale=scales["s"], pag_scale=scales["p"] if pag else 0.0,
                                 seg_scale=scales["q"] if seg else 0.0, **kw)

        return run

    configs.use("stock", lambda: None)
    fraction = _prefix_fraction(unet, lambda: stock_step(2), "mid_block", device)
    name = f"SDXL UNet {'1024px' if gpu else 'tiny'} step (prefix before mid: {100 * fraction:.0f}% of UNet time)"
    providers = [Provider("CFG-only step", cfg_only), Provider("diffusers PAG step (3 branches)", diffusers_pag),
                 Provider("CFG+PAG mid (no fork)", guided(True, False, False), ours=True),
                 Provider("CFG+PAG mid (fork)", guided(True, False, True), ours=True),
                 Provider("CFG+SEG inf mid (fork)", guided(False, True, True), ours=True),
                 Provider("CFG+PAG+SEG mid (fork)", guided(True, True, True), ours=True)]
    dtype_name = str(dtype).replace("torch.", "")
    cases = [Case(op="diffusers", name=name, shape=f"1x4x{side}x{side}", dtype=dtype_name, providers=providers,
                  baseline="CFG-only step",
                  goal="CFG+PAG, CFG+SEG <= 1.35x and CFG+PAG+SEG <= 1.7x the CFG-only step (H100)",
                  goal_check=lambda rows: None if device.type != "cuda" else all(
                      _ratio_goal(limit, n, device)(rows) for n, limit in (
                          ("CFG+PAG mid (fork)", 1.35), ("CFG+SEG inf mid (fork)", 1.35),
                          ("CFG+PAG+SEG mid (fork)", 1.7))))]
    return cases


def _sd3_cases(device, dtype, gpu) -> list[Case]:
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from ..integrations import diffusers as gkd

    config = SD3_MEDIUM if gpu else TINY_SD3
    model = _build(SD3Transformer2DModel, config, device, dtype)
    side = 128 if gpu else 32
    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(1, config["in_channels"], side, side, device=device, dtype=dtype, generator=g)
    tokens, width = (333, 4096) if gpu else (16, 64)
    cond = torch.randn(1, tokens, width, device=device, dtype=dtype, generator=g)
    uncond = torch.randn(1, tokens, width, device=device, dtype=dtype, generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype, generator=g)
    block = 7

    configs = _Configs(model, JointAttnProcessor2_0)
    holder = {}
    t = torch.tensor([500.0], device=device)
    s, p = torch.tensor(5.0, device=device), torch.tensor(3.0, device=device)

    def step(fork: bool):
        def install():
            holder["den"] = gkd.GuidedDenoiser(model, pag_layers=block, fork=fork)
            return holder["den"].remove

        def run():
            configs.use(fork, install)
            return holder["den"](sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                                 pooled_projections=pooled, negative_pooled_projections=pooled, guidance_scale=s,
                                 pag_scale=p)

        return run

    providers = [Provider("CFG+PAG blocks.7 full batch", step(False), ours=True),
                 Provider("CFG+PAG blocks.7 forked", step(True), ours=True)]
    name = f"SD3 {'medium-size' if gpu else 'tiny'} transformer, {config['num_layers']} blocks, fork at block {block}"
    return [Case(op="diffusers", name=name, shape=f"1x{config['in_channels']}x{side}x{side}",
                 dtype=str(dtype).replace("torch.", ""), providers=providers,
                 baseline="CFG+PAG blocks.7 full batch", goal="report the fork's saving against the full batch")]


# The op stems these cases time (bench --ops filters on them).
OPS = ['diffusers']

def cases(device: torch.device, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    return _unet_cases(device, dtype, gpu) + _sd3_cases(device, dtype, gpu)

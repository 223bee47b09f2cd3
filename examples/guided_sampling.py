"""Guided sampling with a tiny random-weight SDXL-style UNet — no downloads, runs on CPU or GPU.

Samples with CFG + PAG + SEG + SAG through guidance_kernels' GuidedDenoiser (one forward for
[uncond, cond, PAG, SEG] with the perturbed branches forked from cond at the mid block, SAG's key
mass captured in that same forward, fused combine), then runs the same loop the way the anchor
implementations compute it (reference mode: chunked SDPA per branch, conv2d query blur, SAG's
explicit attention map, eager combine, full batch). Prints the per-step time of both and how far
apart the final latents are.

    python examples/guided_sampling.py [--steps 10] [--size 32] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from guidance_kernels.integrations import diffusers as gkd

UNET = dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 256),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=16,
            projection_class_embeddings_input_dim=16 * 6 + 64, norm_num_groups=32)


def sample(den: gkd.GuidedDenoiser, scheduler, latents, cond, uncond, kw, steps, scales, device):
    scheduler.set_timesteps(steps)
    times = []
    for t in scheduler.timesteps:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        noise = den(latents, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, **kw, **scales)
        latents = scheduler.step(noise, t, latents).prev_sample
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return latents, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=args.size, **UNET)
    unet = (unet if dtype == torch.float32 else unet.to(dtype)).eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, 4, args.size, args.size, device=device, dtype=dtype, generator=g)
    cond = torch.randn(1, 77, 128, device=device, dtype=dtype, generator=g)
    uncond = torch.randn(1, 77, 128, device=device, dtype=dtype, generator=g)
    ids = torch.tensor([[8.0 * args.size] * 2 + [0.0, 0.0] + [8.0 * args.size] * 2], device=device, dtype=dtype)
    kw = dict(added_cond_kwargs={"text_embeds": torch.randn(1, 64, device=device, dtype=dtype, generator=g),
                                 "time_ids": ids},
              negative_added_cond_kwargs={"text_embeds": torch.zeros(1, 64, device=device, dtype=dtype),
                                          "time_ids": ids})
    scales = dict(guidance_scale=7.5, pag_scale=3.0, seg_scale=3.0, sag_scale=0.75)

    results = {}
    for label, options in (("guidance_kernels", dict(fork=True)),
                           ("without kernels (anchor formulations)", dict(fork=False, reference=True))):
        with gkd.GuidedDenoiser(unet, pag_layers=["mid"], seg_layers=["mid"], seg_sigma=9999999.0, sag=True,
                                scheduler=scheduler, **options) as den:
            out, times = sample(den, scheduler, latents.clone(), cond, uncond, kw, args.steps, scales, device)
        steady = times[1:] or times
        results[label] = out
        print(f"{label:<40} {1e3 * sum(steady) / len(steady):9.2f} ms/step  (first step {1e3 * times[0]:.1f} ms)")
    a, b = results.values()
    print(f"max |difference| of the final latents: {(a.float() - b.float()).abs().max().item():.3e} "
          f"(latent max {b.float().abs().max().item():.2f}; {args.dtype})")


if __name__ == "__main__":
    main()

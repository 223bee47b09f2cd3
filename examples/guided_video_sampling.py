"""Guided video sampling with a tiny random-weight Wan-2.1-style transformer — no downloads, CPU or GPU.

Samples a short clip with CFG + PAG on the video self-attention (STG-A as the STG authors define
it) + STG-R (the branch skipping one whole block) + SEG blurring the queries in 3-D, through
guidance_kernels' GuidedDenoiser: the five branches in one forward, the perturbed ones computed
from their first perturbed block on. Then runs the same loop the way diffusers' guiders do — one
model call per branch. Prints the per-step time of both and how far apart the final latents are.

    python examples/guided_video_sampling.py [--steps 8] [--frames 5] [--size 32] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from guidance_kernels.integrations import diffusers as gkd

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=256, num_layers=6)
GUIDANCE = dict(pag_layers="blocks.3", slg_layers=[2], seg_layers="blocks.3", seg_blur="3d", seg_sigma=2.0)


def sample(den, scheduler, latents, cond, uncond, steps, scales, device):
    scheduler.set_timesteps(steps)
    times = []
    for t in scheduler.timesteps:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        velocity = den(latents, t.reshape(1).to(device), encoder_hidden_states=cond,
                       negative_encoder_hidden_states=uncond, **scales)
        latents = scheduler.step(velocity, t, latents).prev_sample
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return latents, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**WAN)
    model = (model if dtype == torch.float32 else model.to(dtype)).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, 16, args.frames, args.size, args.size, device=device, dtype=dtype, generator=g)
    cond = torch.randn(1, 32, 64, device=device, dtype=dtype, generator=g)
    uncond = torch.randn(1, 32, 64, device=device, dtype=dtype, generator=g)
    scales = dict(guidance_scale=5.0, pag_scale=1.0, slg_scale=1.0, seg_scale=1.0)

    results = {}
    for label, options in (("one forward (forked)", dict(fork=True)),
                           ("one call per branch (diffusers' guiders)", dict(per_branch=True))):
        with gkd.GuidedDenoiser(model, **GUIDANCE, **options) as den:
            out, times = sample(den, FlowMatchEulerDiscreteScheduler(shift=3.0), latents.clone(), cond, uncond,
                                args.steps, scales, device)
        steady = times[1:] or times
        results[label] = out
        print(f"{label:<42} {1e3 * sum(steady) / len(steady):9.2f} ms/step  (first step {1e3 * times[0]:.1f} ms)")
    a, b = results.values()
    print(f"max |difference| of the final latents: {(a.float() - b.float()).abs().max().item():.3e} "
          f"(latent max {b.float().abs().max().item():.2f}; {args.dtype})")


if __name__ == "__main__":
    main()

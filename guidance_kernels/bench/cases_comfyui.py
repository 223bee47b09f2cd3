"""Benchmark cases of the ComfyUI nodes: the time of a ComfyUI sampler run, stock nodes against ours.

Every provider runs ``comfy.sample.sample`` (euler, a fixed number of steps) on the same model,
seed and conditioning; the stock nodes pay one more diffusion-model call per extra branch, ours
batch every perturbed branch into the cond/uncond call. Next to them: the CFG-only run and the
one-call limit — the same sampler with one batch-3 model call per step and no perturbation (what a
PAG/SEG/SLG step cannot beat) — and, for SAG, whose degraded input needs the step's own uncond
prediction, the limit of its two calls.

CPU: the tiny SD1.5 UNet and SD3 MMDiT of :mod:`guidance_kernels.integrations.comfyui.tiny`
(float32, 16×16 latents: the ratios show batching and call overheads, not GPU behaviour). GPU
(float16): the SDXL UNet and the SD3-medium MMDiT in their real configurations with random weights
at 1024×1024 (latent 128×128). Without an importable ComfyUI the family is skipped.
"""

from __future__ import annotations

import torch

from .harness import Case, Goal, Provider, Setup, dtype_name, within

SDXL_FULL = {"model_channels": 320, "num_head_channels": 64, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10, "context_dim": 2048}
SD3_MEDIUM = {"depth": 24, "adm_in_channels": 2048, "pos_embed_max_size": 192, "num_patches": 36864,
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 1536}}}

# The op stems these cases time (bench --ops filters on them).
OPS = ["comfyui"]
REQUIRES = ("comfy",)
LIMIT = "one-call limit (1 call, batch 3)"


def _limit_model(model):
    """``model`` whose sampler call carries one unperturbed extra branch: the one-call limit."""
    from ..integrations.comfyui import batch

    m = model.clone()
    batch.install(m, batch.Participant("one-call limit"))  # rides in the batch, perturbs nothing
    return m


def _runner(comfy, model, kind, device, dtype, steps, size, widths):
    from ..integrations.comfyui import tiny

    tokens, width, pooled = widths
    positive, negative = tiny.conditioning(kind, tokens=tokens, width=width, pooled=pooled)
    positive = [[c.to(device, dtype), {k: v.to(device, dtype) for k, v in extra.items()}] for c, extra in positive]
    negative = [[c.to(device, dtype), {k: v.to(device, dtype) for k, v in extra.items()}] for c, extra in negative]
    noise = tiny.latent_noise(kind, *size).to(device)
    latent = torch.zeros_like(noise)

    def run():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=0)

    return run


def _goals(pairs) -> list[Goal]:
    """Each of ours (name, factor) within ``factor`` × the one-call limit's time."""
    return [Goal(f"{name} <= {factor}x the {LIMIT} (GPU)", within((LIMIT,), factor),
                 counts=lambda r, name=name: r.provider == name) for name, factor in pairs]


def cases(setup: Setup) -> list[Case]:
    from ..integrations.comfyui import tiny

    device = setup.device
    comfy = tiny.import_comfy(device)  # an ImportError (e.g. no torchvision) skips the family
    from comfy_extras.nodes import nodes_pag, nodes_sag, nodes_slg

    from ..integrations.comfyui import nodes

    gpu = setup.shapes == "real"
    dtype = torch.float16 if setup.gpu else torch.float32
    steps = 1 if setup.smoke else 3 if setup.quick else 8
    size = (128, 128) if gpu else (16, 16)

    def node(cls, model, *args):
        return cls.execute(model, *args).result[0]

    kind = "sdxl" if gpu else "sd15"
    unet = tiny.build(kind, dtype=dtype, device=device, config=SDXL_FULL if gpu else None)
    widths = (77, 2048, 1280) if gpu else (7, None, None)  # tokens, context and pooled widths

    def unet_run(model):
        return _runner(comfy, model, kind, device, dtype, steps, size, widths)

    pag = lambda m: node(nodes.PerturbedAttentionGuidance, m, 3.0)  # noqa: E731
    sag = lambda m: node(nodes.SelfAttentionGuidance, m, 0.5, 2.0)  # noqa: E731
    providers = [
        Provider("CFG only (1 call)", unet_run(unet)),
        Provider(LIMIT, unet_run(_limit_model(unet))),
        Provider("stock PAG (2 calls)", unet_run(node(nodes_pag.PerturbedAttentionGuidance, unet, 3.0))),
        Provider("PAG (1 call)", unet_run(pag(unet)), ours=True),
        Provider("SEG sigma=inf (1 call)", unet_run(node(nodes.SmoothedEnergyGuidance, unet, 3.0, -1.0, "middle", 0,
                                                          -1.0, -1.0, 0.0, "full")), ours=True),
        Provider("stock SAG (2 calls)", unet_run(node(nodes_sag.SelfAttentionGuidance, unet, 0.5, 2.0))),
        Provider("SAG (2 calls)", unet_run(sag(unet)), ours=True),
        Provider("stock PAG+SAG (3 calls)", unet_run(node(nodes_pag.PerturbedAttentionGuidance,
                                                          node(nodes_sag.SelfAttentionGuidance, unet, 0.5, 2.0), 3.0))),
        Provider("PAG+SAG (2 calls)", unet_run(pag(sag(unet))), ours=True),
    ]
    name = f"{'SDXL 1024px' if gpu else 'tiny SD1.5'} UNet, {steps}-step euler run (per step: / {steps})"
    shape = f"1x4x{size[0]}x{size[1]}"
    out = [Case(op="comfyui", name=name, shape=shape, dtype=dtype_name(dtype), providers=providers,
                baseline="CFG only (1 call)", compare_to=LIMIT,
                goals=_goals([("PAG (1 call)", 1.1), ("SEG sigma=inf (1 call)", 1.1)]))]

    dit = tiny.build("sd3", dtype=dtype, device=device, config=SD3_MEDIUM if gpu else None)
    dit_widths = (154, 4096, 2048) if gpu else (7, None, None)

    def dit_run(model):
        return _runner(comfy, model, "sd3", device, dtype, steps, size, dit_widths)

    slg_args = (3.0, 0.0, 1.0, "7" if gpu else "1", "")  # scale, start/end percent (every step), layers
    dit_providers = [
        Provider("CFG only (1 call)", dit_run(dit)),
        Provider(LIMIT, dit_run(_limit_model(dit))),
        Provider("stock SLG (2 calls)", dit_run(node(nodes_slg.SkipLayerGuidanceDiT, dit, *slg_args))),
        Provider("SLG (1 call)", dit_run(node(nodes.SkipLayerGuidanceDiT, dit, *slg_args)), ours=True),
    ]
    dit_name = f"{'SD3-medium 1024px' if gpu else 'tiny SD3'} MMDiT, {steps}-step euler run (per step: / {steps})"
    out.append(Case(op="comfyui", name=dit_name, shape=f"1x16x{size[0]}x{size[1]}", dtype=dtype_name(dtype),
                    providers=dit_providers, baseline="CFG only (1 call)", compare_to=LIMIT,
                    goals=_goals([("SLG (1 call)", 1.05)])))
    return out

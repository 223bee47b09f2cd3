"""guidance_kernels.integrations.diffusers: parity with diffusers' PAG processors and pipelines,
SEG-SDXL's processor, diffusers' CFG (+rescale) combine; layer selection; torch.compile.

Tiny random-weight models are built in the tests (no network); fp32 comparisons are tight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guidance_kernels import reference as R
from guidance_kernels.integrations import diffusers as gkd
from tiny_models import sd3, sd3_inputs, unet_inputs, unet_sd, unet_sdxl

pytest.importorskip("diffusers", reason="diffusers is an optional test dependency (pyproject [test]); "
                    "the GPU image has none")

TIGHT = dict(rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------- layer selection


def test_layer_selection_is_exact_not_a_regex():
    import re

    model = sd3(num_layers=12)
    names = list(gkd.self_attention_layers(model))
    regex = [n for n in names if re.search("blocks.1", n)]  # diffusers' matching
    assert "transformer_blocks.10.attn" in regex and "transformer_blocks.11.attn" in regex
    assert gkd.select_layers(model, "blocks.1") == ["transformer_blocks.1.attn"]
    assert gkd.select_layers(model, ["blocks.10", 11]) == ["transformer_blocks.10.attn", "transformer_blocks.11.attn"]
    assert gkd.select_layers(model, "transformer_blocks.7") == ["transformer_blocks.7.attn"]
    with pytest.raises(ValueError, match="'blocks.12' matches no self-attention layer"):
        gkd.select_layers(model, "blocks.12")


def test_unet_layer_selectors():
    unet = unet_sdxl()
    mid = ["mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.1.attn1"]
    assert gkd.select_layers(unet, "mid") == mid
    assert gkd.select_layers(unet, "m1") == mid[1:]
    assert gkd.select_layers(unet, "d0") == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    assert gkd.select_layers(unet, "up.block_0.attentions_1") == [
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1", "up_blocks.0.attentions.1.transformer_blocks.1.attn1"]
    assert gkd.select_layers(unet, ["down_blocks.1", "mid"])[:2] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1", "down_blocks.1.attentions.0.transformer_blocks.1.attn1"]
    assert all(n.endswith("attn1") for n in gkd.select_layers(unet, "up"))  # never cross-attention
    with pytest.raises(ValueError, match="the mid_block have 2 self-attention layers"):
        gkd.select_layers(unet, "m2")
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        gkd.select_layers(unet, "down_blocks.0")  # a block without attention
    with pytest.raises(TypeError, match="expected a str or an int"):
        gkd.select_layers(unet, 1.5)


# --------------------------------------------------------------------------- processors vs diffusers


def _set(model, layers, processor):
    attention = gkd.self_attention_layers(model)
    for name in gkd.select_layers(model, layers):
        attention[name].set_processor(processor)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("factory", [unet_sd, unet_sdxl], ids=["sd", "sdxl"])
def test_unet_pag_processors_match_diffusers(factory, cfg):
    from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                      PAGIdentitySelfAttnProcessor2_0)

    unet = factory()
    sample, cond, uncond, kw = unet_inputs(batch=2, sdxl=factory is unet_sdxl)
    n = 3 if cfg else 2
    x = torch.cat([sample] * n)
    ehs = torch.cat(([uncond] if cfg else []) + [cond] * (n - cfg))
    added = None
    if kw:
        parts = ([kw["negative_added_cond_kwargs"]] if cfg else []) + [kw["added_cond_kwargs"]] * (n - cfg)
        added = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    theirs_proc = PAGCFGIdentitySelfAttnProcessor2_0() if cfg else PAGIdentitySelfAttnProcessor2_0()
    ours_proc = gkd.PAGCFGIdentityAttnProcessor() if cfg else gkd.PAGIdentityAttnProcessor()
    _set(unet, ["mid", "up_blocks.0"], theirs_proc)
    theirs = unet(x, 37, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    _set(unet, ["mid", "up_blocks.0"], ours_proc)
    ours = unet(x, 37, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    torch.testing.assert_close(ours, theirs, **TIGHT)


@pytest.mark.parametrize("cfg", [True, False])
def test_sd3_pag_joint_processors_match_diffusers(cfg):
    from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

    model = sd3()
    sample, cond, uncond, pooled, neg_pooled = sd3_inputs(batch=2, hw=(16, 12))
    n = 3 if cfg else 2
    x = torch.cat([sample] * n)
    ehs = torch.cat(([uncond] if cfg else []) + [cond] * (n - cfg))
    pp = torch.cat(([neg_pooled] if cfg else []) + [pooled] * (n - cfg))
    t = torch.tensor([500.0] * x.shape[0])
    _set(model, ["blocks.1", "blocks.3"], PAGCFGJointAttnProcessor2_0() if cfg else PAGJointAttnProcessor2_0())
    theirs = model(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pp, timestep=t).sample
    _set(model, ["blocks.1", "blocks.3"], gkd.PAGCFGJointAttnProcessor() if cfg else gkd.PAGJointAttnProcessor())
    ours = model(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pp, timestep=t).sample
    torch.testing.assert_close(ours, theirs, **TIGHT)


# --------------------------------------------------------------------------- pipelines


def _sd_pag_pipeline(unet, layers="mid"):
    from diffusers import DDIMScheduler, StableDiffusionPAGPipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPAGPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                      pag_applied_layers=layers)


@pytest.mark.parametrize("fork", [True, False])
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("layers", ["mid", ["down_blocks.1", "up_blocks.0"]], ids=["mid", "down1-up0"])
def test_guided_denoiser_matches_diffusers_pag_pipeline(layers, cfg, fork):
    unet = unet_sd()
    pipe = _sd_pag_pipeline(unet, layers)
    sample, cond, uncond, _ = unet_inputs(batch=2, hw=(16, 8))
    t = torch.tensor(601)
    pipe._pag_scale, pipe._pag_adaptive_scale = 2.5, 0.0
    pipe._set_pag_attn_processor(pag_applied_layers=pipe.pag_applied_layers, do_classifier_free_guidance=cfg)
    embeds = pipe._prepare_perturbed_attention_guidance(cond, uncond, cfg)
    x = torch.cat([sample] * (3 if cfg else 2))
    noise = unet(x, t, encoder_hidden_states=embeds).sample
    theirs = pipe._apply_perturbed_attention_guidance(noise, cfg, 6.0, t)
    unet.set_attn_processor(pipe.unet.attn_processors)  # restore plain processors before wrapping
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    with gkd.GuidedDenoiser(unet, pag_layers=layers, fork=fork) as den:
        ours = den(sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                   guidance_scale=6.0 if cfg else None, pag_scale=2.5)
    torch.testing.assert_close(ours, theirs, **TIGHT)


def test_enable_on_a_pag_pipeline_gives_the_same_latents():
    unet = unet_sd()
    sample, cond, uncond, _ = unet_inputs(batch=1)

    def run(pipe):
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, guidance_scale=5.0,
                    pag_scale=2.0, output_type="latent", latents=sample.clone()).images

    plain = run(_sd_pag_pipeline(unet, ["mid", "up_blocks.0"]))
    pipe = gkd.enable(_sd_pag_pipeline(unet, ["mid", "up_blocks.0"]))
    assert isinstance(pipe._pag_attn_processors[0], gkd.PAGCFGIdentityAttnProcessor)
    kernels = run(pipe)
    torch.testing.assert_close(kernels, plain, **TIGHT)
    # the pipeline restores its original processors after the call, as it does with its own PAG ones
    assert not any(isinstance(p, gkd.PAGCFGIdentityAttnProcessor) for p in unet.attn_processors.values())


def test_enable_rejects_a_pipeline_without_pag():
    with pytest.raises(TypeError, match="enable: pipe: .* is not a diffusers PAG pipeline"):
        gkd.enable(object())


@pytest.mark.parametrize("fork", [True, False])
@pytest.mark.parametrize("cfg", [True, False])
def test_guided_denoiser_matches_diffusers_sd3_pag_pipeline(cfg, fork):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3PAGPipeline

    model = sd3()
    pipe = StableDiffusion3PAGPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                       text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                       text_encoder_3=None, tokenizer_3=None, pag_applied_layers=["blocks.2"])
    sample, cond, uncond, pooled, neg_pooled = sd3_inputs(batch=1, hw=(12, 16))
    pipe._pag_scale, pipe._pag_adaptive_scale = 3.0, 0.0
    pipe._set_pag_attn_processor(pag_applied_layers=pipe.pag_applied_layers, do_classifier_free_guidance=cfg)
    embeds = pipe._prepare_perturbed_attention_guidance(cond, uncond, cfg)
    pooled_all = pipe._prepare_perturbed_attention_guidance(pooled, neg_pooled, cfg)
    x = torch.cat([sample] * (3 if cfg else 2))
    t = torch.tensor([700.0]).expand(x.shape[0])
    noise = model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled_all).sample
    theirs = pipe._apply_perturbed_attention_guidance(noise, cfg, 5.0, 700.0)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model.set_attn_processor(JointAttnProcessor2_0())
    with gkd.GuidedDenoiser(model, pag_layers=["blocks.2"], fork=fork) as den:
        ours = den(sample, torch.tensor([700.0]), encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                   pooled_projections=pooled, negative_pooled_projections=neg_pooled,
                   guidance_scale=5.0 if cfg else None, pag_scale=3.0)
    torch.testing.assert_close(ours, theirs, **TIGHT)


# --------------------------------------------------------------------------- SEG vs SEG-SDXL


class SEGReferenceProcessor:
    """SEG-SDXL's SEGCFGSelfAttnProcessor, restated: blur Q of the perturbed (last) chunk over its
    token grid with a depthwise 2-D convolution (or the grid mean for σ > 9999), then SDPA. The
    grid is (H, W) of the layer (SEG-SDXL assumes square; pamparamm's port takes the aspect)."""

    def __init__(self, sigma, chunks, grid):
        self.sigma, self.chunks, self.grid = sigma, chunks, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, d).transpose(1, 2) for x in (q, k, v))
        h, w = self.grid(q.shape[2])
        per = b // self.chunks
        q_ptb = q[-per:].permute(0, 1, 3, 2).reshape(per, attn.heads * d, h, w)
        if self.sigma > R.SEG_INF_SIGMA:
            q_ptb = q_ptb.mean(dim=(-2, -1), keepdim=True).expand_as(q_ptb)
        else:
            q_ptb = R.gaussian_blur_2d(q_ptb, R.seg_kernel_size(self.sigma), self.sigma)
        q_ptb = q_ptb.reshape(per, attn.heads, d, h * w).permute(0, 1, 3, 2)
        q = torch.cat([q[:-per], q_ptb])
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@pytest.mark.parametrize("sigma", [1.0, 3.0, 9999999.0])
@pytest.mark.parametrize("hw", [(16, 16), (16, 8)], ids=["square", "non-square"])
def test_guided_denoiser_seg_matches_seg_sdxl(sigma, hw):
    unet = unet_sd()
    sample, cond, uncond, _ = unet_inputs(batch=1, hw=hw)
    t = torch.tensor(400)
    scale, s = 3.0, 5.0
    lh, lw = hw
    grid = lambda n: next((-(-lh // f), -(-lw // f)) for f in (1, 2, 4, 8) if -(-lh // f) * -(-lw // f) == n)  # noqa: E731
    _set(unet, "mid", SEGReferenceProcessor(sigma, 3, grid))
    noise = unet(torch.cat([sample] * 3), t, encoder_hidden_states=torch.cat([uncond, cond, cond])).sample
    u, c, p = noise.chunk(3)
    theirs = u + s * (c - u) + scale * (c - p)
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    with gkd.GuidedDenoiser(unet, seg_layers="mid", seg_sigma=sigma) as den:
        ours = den(sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, guidance_scale=s,
                   seg_scale=scale)
    torch.testing.assert_close(ours, theirs, **TIGHT)


# --------------------------------------------------------------------------- CFG + rescale


def test_cfg_and_rescale_match_diffusers_combine_code():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    unet = unet_sdxl()
    sample, cond, uncond, kw = unet_inputs(batch=2, sdxl=True)
    t = torch.tensor(250)
    added = {k: torch.cat([kw["negative_added_cond_kwargs"][k], kw["added_cond_kwargs"][k]])
             for k in kw["added_cond_kwargs"]}
    noise = unet(torch.cat([sample] * 2), t, encoder_hidden_states=torch.cat([uncond, cond]),
                 added_cond_kwargs=added).sample
    u, c = noise.chunk(2)
    theirs = rescale_noise_cfg(u + 7.0 * (c - u), c, guidance_rescale=0.7)
    with gkd.GuidedDenoiser(unet) as den:
        ours = den(sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, guidance_scale=7.0,
                   guidance_rescale=0.7, **kw)
    torch.testing.assert_close(ours, theirs, **TIGHT)


def test_guided_denoiser_apg_and_cfg_zero_star():
    unet = unet_sd()
    sample, cond, uncond, _ = unet_inputs(batch=1)
    t = torch.tensor(300)
    noise = unet(torch.cat([sample] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = noise.chunk(2)
    with gkd.GuidedDenoiser(unet) as den:
        common = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, guidance_scale=5.0)
        apg = den(sample, t, combine="apg", norm_threshold=15.0, eta=0.5, **common)
        zero = den(sample, t, combine="cfg_zero_star", **common)
        with pytest.raises(ValueError, match="combine='apg' needs CFG alone"):
            den(sample, t, combine="apg", pag_scale=1.0, **common)
    torch.testing.assert_close(apg, R.apg_combine(c, u, 5.0, norm_threshold=15.0, eta=0.5), **TIGHT)
    torch.testing.assert_close(zero, R.cfg_zero_star_combine(c, u, 5.0), **TIGHT)


def test_guided_denoiser_guidance_family_combines():
    """combine= selects TCFG, MAG, FDG, CFG-Norm and Mahiro, fused and reference alike, against the
    reference formulas on the model's own two branches."""
    unet = unet_sd()
    sample, cond, uncond, _ = unet_inputs(batch=1)
    t = torch.tensor(300)
    noise = unet(torch.cat([sample] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = noise.chunk(2)
    common = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond)
    expected = {
        ("tcfg", 5.0, ()): R.tcfg_combine(c, u, 5.0),
        ("mag", 5.0, (("alpha", 2.0),)): R.mag_combine(c, u, 5.0, alpha=2.0),
        ("fdg", (10.0, 5.0), (("parallel_weights", 0.5),)): R.fdg_combine(c, u, [10.0, 5.0], parallel_weights=0.5),
        ("cfg_norm", 5.0, (("strength", 0.8),)): R.cfg_norm(u + 5.0 * (c - u), c, 0.8),
        ("mahiro", 5.0, ()): R.mahiro(u + 5.0 * (c - u), c, u, 5.0),
    }
    for reference in (False, True):
        with gkd.GuidedDenoiser(unet, reference=reference) as den:
            for (combine, scale, options), want in expected.items():
                got = den(sample, t, combine=combine, guidance_scale=list(scale) if combine == "fdg" else scale,
                          **dict(options), **common)
                torch.testing.assert_close(got, want, **TIGHT, msg=f"{combine} reference={reference}")
            with pytest.raises(TypeError, match="guidance_scale: combine='fdg' takes a non-empty list"):
                den(sample, t, combine="fdg", guidance_scale=5.0, **common)
            with pytest.raises(ValueError, match="guidance_rescale: combine='mahiro' is an alternative"):
                den(sample, t, combine="mahiro", guidance_scale=5.0, guidance_rescale=0.5, **common)
            with pytest.raises(TypeError, match="combine='cfg_norm' takes \\['strength'\\], got \\['alpha'\\]"):
                den(sample, t, combine="cfg_norm", guidance_scale=5.0, alpha=1.0, **common)


def test_guided_denoiser_bad_arguments():
    unet = unet_sd()
    with pytest.raises(ValueError, match="seg_sigma: must be > 0"):
        gkd.GuidedDenoiser(unet, seg_sigma=0.0)
    with pytest.raises(ValueError, match="scheduler: SAG needs the scheduler"):
        gkd.GuidedDenoiser(unet, sag=True)
    with pytest.raises(ValueError, match="sag: self-attention guidance needs a UNet"):
        gkd.GuidedDenoiser(sd3(), sag=True, scheduler=object())
    with pytest.raises(ValueError, match=r"GuidedDenoiser: sag_blur_sigma: must be > 0 \(and not NaN\), got nan"):
        gkd.GuidedDenoiser(unet, sag_blur_sigma=float("nan"))
    with pytest.raises(TypeError, match="GuidedDenoiser: seg_sigma: expected a real number, got str"):
        gkd.GuidedDenoiser(unet, seg_sigma="x")
    with pytest.raises(TypeError, match=r"GuidedDenoiser: model: Sequential is not a supported diffusers model "
                                        r"\(supported: UNet2DConditionModel, SD3Transformer2DModel"):
        gkd.GuidedDenoiser(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    sample, cond, uncond, _ = unet_inputs()
    with gkd.GuidedDenoiser(unet) as den:
        with pytest.raises(ValueError, match="negative_encoder_hidden_states: required for CFG"):
            den(sample, 10, encoder_hidden_states=cond, guidance_scale=5.0)
        call = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, guidance_scale=5.0)
        bad = [dict(guidance_scale=float("nan")), dict(guidance_scale=float("inf")), dict(pag_scale=float("nan")),
               dict(pag_scale=torch.tensor([1.0, 2.0, 3.0])), dict(sag_scale=float("nan")),
               dict(guidance_rescale=float("nan")), dict(guidance_rescale=torch.ones(3)),
               dict(seg_scale=torch.tensor([float("nan")]))]
        for override in bad:  # each named by the caller's argument, not guidance_combine's internals
            (name,) = override
            with pytest.raises(ValueError, match=f"GuidedDenoiser: {name}: "):
                den(sample, 10, **{**call, **override})
        with pytest.raises(ValueError, match="GuidedDenoiser: encoder_hidden_states: batch 2 differs from sample's 1"):
            den(sample, 10, **{**call, "encoder_hidden_states": cond.expand(2, -1, -1),
                               "negative_encoder_hidden_states": uncond.expand(2, -1, -1)})


def test_remove_restores_the_original_processors():
    unet = unet_sd()
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    den = gkd.GuidedDenoiser(unet, pag_layers="mid", seg_layers="up_blocks.1")
    assert any(isinstance(p, gkd.GuidedAttnProcessor) for p in unet.attn_processors.values())
    den.remove()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert not unet.mid_block._forward_pre_hooks


# --------------------------------------------------------------------------- torch.compile


def test_compiled_unet_with_processors_has_no_graph_breaks_and_compiles_once():
    import torch._dynamo.testing

    unet = unet_sd()
    sample, cond, uncond, _ = unet_inputs(batch=1)
    den = gkd.GuidedDenoiser(unet, pag_layers="mid", seg_layers="mid", fork=True)
    # aot_eager traces through AOTAutograd with fake tensors (our ops' fakes) without inductor's
    # slow CPU codegen; fullgraph=True fails on any graph break inside the processors.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    den.model = torch.compile(unet, fullgraph=True, backend=counter)
    eager = gkd.GuidedDenoiser(unet_sd(), pag_layers="mid", seg_layers="mid", fork=True)
    for step in range(10):
        s, p, q = (torch.tensor(v) for v in (7.5 - 0.3 * step, 3.0 - 0.2 * step, 1.0 + 0.1 * step))
        t = torch.tensor(900 - 80 * step)
        kwargs = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, guidance_scale=s,
                      pag_scale=p, seg_scale=q)
        got = den(sample, t, **kwargs)
        torch.testing.assert_close(got, eager(sample, t, **kwargs), **TIGHT)
    assert counter.frame_count == 1, counter.frame_count  # the model traced once; scales are tensors


# --------------------------------------------------------------------------- SAG vs diffusers' SAG pipeline


def _sag_pipeline(unet, scheduler):
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline)

    return StableDiffusionSAGPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_denoiser_sag_matches_diffusers_sag_pipeline(cfg, prediction_type):
    """One step of StableDiffusionSAGPipeline (mid-block attention capture, pred_x0, sag_masking,
    the extra uncond forward, noise_pred += s(eps_uncond − eps_degraded)) with diffusers' own
    methods, against the GuidedDenoiser, which captures the key mass in the main forward."""
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor)

    unet = unet_sd()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    pipe = _sag_pipeline(unet, scheduler)
    sample, cond, uncond, _ = unet_inputs(batch=2, hw=(16, 16))
    guidance, sag_scale = 5.0, 0.75

    from diffusers.models.attention_processor import AttnProcessor2_0

    store = CrossAttnStoreProcessor()
    unet.set_attn_processor(AttnProcessor2_0())
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor = store
    map_size = {}

    def get_map_size(module, inputs, output):  # diffusers' SAG pipeline hook (returns None: output kept)
        map_size["hw"] = output[0].shape[-2:]

    hook = unet.mid_block.attentions[0].register_forward_hook(get_map_size)
    x = torch.cat([sample] * 2) if cfg else sample
    embeds = torch.cat([uncond, cond]) if cfg else cond
    noise = unet(x, t, encoder_hidden_states=embeds).sample
    hook.remove()
    if cfg:
        noise_uncond, noise_text = noise.chunk(2)
        noise = noise_uncond + guidance * (noise_text - noise_uncond)
        base, attn_map, emb = noise_uncond, store.attention_probs.chunk(2)[0], uncond
    else:
        base, attn_map, emb = noise, store.attention_probs, cond
    pred_x0 = pipe.pred_x0(sample, base, t)
    degraded = pipe.sag_masking(pred_x0, attn_map, map_size["hw"], t, pipe.pred_epsilon(sample, base, t))
    degraded_pred = unet(degraded, t, encoder_hidden_states=emb).sample
    theirs = noise + sag_scale * (base - degraded_pred)

    unet.set_attn_processor(AttnProcessor2_0())
    for reference in (False, True):
        with gkd.GuidedDenoiser(unet, sag=True, scheduler=scheduler, reference=reference) as den:
            ours = den(sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                       guidance_scale=guidance if cfg else None, sag_scale=sag_scale)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_guided_denoiser_sag_with_pag_and_seg_in_one_forward():
    """SAG's capture layer is also a PAG and SEG layer: the key mass of the uncond rows and the
    perturbed rows come out of the same mid-block call, equal to the reference mode."""
    from diffusers import DDIMScheduler

    unet = unet_sd()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(10)
    sample, cond, uncond, _ = unet_inputs(batch=1, hw=(16, 8))
    kwargs = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, guidance_scale=6.0,
                  pag_scale=2.0, seg_scale=2.0, sag_scale=0.5)
    results = []
    for reference, fork in ((True, False), (False, True), (False, False)):
        with gkd.GuidedDenoiser(unet, pag_layers="mid", seg_layers="mid", seg_sigma=2.0, sag=True,
                                scheduler=scheduler, reference=reference, fork=fork) as den:
            results.append(den(sample, scheduler.timesteps[2], **kwargs))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[2], results[0], rtol=1e-4, atol=1e-4)

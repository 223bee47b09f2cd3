"""guidance_kernels.integrations.diffusers.guiders in diffusers' modular pipelines (tiny
components built from configs): the final latents of our guider equal those of diffusers' own
guider on the same pipeline (fp32, <= 1e-5 relative, several steps), with ONE model call per step.

Where diffusers' guider is broken (see docs/guiders.md) the oracle is diffusers' guider
with the perturbation it means installed by a test hook, its combine untouched:

* SEG: diffusers never installs its hook; the oracle blurs ``to_q``'s output with the reference
  blur (SEG-SDXL) over the real (non-square) token grid.
* PAG on joint attention (SD3) and on transformers where diffusers' hook fails (Wan): the oracle
  runs the layer's own processor with diffusers' PAG joint identity mask added to its SDPA.
* SLG on SD3: diffusers' block-skip hook returns the block's outputs in the wrong order; the
  oracle's hook returns ``(encoder, hidden)`` as the block does.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402
from diffusers import guiders as dg  # noqa: E402
from diffusers.hooks import LayerSkipConfig, SmoothedEnergyGuidanceConfig  # noqa: E402

from guidance_kernels import reference as R  # noqa: E402
from guidance_kernels.integrations import diffusers as gkd  # noqa: E402
from guidance_kernels.integrations.diffusers import guiders as og  # noqa: E402
import tiny_models as tm  # noqa: E402

STEPS = 3
MID = "mid_block.attentions.0.transformer_blocks"


def pag_config(indices=(0,), fqn=MID):
    return LayerSkipConfig(list(indices), fqn=fqn, skip_attention=False, skip_attention_scores=True, skip_ff=False)


# --------------------------------------------------------------------------- pipelines


class Pipe:
    """A modular pipeline with tiny components, its model and fixed inputs; counts model calls and
    records the conditioning rows of each call."""

    def __init__(self, family: str):
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        if family == "sdxl":
            from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
                StableDiffusionXLCoreDenoiseStep as Blocks)
            self.model, self.component = tm.unet_sdxl(), "unet"
            # trailing: the last step is at t = 333 of 3, not t = 0, so its prediction moves the latents
            scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing")
            self.inputs = dict(prompt_embeds=r(1, 7, 32), negative_prompt_embeds=r(1, 7, 32),
                               pooled_prompt_embeds=r(1, 16), negative_pooled_prompt_embeds=r(1, 16), height=64,
                               width=48)
        elif family == "sd3":
            from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
                StableDiffusion3T2ICoreDenoiseStep as Blocks)
            self.model, self.component = tm.sd3(), "transformer"
            scheduler = FlowMatchEulerDiscreteScheduler()
            self.inputs = dict(prompt_embeds=r(1, 6, 32), negative_prompt_embeds=r(1, 6, 32),
                               pooled_prompt_embeds=r(1, 16), negative_pooled_prompt_embeds=r(1, 16), height=128,
                               width=96)
        elif family == "wan":
            from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep as Blocks
            self.model, self.component = tm.wan(), "transformer"
            scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
            self.inputs = dict(prompt_embeds=r(1, 5, 16), negative_prompt_embeds=r(1, 5, 16), height=64, width=96,
                               num_frames=9, latents=r(1, 4, 3, 8, 12))
        elif family == "ltx":
            from diffusers.modular_pipelines.ltx.modular_blocks_ltx import LTXCoreDenoiseStep as Blocks
            self.model, self.component = tm.ltx(), "transformer"
            scheduler = FlowMatchEulerDiscreteScheduler()
            self.inputs = dict(prompt_embeds=r(1, 5, 16), negative_prompt_embeds=r(1, 5, 16),
                               prompt_attention_mask=torch.ones(1, 5),
                               negative_prompt_attention_mask=torch.tensor([[1.0, 1, 1, 0, 0]]), height=128,
                               width=96, num_frames=9)
        sharpen_attention(self.model)
        self.family = family
        self.pipe = Blocks().init_pipeline()
        self.pipe.update_components(**{self.component: self.model}, scheduler=scheduler)
        self.rows = []
        self.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.rows.append(ehs.shape[0])

    def __call__(self, guider, steps: int = STEPS, **inputs):
        self.pipe.update_components(guider=guider)
        self.rows = []
        return self.pipe(**{**self.inputs, **inputs}, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(1),
                         output="latents")


def sharpen_attention(model, logits: float = 16.0, output: float = 10.0):
    """Random tiny models attend almost uniformly and their attention adds little to the output:
    PAG and SEG would then move the final latents less than fp32 batching noise. Sharper logits
    and a louder output projection make every perturbation visible (see :func:`effect`)."""
    with torch.no_grad():
        for attn in gkd.self_attention_layers(model).values():
            attn.to_q.weight.mul_(logits ** 0.5)
            attn.to_k.weight.mul_(logits ** 0.5)
            attn.to_out[0].weight.mul_(output)
            if attn.to_out[0].bias is not None:
                attn.to_out[0].bias.mul_(output)


@pytest.fixture(scope="module")
def pipes():
    return {}


def pipe_for(pipes, family):
    if family not in pipes:
        pipes[family] = Pipe(family)
    return pipes[family]


def close(got, want, rel=1e-5):
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max |error| {err:.3e} vs max |want| {want.abs().max().item():.3e}"


def check_plain_model(pipe: Pipe):
    """Between runs the model is the stock one: original processors, only the test's own hook."""
    assert len(pipe.model._forward_pre_hooks) == 1 and not pipe.model._forward_hooks
    for name, attn in gkd.self_attention_layers(pipe.model).items():
        assert not type(attn.processor).__module__.startswith("guidance_kernels"), name
    for name in gkd.top_level_blocks(pipe.model):
        block = pipe.model.get_submodule(name)
        assert not block._forward_pre_hooks and not block._forward_hooks, name


def compare(pipe: Pipe, ours, theirs, *, rel=1e-5, **inputs):
    want = pipe(theirs, **inputs)
    their_calls = len(pipe.rows)
    got = pipe(ours, **inputs)
    assert len(pipe.rows) == STEPS, pipe.rows  # one model call per step
    assert their_calls >= STEPS
    close(got, want, rel)
    check_plain_model(pipe)
    return got, want


# --------------------------------------------------------------------------- oracles for diffusers' broken hooks


class IdentityAttention(torch.overrides.TorchFunctionMode):
    """PAG inside a layer's own processor: its SDPA gets diffusers' PAG joint identity mask
    (image query i sees key i and every text key; text queries see everything)."""

    def __init__(self, image_tokens: int):
        super().__init__()
        self.image_tokens = image_tokens

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            kwargs.update(dict(zip(("query", "key", "value", "attn_mask"), args)))
            q = kwargs["query"]
            mask = R.joint_identity_mask(self.image_tokens, q.shape[-2] - self.image_tokens, "after", q.dtype,
                                         q.device)
            kwargs["attn_mask"] = mask if kwargs.get("attn_mask") is None else kwargs["attn_mask"] + mask
            return func(**kwargs)
        return func(*args, **kwargs)


def oracle(cls, install):
    """diffusers' guider ``cls`` whose perturbed (third) call gets ``install(model) -> handles``."""

    class Oracle(cls):
        def prepare_models(self, denoiser):
            self._count_prepared += 1
            self._handles = []
            if self._count_prepared == 3:
                self._handles = install(denoiser)

        def cleanup_models(self, denoiser):
            for h in self._handles:
                h.remove()

    return Oracle


def identity_on(layers, image_tokens):
    def install(model):
        attention, handles = gkd.self_attention_layers(model), []
        for name in gkd.select_layers(model, layers):
            mode = IdentityAttention(image_tokens)
            handles.append(attention[name].register_forward_pre_hook(lambda *a, m=mode: m.__enter__() and None))
            handles.append(attention[name].register_forward_hook(lambda *a, m=mode: m.__exit__(None, None, None)))
        return handles
    return install


def blur_q_on(layers, grid, sigma):
    def install(model):
        attention = gkd.self_attention_layers(model)
        return [attention[name].to_q.register_forward_hook(
            lambda m, a, out: R.blur_tokens(out, sigma, grid, "bnc")) for name in gkd.select_layers(model, layers)]
    return install


def joint_block_skip(blocks):
    def install(model):
        def passthrough(module, args, kwargs, out):
            return kwargs["encoder_hidden_states"], kwargs["hidden_states"]  # JointTransformerBlock's order
        return [model.get_submodule(b).register_forward_hook(passthrough, with_kwargs=True) for b in blocks]
    return install


# --------------------------------------------------------------------------- SDXL


SDXL_CASES = {
    "cfg rescale original": ("ClassifierFreeGuidance",
                             dict(guidance_scale=3.0, guidance_rescale=0.7, use_original_formulation=True)),
    "pag rescale": ("PerturbedAttentionGuidance", dict(guidance_scale=5.0, perturbed_guidance_scale=2.0,
                                                      perturbed_guidance_config=pag_config(),
                                                      perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                                      guidance_rescale=0.5)),
    "pag and cfg intervals": ("PerturbedAttentionGuidance", dict(guidance_scale=5.0, perturbed_guidance_scale=2.0,
                                                                perturbed_guidance_config=pag_config(), start=0.34,
                                                                perturbed_guidance_start=0.34,
                                                                perturbed_guidance_stop=1.0)),
    "apg momentum": ("AdaptiveProjectedGuidance", dict(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                                       adaptive_projected_guidance_rescale=2.0, eta=0.5)),
    "cfg-zero*": ("ClassifierFreeZeroStarGuidance", dict(guidance_scale=5.0, zero_init_steps=1)),
    "tcfg": ("TangentialClassifierFreeGuidance", dict(guidance_scale=5.0, guidance_rescale=0.3)),
}


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_matches_diffusers_guider_with_one_call_per_step(pipes, case):
    name, kwargs = SDXL_CASES[case]
    rebuild = lambda: {k: pag_config() if isinstance(v, LayerSkipConfig) else v for k, v in kwargs.items()}  # noqa
    compare(pipe_for(pipes, "sdxl"), getattr(og, name)(**rebuild()), getattr(dg, name)(**rebuild()))


class PagWithoutCfg(dg.PerturbedAttentionGuidance):
    """diffusers' PAG guider where CFG is off and PAG on: its second call gets the cond inputs and
    the PAG hook (diffusers' hands it the negative inputs, unperturbed)."""

    def prepare_inputs(self, data):
        if self.num_conditions == 2 and not self._is_cfg_enabled():
            return [self._prepare_batch(data, 0, name) for name in ("pred_cond", "pred_cond_skip")]
        return super().prepare_inputs(data)

    @property
    def is_conditional(self):
        return self._count_prepared in (1, 3) or (self._count_prepared == 2 and not self._is_cfg_enabled())


def test_sdxl_pag_without_cfg_perturbs_the_cond_branch(pipes):
    """CFG on at step 0 only, PAG on at steps 1 and 2: [uncond, cond], then [cond, pag]."""
    pipe = pipe_for(pipes, "sdxl")
    args = dict(guidance_scale=5.0, perturbed_guidance_scale=3.0, stop=0.34, perturbed_guidance_start=0.0,
                perturbed_guidance_stop=1.0)
    got, want = compare(pipe, og.PerturbedAttentionGuidance(**args, perturbed_guidance_config=pag_config()),
                        PagWithoutCfg(**args, perturbed_guidance_config=pag_config()))
    assert pipe.rows == [2, 2, 2]
    effect(got, want, pipe(dg.PerturbedAttentionGuidance(**args, perturbed_guidance_config=pag_config())))


def test_sdxl_inactive_branches_leave_the_batch(pipes):
    """PAG on at step 2 only (diffusers' strict start < step < stop), CFG off at step 3; CFG at
    scale 1 is off: the plain call."""
    pipe = pipe_for(pipes, "sdxl")
    guider = og.PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0, stop=0.75,
                                           perturbed_guidance_config=pag_config(), perturbed_guidance_start=0.25,
                                           perturbed_guidance_stop=0.75)
    pipe(guider, steps=4)
    assert pipe.rows == [2, 2, 3, 1]
    pipe(og.ClassifierFreeGuidance(guidance_scale=1.0), steps=2)
    assert pipe.rows == [1, 1]


@pytest.mark.parametrize("sigma", [9999999.0, 1.0], ids=["inf", "finite"])
def test_sdxl_seg_blurs_as_seg_sdxl(pipes, sigma):
    pipe = pipe_for(pipes, "sdxl")
    args = dict(guidance_scale=5.0, seg_guidance_scale=20.0, seg_blur_sigma=sigma, seg_guidance_start=0.0,
                seg_guidance_stop=1.0, seg_guidance_config=SmoothedEnergyGuidanceConfig([0], fqn=MID))
    grid = (4, 3)  # the mid block of the tiny UNet on the 8x6 latent
    fixed = oracle(dg.SmoothedEnergyGuidance, blur_q_on("mid_block.attentions.0.transformer_blocks.0", grid, sigma))
    got, want = compare(pipe, og.SmoothedEnergyGuidance(**args), fixed(**args))
    as_diffusers = pipe(dg.SmoothedEnergyGuidance(**args))  # its hook is never installed: plain CFG
    plain = pipe(dg.ClassifierFreeGuidance(guidance_scale=5.0))
    close(as_diffusers, plain)
    effect(got, want, plain)


def effect(got, want, base):
    """``got`` matches ``want`` to within 2% of the perturbation's effect over ``base`` (the final
    latents of a tiny random model move little: the 1e-5 relative match alone would not see it)."""
    err, moved = (got - want).abs().max().item(), (want - base).abs().max().item()
    assert moved > 0 and err <= 2e-2 * moved, f"max |error| {err:.3e} vs the perturbation's effect {moved:.3e}"


def test_sdxl_mag_is_frobenius_where_diffusers_raises(pipes):
    pipe = pipe_for(pipes, "sdxl")
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        pipe(dg.MagnitudeAwareGuidance(guidance_scale=5.0))  # torch.norm with three dims on 4-D latents
    got = pipe(og.MagnitudeAwareGuidance(guidance_scale=5.0, alpha=2.0))
    assert len(pipe.rows) == STEPS and torch.isfinite(got).all()


def test_sdxl_fdg_matches_diffusers(pipes):
    pytest.importorskip("kornia")
    pipe = pipe_for(pipes, "sdxl")
    args = dict(guidance_scales=[6.0, 3.0], parallel_weights=[0.5, 1.0], guidance_rescale=0.3)
    compare(pipe, og.FrequencyDecoupledGuidance(**args), dg.FrequencyDecoupledGuidance(**args))
    # Level 1 off after step 0: diffusers' forward then appends the previous level's cond band
    # (a stale loop variable, of the wrong size); the oracle guides it at scale 1 (its cond band).
    args = dict(guidance_scales=[6.0, 3.0], parallel_weights=[0.5, 1.0], start=[0.0, 0.0], stop=[1.0, 0.5])
    with pytest.raises(RuntimeError, match="must match the size"):
        pipe(dg.FrequencyDecoupledGuidance(**args))
    compare(pipe, og.FrequencyDecoupledGuidance(**args), LevelsAtScaleOne(**args))


class LevelsAtScaleOne(dg.FrequencyDecoupledGuidance):
    """diffusers' FDG with a level outside its interval guided at scale 1 (parallel weight 1: its
    cond band up to rounding) instead of its broken branch for an inactive level."""

    def forward(self, pred_cond, pred_uncond=None):
        scales = self.guidance_scales
        on = [self._is_fdg_enabled_for_level(i) for i in range(self.levels)]
        self.guidance_scales = [s if o else 1.0 for s, o in zip(scales, on)]
        self._is_fdg_enabled_for_level = lambda level: True
        try:
            return super().forward(pred_cond, pred_uncond)
        finally:
            self.guidance_scales = scales
            del self._is_fdg_enabled_for_level


def test_several_guiders_in_turn_and_round_trips(pipes, tmp_path):
    """Ours and diffusers' guiders alternate on one pipeline; each result is its own; configs save
    and load in both directions."""
    pipe = pipe_for(pipes, "sdxl")
    pag = dict(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
               perturbed_guidance_stop=1.0)
    ours = og.PerturbedAttentionGuidance(**pag, perturbed_guidance_config=pag_config())
    first = pipe(ours)
    theirs = pipe(dg.PerturbedAttentionGuidance(**pag, perturbed_guidance_config=pag_config()))
    cfg = pipe(og.ClassifierFreeGuidance(guidance_scale=4.0))
    again = pipe(ours)
    close(first, theirs)
    effect(first, theirs, cfg)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    ours.save_pretrained(tmp_path)
    loaded = og.PerturbedAttentionGuidance.from_pretrained(tmp_path)
    assert type(loaded) is og.PerturbedAttentionGuidance and loaded.skip_layer_config == ours.skip_layer_config
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "guider_config.json").read_text() == (tmp_path / "guider_config.json").read_text()
    assert type(dg.PerturbedAttentionGuidance.from_pretrained(tmp_path)) is dg.PerturbedAttentionGuidance
    torch.testing.assert_close(pipe(loaded), first, rtol=0, atol=0)
    renewed = ours.new(guidance_scale=4.0)
    assert type(renewed) is og.PerturbedAttentionGuidance
    check_plain_model(pipe)


def test_compiled_unet_compiles_once_per_branch_set(pipes):
    """Scales change between runs and inside the schedule: one trace per branch set, no more."""
    import torch._dynamo.testing

    pipe = pipe_for(pipes, "sdxl")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(pipe.model, backend=counter)
    pipe.pipe.update_components(unet=compiled)
    try:
        outs = []
        for scale in (4.0, 6.5):
            guider = og.PerturbedAttentionGuidance(guidance_scale=scale, perturbed_guidance_scale=scale / 2,
                                                   perturbed_guidance_config=pag_config(), perturbed_guidance_start=0.0,
                                                   perturbed_guidance_stop=1.0)
            outs.append(pipe(guider, steps=2))
        assert counter.frame_count == 2, counter.frame_count  # [uncond, cond] at step 0, then the PAG batch
    finally:
        pipe.pipe.update_components(unet=pipe.model)
    close(outs[1], pipe(guider, steps=2))


def test_perturbed_guidance_one_step_equals_the_guided_denoiser():
    """The composite guider through the loop protocol by hand (set_state → prepare_inputs →
    prepare_models → model → cleanup_models → guider) vs GuidedDenoiser.__call__."""
    unet = tm.unet_sdxl()
    sample, cond, uncond, kw = tm.unet_inputs(batch=2, hw=(12, 10), sdxl=True)
    guider = og.PerturbedGuidance(guidance_scale=5.0, pag_scale=2.0, pag_layers="mid", seg_scale=1.5,
                                  seg_layers="up_blocks.0", seg_blur_sigma=1.0, guidance_rescale=0.4)
    t = torch.tensor(600)
    guider.set_state(step=1, num_inference_steps=4, timestep=t)
    fields = {"prompt_embeds": (cond, uncond),
              "time_ids": (kw["added_cond_kwargs"]["time_ids"], kw["negative_added_cond_kwargs"]["time_ids"]),
              "text_embeds": (kw["added_cond_kwargs"]["text_embeds"], kw["negative_added_cond_kwargs"]["text_embeds"])}
    (batch,) = guider.prepare_inputs(fields)
    guider.prepare_models(unet)
    batch.noise_pred = unet(sample, t, encoder_hidden_states=batch.prompt_embeds,
                            added_cond_kwargs={"time_ids": batch.time_ids, "text_embeds": batch.text_embeds},
                            return_dict=False)[0]
    guider.cleanup_models(unet)
    got = guider([batch]).pred
    assert batch.noise_pred.shape[0] == 4 * 2 and guider.num_conditions == 4
    with gkd.GuidedDenoiser(unet, pag_layers="mid", seg_layers="up_blocks.0", seg_sigma=1.0) as den:
        want = den(sample, t, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, **kw,
                   guidance_scale=5.0, pag_scale=2.0, seg_scale=1.5, guidance_rescale=0.4)
    close(got, want)
    # forward() on separate predictions is the same combine
    parts = batch.noise_pred.chunk(4)
    order = next(iter(guider._engines.values()))[1]._plans
    kinds = next(iter(order.values())).kinds
    named = {f"pred_{'uncond' if k == 'uncond' else 'cond' if k == 'cond' else 'cond_' + k}": p
             for k, p in zip(kinds, parts)}
    close(guider.forward(**named).pred, want)


# --------------------------------------------------------------------------- DiTs


def test_sd3_cfg_pag_slg(pipes):
    pipe = pipe_for(pipes, "sd3")
    _, plain = compare(pipe, og.ClassifierFreeGuidance(guidance_scale=4.0),
                       dg.ClassifierFreeGuidance(guidance_scale=4.0))
    pag = dict(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
               perturbed_guidance_stop=1.0)
    fixed = oracle(dg.PerturbedAttentionGuidance, identity_on("transformer_blocks.1", image_tokens=8 * 6))
    effect(*compare(pipe, og.PerturbedAttentionGuidance(**pag, perturbed_guidance_layers=1),
                    fixed(**pag, perturbed_guidance_layers=1)), plain)
    slg = dict(guidance_scale=4.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
               skip_layer_guidance_stop=1.0)
    fixed = oracle(dg.SkipLayerGuidance, joint_block_skip(["transformer_blocks.2"]))
    effect(*compare(pipe, og.SkipLayerGuidance(**slg, skip_layer_config=LayerSkipConfig([2])),
                    fixed(**slg, skip_layer_config=LayerSkipConfig([2]))), plain)


def test_wan_slg_and_pag(pipes):
    pipe = pipe_for(pipes, "wan")
    _, plain = compare(pipe, og.ClassifierFreeGuidance(guidance_scale=4.0),
                       dg.ClassifierFreeGuidance(guidance_scale=4.0))
    slg = dict(guidance_scale=4.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
               skip_layer_guidance_stop=1.0)
    attention_only = lambda: LayerSkipConfig([1], skip_attention=True, skip_ff=False)  # noqa: E731
    effect(*compare(pipe, og.SkipLayerGuidance(**slg, skip_layer_config=attention_only()),
                    oracle(dg.SkipLayerGuidance, _attention_skip("blocks.1"))(**slg,
                                                                              skip_layer_config=attention_only())),
           plain)
    effect(*compare(pipe, og.SkipLayerGuidance(**slg, skip_layer_config=LayerSkipConfig([2])),
                    dg.SkipLayerGuidance(**slg, skip_layer_config=LayerSkipConfig([2]))), plain)
    pag = dict(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
               perturbed_guidance_stop=1.0)
    fixed = oracle(dg.PerturbedAttentionGuidance, identity_on("blocks.1", image_tokens=3 * 4 * 6))
    effect(*compare(pipe, og.PerturbedAttentionGuidance(**pag, perturbed_guidance_layers=[1]),
                    fixed(**pag, perturbed_guidance_layers=[1])), plain)


def _attention_skip(block):
    """diffusers' attention-only skip crashes on these models: the oracle returns the self-attention's input."""
    def install(model):
        return [model.get_submodule(f"{block}.attn1").register_forward_hook(
            lambda m, a, kw, out: kw.get("hidden_states", a[0] if a else None), with_kwargs=True)]
    return install


def test_ltx_cfg_mag_autoguidance(pipes):
    pipe = pipe_for(pipes, "ltx")
    _, plain = compare(pipe, og.ClassifierFreeGuidance(guidance_scale=3.0),
                       dg.ClassifierFreeGuidance(guidance_scale=3.0))
    # LTX's latents are packed (B, N, C): diffusers' MAG norms work there
    compare(pipe, og.MagnitudeAwareGuidance(guidance_scale=4.0, alpha=3.0, guidance_rescale=0.2),
            dg.MagnitudeAwareGuidance(guidance_scale=4.0, alpha=3.0, guidance_rescale=0.2))
    auto = dict(guidance_scale=3.0, auto_guidance_config=LayerSkipConfig([1, 2]))
    effect(*compare(pipe, og.AutoGuidance(**auto), dg.AutoGuidance(**auto)), plain)
    assert pipe.rows == [2] * STEPS


# --------------------------------------------------------------------------- bad configurations


BAD_ARGUMENTS = [
    ("ClassifierFreeGuidance", dict(guidance_scale="7"), TypeError, "guidance_scale: expected a real number"),
    ("ClassifierFreeGuidance", dict(guidance_scale=math.nan), ValueError, "guidance_scale: must be finite"),
    ("ClassifierFreeGuidance", dict(start=0.8, stop=0.2), ValueError, "start/stop: need start <= stop"),
    ("ClassifierFreeGuidance", dict(guidance_rescale=1.5), ValueError, "guidance_rescale: guidance rescale φ"),
    ("ClassifierFreeGuidance", dict(enabled=1), TypeError, "enabled: expected True or False"),
    ("ClassifierFreeGuidance", dict(scale=3.0), TypeError, "arguments: got an unexpected keyword argument"),
    ("PerturbedAttentionGuidance", dict(), ValueError,
     "perturbed_guidance_layers: `perturbed_guidance_layers` must be provided"),  # diffusers' check, named
    ("SkipLayerGuidance", dict(skip_layer_config=[LayerSkipConfig([1]), LayerSkipConfig([2], skip_ff=False)]),
     ValueError, "skip_layer_config: its configs must all perturb the same way"),
    ("AutoGuidance", dict(auto_guidance_layers=[1], dropout=0.5), ValueError,
     "auto_guidance_config: dropout=0.5 drops the skipped outputs at random"),
    ("SmoothedEnergyGuidance", dict(seg_guidance_layers=[1], seg_blur_sigma=-1.0), ValueError,
     "seg_blur_sigma: must be > 0"),
    ("ClassifierFreeZeroStarGuidance", dict(zero_init_steps=-1), ValueError, "zero_init_steps: must be >= 0"),
    ("MagnitudeAwareGuidance", dict(alpha=-1.0), ValueError, "alpha: must be >= 0"),
    ("AdaptiveProjectedGuidance", dict(adaptive_projected_guidance_momentum="x"), TypeError,
     "adaptive_projected_guidance_momentum: expected a real number"),
    ("PerturbedGuidance", dict(perturbed_guidance_start=0.9, perturbed_guidance_stop=0.1), ValueError,
     "perturbed_guidance_start/perturbed_guidance_stop: need"),
    ("PerturbedGuidance", dict(slg_scale=2.0), ValueError, "slg_layers: required with slg_scale"),
]


@pytest.mark.parametrize("name, kwargs, exc, message", BAD_ARGUMENTS, ids=[f"{c[0]} {sorted(c[1])}"
                                                                          for c in BAD_ARGUMENTS])
def test_bad_constructor_arguments_are_named(name, kwargs, exc, message):
    with pytest.raises(exc, match="^" + re.escape(f"{name}: {message}")):
        getattr(og, name)(**kwargs)


def test_bad_configurations_for_the_model_are_named():
    unet = tm.unet_sdxl()
    g = og.PerturbedAttentionGuidance(perturbed_guidance_layers=[0])
    with pytest.raises(ValueError, match="PerturbedAttentionGuidance: perturbed_guidance_config: fqn='auto' finds "
                                         "no block list in a UNet"):
        g._engine(unet)
    g = og.PerturbedAttentionGuidance(perturbed_guidance_config=pag_config([0], fqn="down_blocks.1.attentions.0."
                                                                                   "transformer_blocks"))
    assert g._engine(unet).pag_layers == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    g = og.PerturbedAttentionGuidance(perturbed_guidance_config=pag_config([5]))
    with pytest.raises(ValueError, match="PerturbedAttentionGuidance: pag_layers: layer selector "):
        g._engine(unet)
    with pytest.raises(TypeError, match="ClassifierFreeGuidance: model: Linear is not a supported diffusers model"):
        g = og.ClassifierFreeGuidance(guidance_scale=3.0)
        g.prepare_inputs({"prompt_embeds": (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))})
        g.prepare_models(torch.nn.Linear(2, 2))
    g = og.ClassifierFreeGuidance(guidance_scale=3.0)
    with pytest.raises(ValueError, match="ClassifierFreeGuidance: prompt_embeds: None for one branch"):
        g.prepare_inputs({"prompt_embeds": (torch.zeros(1, 2, 3), None)})

"""Shared-prefix branches (issue 6): perturbed branches join the batch at their first perturbed
block. Forked == full batched forward == diffusers' PAG pipeline; the prefix really is computed
once; several branches fork at different blocks; compiled models retrace once per branch set."""

from __future__ import annotations

import pytest
import torch

from guidance_kernels.integrations import diffusers as gkd
from tiny_models import sd3, sd3_inputs, unet_inputs, unet_sd, unet_sdxl

pytest.importorskip("diffusers", reason="diffusers is an optional test dependency (pyproject [test]); "
                    "the GPU image has none")

TIGHT = dict(rtol=2e-5, atol=2e-5)


def _batches_seen(model, blocks):
    seen = {}
    handles = [model.get_submodule(b).register_forward_pre_hook(
        lambda m, args, kwargs, b=b: seen.setdefault(b, []).append(
            (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True) for b in blocks]
    return seen, handles


def _unet_call(den, sample, cond, uncond, kw, cfg, **scales):
    return den(sample, torch.tensor(500), encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
               guidance_scale=6.0 if cfg else None, **kw, **scales)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("layers", ["d0", "mid", "u3"], ids=["first", "middle", "last"])
def test_unet_fork_equals_full_batch(layers, cfg):
    unet = unet_sdxl()
    sample, cond, uncond, kw = unet_inputs(batch=2, hw=(16, 12), sdxl=True)
    with gkd.GuidedDenoiser(unet, pag_layers=layers, fork=False) as full:
        expect = _unet_call(full, sample, cond, uncond, kw, cfg, pag_scale=2.0)
    with gkd.GuidedDenoiser(unet, pag_layers=layers, fork=True) as forked:
        seen, handles = _batches_seen(unet, gkd.top_level_blocks(unet))
        got = _unet_call(forked, sample, cond, uncond, kw, cfg, pag_scale=2.0)
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, expect, **TIGHT)
    n0 = 2 if cfg else 1
    fork_block = gkd.layers.block_of(unet, gkd.select_layers(unet, layers)[0])
    blocks = gkd.top_level_blocks(unet)
    for name in blocks:  # the prefix ran with the unperturbed branches only
        want = (n0 if blocks.index(name) < blocks.index(fork_block) else n0 + 1) * 2
        assert seen[name] == [want], (name, seen[name], want)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("block", [0, 2, 3], ids=["first", "middle", "last"])
def test_sd3_fork_equals_full_batch_and_diffusers(block, cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3PAGPipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model = sd3()
    sample, cond, uncond, pooled, neg_pooled = sd3_inputs(batch=1, hw=(16, 12))
    kwargs = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, pooled_projections=pooled,
                  negative_pooled_projections=neg_pooled, guidance_scale=5.0 if cfg else None, pag_scale=3.0)
    t = torch.tensor([600.0])
    with gkd.GuidedDenoiser(model, pag_layers=block, fork=False) as full:
        expect = full(sample, t, **kwargs)
    with gkd.GuidedDenoiser(model, pag_layers=block, fork=True) as forked:
        got = forked(sample, t, **kwargs)
    torch.testing.assert_close(got, expect, **TIGHT)
    pipe = StableDiffusion3PAGPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                       text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                       text_encoder_3=None, tokenizer_3=None, pag_applied_layers=[f"blocks.{block}"])
    pipe._pag_scale, pipe._pag_adaptive_scale = 3.0, 0.0
    # diffusers' regex matching is correct for these ids on a 4-block model
    pipe._set_pag_attn_processor(pag_applied_layers=pipe.pag_applied_layers, do_classifier_free_guidance=cfg)
    embeds = pipe._prepare_perturbed_attention_guidance(cond, uncond, cfg)
    pooled_all = pipe._prepare_perturbed_attention_guidance(pooled, neg_pooled, cfg)
    x = torch.cat([sample] * (3 if cfg else 2))
    noise = model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds,
                  pooled_projections=pooled_all).sample
    model.set_attn_processor(JointAttnProcessor2_0())
    torch.testing.assert_close(got, pipe._apply_perturbed_attention_guidance(noise, cfg, 5.0, 600.0), **TIGHT)


@pytest.mark.parametrize("order", ["pag-first", "seg-first"])
def test_two_branches_fork_at_different_blocks(order):
    unet = unet_sd()
    sample, cond, uncond, kw = unet_inputs(batch=1, hw=(16, 16))
    pag, seg = ("mid", "up_blocks.1") if order == "pag-first" else ("up_blocks.0", "down_blocks.1")
    scales = dict(pag_scale=2.0, seg_scale=1.5)
    with gkd.GuidedDenoiser(unet, pag_layers=pag, seg_layers=seg, seg_sigma=2.0, fork=False) as full:
        expect = _unet_call(full, sample, cond, uncond, kw, True, **scales)
    with gkd.GuidedDenoiser(unet, pag_layers=pag, seg_layers=seg, seg_sigma=2.0, fork=True) as forked:
        seen, handles = _batches_seen(unet, gkd.top_level_blocks(unet))
        got = _unet_call(forked, sample, cond, uncond, kw, True, **scales)
        for h in handles:
            h.remove()
        plan = next(iter(forked._plans.values()))
    torch.testing.assert_close(got, expect, **TIGHT)
    assert plan.kinds[2:] == (("pag", "seg") if order == "pag-first" else ("seg", "pag"))
    sizes = [seen[b][0] for b in gkd.top_level_blocks(unet)]
    assert sizes == sorted(sizes) and sizes[0] == 2 and sizes[-1] == 4 and 3 in sizes


def test_fork_switch_off_runs_everything_from_the_start():
    unet = unet_sd()
    sample, cond, uncond, kw = unet_inputs(batch=1)
    with gkd.GuidedDenoiser(unet, pag_layers="up_blocks.1", fork=False) as den:
        seen, handles = _batches_seen(unet, ["down_blocks.0"])
        _unet_call(den, sample, cond, uncond, kw, True, pag_scale=1.0)
        for h in handles:
            h.remove()
    assert seen["down_blocks.0"] == [3]


def test_compiled_model_retraces_once_per_branch_set():
    """Guidance intervals switch branches on and off: the compiled model traces once per branch set
    ({uncond, cond, pag} and {uncond, cond}), not once per step."""
    import torch._dynamo.testing

    unet = unet_sd()
    sample, cond, uncond, kw = unet_inputs(batch=1)
    den = gkd.GuidedDenoiser(unet, pag_layers="mid", fork=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    den.model = torch.compile(unet, fullgraph=True, backend=counter)
    for step in range(8):
        pag_scale = torch.tensor(3.0 - 0.2 * step) if 2 <= step < 6 else 0.0  # PAG only in an interval
        _unet_call(den, sample, cond, uncond, kw, True, pag_scale=pag_scale)
    assert counter.frame_count == 2, counter.frame_count

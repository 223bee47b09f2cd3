"""GuidedDenoiser on the SD3.5, Flux, Wan, LTX-Video and HunyuanVideo transformers: the one
batched (forked) forward against the per-branch path — the stock model called once per branch,
each perturbed branch with the equivalent diffusers hook where diffusers' is correct, and with
the hook written here where diffusers' is broken:

* PAG: identity attention through a torch-function mode around the layer's own processor that
  adds diffusers' ``PAGJointAttnProcessor2_0`` mask to its SDPA (image↔image: the diagonal only;
  text queries and keys untouched). diffusers' ``skip_attention_scores`` hook cannot serve: it
  makes text tokens identity too, and in 0.42 it fails on every one of these models (missing
  ``is_cross_attention`` / unregistered processors).
* SEG: a hook on ``to_q`` (where diffusers' SmoothedEnergyGuidanceHook sits) blurring the image
  tokens with SEG-SDXL's conv2d kernel per frame, or a conv3d of the outer-product kernel (3-D);
  diffusers' hook swaps its finite / infinite branches (PR 14187) and assumes a square grid.
* SLG / STG-R: SD3's own ``skip_layers``; diffusers' TransformerBlockSkipHook for Wan, LTX and
  HunyuanVideo; a hook returning ``(encoder, hidden)`` for Flux (diffusers' returns them swapped).
* attention skip: a hook returning the attention module's inputs (diffusers' crashes here);
  FF skip: diffusers' FeedForwardSkipHook.

fp32, ≤ 1e-5 relative to the output's magnitude. Grids are non-square and videos have 3 frames.
"""

from __future__ import annotations

import contextlib
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from guidance_kernels import reference as R  # noqa: E402
from guidance_kernels.integrations import diffusers as gkd  # noqa: E402
import tiny_models as tm  # noqa: E402

FACTORIES = {"sd35": tm.sd35, "flux": tm.flux, "wan": tm.wan, "ltx": tm.ltx, "hunyuan_video": tm.hunyuan_video}
VIDEO = ("wan", "ltx", "hunyuan_video")
# Layers per family: PAG, SEG, and the SLG blocks of each skip mode.
LAYERS = {
    "sd35": dict(pag="blocks.1", seg="transformer_blocks.0.attn", slg={"block": [2], "attention": [1], "ff": [0]}),
    "flux": dict(pag="blocks.1", seg="single_transformer_blocks.0",
                 slg={"block": ["single_transformer_blocks.1", 0], "attention": ["transformer_blocks.0",
                                                                                 "single_transformer_blocks.1"],
                      "ff": [1]}),
    "wan": dict(pag="blocks.1", seg="blocks.0", slg={"block": [2], "attention": [1], "ff": [2]}),
    "ltx": dict(pag="blocks.1", seg="blocks.0", slg={"block": [2], "attention": [1], "ff": [0]}),
    "hunyuan_video": dict(pag="blocks.1", seg="single_transformer_blocks.0",
                          slg={"block": ["single_transformer_blocks.1", 0],
                               "attention": ["single_transformer_blocks.0"], "ff": [1]}),
}
SIGMA = 0.8  # kernel 5: inside every cap of the 4x6 token grids
SCALES = dict(guidance_scale=4.0, pag_scale=2.0, seg_scale=1.5, slg_scale=1.25)


@pytest.fixture(scope="module")
def models():
    return {name: make() for name, make in FACTORIES.items()}


def _timestep(family: str, batch: int):
    return torch.tensor([0.7, 0.4][:batch]) if family == "flux" else torch.tensor([700.0, 400.0][:batch])


def _close(got, want, rel=1e-5):
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max |error| {err:.3e} vs max |want| {want.abs().max().item():.3e}"


# --------------------------------------------------------------------------- the per-branch oracles


class IdentityAttention(torch.overrides.TorchFunctionMode):
    """PAG inside the layer's own processor: its SDPA gets diffusers' joint identity mask."""

    def __init__(self, image_tokens: int, text_position: str):
        super().__init__()
        self.image_tokens, self.text_position = image_tokens, text_position

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            kwargs.update({n: a for n, a in zip(names, args)})
            q = kwargs["query"]
            n = q.shape[-2]
            identity = R.joint_identity_mask(self.image_tokens, n - self.image_tokens, self.text_position, q.dtype,
                                             q.device)
            mask = kwargs.get("attn_mask")
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            kwargs["attn_mask"] = identity if mask is None else mask + identity
            return func(**kwargs)
        return func(*args, **kwargs)


def _seg_blur(x, grid, sigma, blur):
    """SEG-SDXL's blur of (B, T·H·W, C) image tokens: conv2d per frame, or conv3d (3-D)."""
    t, h, w = grid
    b, n, c = x.shape
    vol = x.transpose(1, 2).reshape(b, c, t, h, w)
    if sigma > R.SEG_INF_SIGMA:
        dims = (2, 3, 4) if blur == "3d" else (3, 4)
        return vol.mean(dims, keepdim=True).expand_as(vol).reshape(b, c, n).transpose(1, 2)
    k = R.seg_kernel_size(sigma)
    if blur == "frame":
        frames = vol.transpose(1, 2).reshape(b * t, c, h, w)
        out = R.gaussian_blur_2d(frames, k, sigma).reshape(b, t, c, h, w).transpose(1, 2)
    else:
        kt = min(k, t - (t % 2 - 1))
        wt, ws = R.gaussian_kernel_1d(kt, sigma), R.gaussian_kernel_1d(k, sigma)
        kernel = (wt[:, None, None] * ws[None, :, None] * ws[None, None, :]).to(x.dtype)
        padded = F.pad(vol, (k // 2, k // 2, k // 2, k // 2, kt // 2, kt // 2), mode="reflect")
        out = F.conv3d(padded, kernel.expand(c, 1, *kernel.shape), groups=c)
    return out.reshape(b, c, n).transpose(1, 2)


def _image_slice(family, layer, grid, text):
    """The image tokens of ``to_q``'s output (single-stream blocks project text and image together)."""
    single = "single" in layer
    if family == "flux" and single:
        return slice(text, None)
    if family == "hunyuan_video" and single:
        return slice(0, math.prod(grid))
    return slice(None)


@contextlib.contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def perturbed(model, family, kind, layers, grid, text, *, sigma=SIGMA, blur="frame", skip="block"):
    """Hooks making one plain model call the ``kind`` branch (see the module docstring); returns
    (context manager, extra model kwargs)."""
    from diffusers.hooks import HookRegistry, LayerSkipConfig
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook

    attention = gkd.self_attention_layers(model)
    handles = []
    if kind == "pag":
        position = "before" if family == "flux" else "after"
        for name in gkd.select_layers(model, layers):
            mode = IdentityAttention(math.prod(grid), position)
            handles.append(attention[name].register_forward_pre_hook(lambda *a, m=mode: m.__enter__() and None))
            handles.append(attention[name].register_forward_hook(lambda *a, m=mode: m.__exit__(None, None, None)))
        return _hooks(handles), {}
    if kind == "seg":
        for name in gkd.select_layers(model, layers):
            image = _image_slice(family, name, grid, text)

            def blur_q(module, args, out, image=image):
                out = out.clone()
                out[:, image] = _seg_blur(out[:, image], grid, sigma, blur)
                return out

            handles.append(attention[name].to_q.register_forward_hook(blur_q))
        return _hooks(handles), {}
    blocks = gkd.select_blocks(model, layers)
    if skip == "block" and family == "sd35":
        return contextlib.nullcontext(), {"skip_layers": [int(b.rsplit(".", 1)[1]) for b in blocks]}
    if skip == "attention" or (skip == "block" and family == "flux"):
        for block in blocks:
            targets = [block] if skip == "block" else [n for n in attention if n.startswith(block + ".")]
            for name in targets:
                def passthrough(module, args, kwargs, out, block_skip=skip == "block"):
                    hidden = kwargs.get("hidden_states", args[0] if args else None)
                    encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                    if block_skip:  # Flux blocks return (encoder, hidden)
                        return encoder, hidden
                    return (hidden, encoder) if isinstance(out, tuple) else hidden

                handles.append(model.get_submodule(name).register_forward_hook(passthrough, with_kwargs=True))
        return _hooks(handles), {}
    # diffusers' own hooks: whole-block skip (Wan, LTX, HunyuanVideo) and feed-forward skip
    registry_names = []
    for i, block in enumerate(blocks):
        fqn, index = block.rsplit(".", 1)
        config = LayerSkipConfig([int(index)], fqn=fqn, skip_attention=skip == "block", skip_ff=True)
        _apply_layer_skip_hook(model, config, name=f"oracle{i}")
        registry_names.append(f"oracle{i}")

    @contextlib.contextmanager
    def remove():
        try:
            yield
        finally:
            registry = HookRegistry.check_if_exists_or_initialize(model)
            for n in registry_names:
                registry.remove_hook(n, recurse=True)

    return remove(), {}


def per_branch(model, family, sample, t, cond, uncond, kw, grid, *, cfg=True, pag=None, seg=None, slg=None,
               sigma=SIGMA, blur="frame", skip="block", scales=SCALES):
    """The guided prediction from one stock model call per branch, combined as diffusers does."""
    text = cond["encoder_hidden_states"].shape[1]

    def call(inputs, extra=None):
        return model(**{"hidden_states": sample, "timestep": t, **inputs, **kw, **(extra or {})}, return_dict=False)[0]

    c = call(cond)
    out = c
    if cfg:
        u = call(uncond)
        out = u + scales["guidance_scale"] * (c - u)
    for kind, layers, scale in (("pag", pag, "pag_scale"), ("seg", seg, "seg_scale"), ("slg", slg, "slg_scale")):
        if layers is None:
            continue
        context, extra = perturbed(model, family, kind, layers, grid, text, sigma=sigma, blur=blur, skip=skip)
        with context:
            p = call(cond, extra)
        out = out + scales[scale] * (c - p)
    return out


def guided(model, family, sample, t, cond, uncond, kw, *, cfg=True, pag=None, seg=None, slg=None, sigma=SIGMA,
           blur="frame", skip="block", fork=True, per_branch_calls=False, scales=SCALES):
    options = dict(pag_layers=pag, seg_layers=seg, slg_layers=slg, slg_skip=skip, seg_sigma=sigma, seg_blur=blur,
                   fork=fork, per_branch=per_branch_calls)
    call = dict(guidance_scale=scales["guidance_scale"] if cfg else None,
                pag_scale=scales["pag_scale"] if pag else 0.0, seg_scale=scales["seg_scale"] if seg else 0.0,
                slg_scale=scales["slg_scale"] if slg else 0.0)
    negative = {f"negative_{k}": v for k, v in uncond.items()} if cfg else {}
    with gkd.GuidedDenoiser(model, **options) as den:
        return den(sample, t, **cond, **negative, model_kwargs=kw, **call)


# --------------------------------------------------------------------------- one forward vs per branch

CASES = {
    "cfg+pag": dict(pag=True),
    "cfg+seg (no fork)": dict(seg=True, fork=False),
    "cfg+seg inf": dict(seg=True, sigma=9999999.0),
    "cfg+slg": dict(slg="block"),
    "cfg+pag+seg+slg": dict(pag=True, seg=True, slg="block"),
    "cfg+pag+seg+slg (no fork)": dict(pag=True, seg=True, slg="block", fork=False),
    "pag+slg (no cfg)": dict(pag=True, slg="block", cfg=False),
    "cfg+slg attention": dict(slg="attention"),
    "cfg+slg ff": dict(slg="ff"),
}
VIDEO_CASES = {
    "stg-r+seg 3d": dict(slg="block", seg=True, blur="3d"),
    "stg-a+seg 3d inf": dict(slg="attention", seg=True, blur="3d", sigma=9999999.0),
}


def _run_case(models, family, case):
    model = models[family]
    layers = LAYERS[family]
    sample, cond, uncond, kw, grid = tm.dit_inputs(family, batch=2)
    t = _timestep(family, 2)
    skip = case.get("slg") or "block"
    chosen = dict(pag=layers["pag"] if case.get("pag") else None, seg=layers["seg"] if case.get("seg") else None,
                  slg=layers["slg"][skip] if case.get("slg") else None)
    common = dict(cfg=case.get("cfg", True), sigma=case.get("sigma", SIGMA), blur=case.get("blur", "frame"), skip=skip,
                  **chosen)
    got = guided(model, family, sample, t, cond, uncond, kw, fork=case.get("fork", True), **common)
    want = per_branch(model, family, sample, t, cond, uncond, kw, grid, **common)
    _close(got, want)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", list(FACTORIES))
def test_one_forward_matches_the_per_branch_path(models, family, case):
    _run_case(models, family, CASES[case])


@pytest.mark.parametrize("case", list(VIDEO_CASES))
@pytest.mark.parametrize("family", VIDEO)
def test_video_stg_and_3d_seg_match_the_per_branch_path(models, family, case):
    _run_case(models, family, VIDEO_CASES[case])


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_per_branch_mode_equals_the_one_forward(models, family):
    model = models[family]
    sample, cond, uncond, kw, _ = tm.dit_inputs(family, batch=2)
    t = _timestep(family, 2)
    layers = dict(pag=LAYERS[family]["pag"], seg=LAYERS[family]["seg"], slg=LAYERS[family]["slg"]["block"])
    one = guided(model, family, sample, t, cond, uncond, kw, **layers)
    each = guided(model, family, sample, t, cond, uncond, kw, per_branch_calls=True, **layers)
    _close(each, one)


def test_wan_image_conditioning_passes_through_every_branch():
    model = tm.wan(image=True)
    sample, cond, uncond, kw, grid = tm.dit_inputs("wan_i2v", batch=1, hw=(4, 6), frames=2)
    t = _timestep("wan", 1)
    common = dict(pag="blocks.1", slg=[2])
    got = guided(model, "wan", sample, t, cond, uncond, kw, **common)
    _close(got, per_branch(model, "wan", sample, t, cond, uncond, kw, grid, **common))


# --------------------------------------------------------------------------- forking


def _rows_seen(model, blocks):
    seen = {}

    def record(module, args, kwargs, name):
        seen.setdefault(name, []).append((args[0] if args else kwargs["hidden_states"]).shape[0])

    handles = [model.get_submodule(b).register_forward_pre_hook(
        lambda m, a, k, name=b: record(m, a, k, name), with_kwargs=True) for b in blocks]
    return seen, handles


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_branches_join_at_their_first_perturbed_block(models, family):
    """Flux / HunyuanVideo: a PAG branch joining in the single-stream blocks and an SLG branch
    skipping the second double-stream block: the double-stream prefix runs [uncond, cond] only."""
    model = models[family]
    sample, cond, uncond, kw, _ = tm.dit_inputs(family, batch=1)
    negative = {f"negative_{k}": v for k, v in uncond.items()}
    blocks = gkd.top_level_blocks(model)
    with gkd.GuidedDenoiser(model, pag_layers="single_transformer_blocks.1", slg_layers=1) as den:
        seen, handles = _rows_seen(model, blocks)
        with _hooks(handles):
            den(sample, _timestep(family, 1), **cond, **negative, model_kwargs=kw, guidance_scale=4.0, pag_scale=2.0,
                slg_scale=1.0)
        plan = next(iter(den._plans.values()))
    assert plan.kinds == ("uncond", "cond", "slg", "pag")
    # double 0: 2 rows; double 1: slg joins but skips it (still 2 computed); single 0: 3; single 1: pag joins
    assert [seen[b] for b in blocks] == [[2], [2], [3], [4]], seen


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_compiled_dit_compiles_once_while_scales_change(family):
    import torch._dynamo.testing

    model = FACTORIES[family]()
    sample, cond, uncond, kw, _ = tm.dit_inputs(family, batch=1)
    negative = {f"negative_{k}": v for k, v in uncond.items()}
    layers = LAYERS[family]
    options = dict(pag_layers=layers["pag"], seg_layers=layers["seg"], slg_layers=layers["slg"]["block"],
                   seg_sigma=SIGMA)
    den = gkd.GuidedDenoiser(model, **options)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    den.model = torch.compile(model, fullgraph=True, backend=counter)
    eager = gkd.GuidedDenoiser(FACTORIES[family](), **options)
    for step in range(3):
        scales = {k: torch.tensor(v + 0.25 * step) for k, v in SCALES.items()}
        t = _timestep(family, 1) * (1 - 0.2 * step)
        args = dict(**cond, **negative, model_kwargs=kw, **scales)
        _close(den(sample, t, **args), eager(sample, t, **args))
    assert counter.frame_count == 1, counter.frame_count


# --------------------------------------------------------------------------- bad input


def _denoise(den, family, **overrides):
    sample, cond, uncond, kw, _ = tm.dit_inputs(family, batch=1)
    args = dict(**cond, **{f"negative_{k}": v for k, v in uncond.items()}, model_kwargs=kw, guidance_scale=4.0)
    args.update(overrides)
    return den(args.pop("sample", sample), args.pop("timestep", _timestep(family, 1)), **args)


def test_bad_models_layers_and_perturbations_are_named(models):
    with pytest.raises(TypeError, match=r"GuidedDenoiser: model: Linear is not a supported diffusers model "
                                        r"\(supported: UNet2DConditionModel, SD3Transformer2DModel, .*Hunyuan"):
        gkd.GuidedDenoiser(torch.nn.Linear(2, 2))
    wan, flux = models["wan"], models["flux"]
    with pytest.raises(ValueError, match=r"GuidedDenoiser: pag_layers: layer selector 'blocks.7' matches no "
                                         r"self-attention layer .*layers: blocks.0.attn1"):
        gkd.GuidedDenoiser(wan, pag_layers="blocks.7")
    with pytest.raises(ValueError, match="GuidedDenoiser: seg_layers: blocks.0.attn2 is a cross-attention layer"):
        gkd.GuidedDenoiser(wan, seg_layers="blocks.0.attn2")
    with pytest.raises(ValueError, match=r"GuidedDenoiser: slg_layers: single_transformer_blocks.0 "
                                         r"\(FluxSingleTransformerBlock\) has no feed-forward"):
        gkd.GuidedDenoiser(flux, slg_layers="single_transformer_blocks", slg_skip="ff")
    with pytest.raises(ValueError, match="GuidedDenoiser: slg_layers: block selector 'blocks.1.attn1' names a module "
                                         "inside block blocks.1"):
        gkd.GuidedDenoiser(wan, slg_layers="blocks.1.attn1")
    with pytest.raises(ValueError, match="GuidedDenoiser: slg_layers: block selector 9 matches no block"):
        gkd.GuidedDenoiser(wan, slg_layers=9)
    with pytest.raises(ValueError, match=r"GuidedDenoiser: slg_skip: must be one of \('block', 'attention', 'ff'\)"):
        gkd.GuidedDenoiser(wan, slg_layers=1, slg_skip="residual")
    with pytest.raises(ValueError, match=r"GuidedDenoiser: seg_blur: must be one of \('frame', '3d'\)"):
        gkd.GuidedDenoiser(wan, seg_blur="2d")
    with pytest.raises(ValueError, match="GuidedDenoiser: slg_layers: layer skips need a transformer"):
        gkd.GuidedDenoiser(tm.unet_sd(), slg_layers=0)


def test_bad_call_arguments_are_named(models):
    wan, sd35 = models["wan"], models["sd35"]
    with gkd.GuidedDenoiser(wan, slg_layers=None) as den:
        with pytest.raises(ValueError, match=r"GuidedDenoiser: sample: the latent \(T, H, W\) = \(3, 7, 12\) is not "
                                             r"divisible by WanTransformer3DModel's patch size \(1, 2, 2\)"):
            _denoise(den, "wan", sample=torch.randn(1, 4, 3, 7, 12))
        with pytest.raises(ValueError, match=r"GuidedDenoiser: sample: WanTransformer3DModel takes \(B, C, T, H, W\)"):
            _denoise(den, "wan", sample=torch.randn(1, 4, 8, 12))
        with pytest.raises(ValueError, match="GuidedDenoiser: slg_scale: SLG needs blocks to skip"):
            _denoise(den, "wan", slg_scale=1.0)
        with pytest.raises(ValueError, match="GuidedDenoiser: pooled_projections: WanTransformer3DModel takes no "
                                             "pooled_projections"):
            _denoise(den, "wan", pooled_projections=torch.randn(1, 8))
        with pytest.raises(ValueError, match=r"GuidedDenoiser: negative_encoder_hidden_states: shape \(1, 7, 16\) "
                                             r"differs from encoder_hidden_states \(1, 5, 16\)"):
            _denoise(den, "wan", negative_encoder_hidden_states=torch.randn(1, 7, 16))
        with pytest.raises(ValueError, match="GuidedDenoiser: timestep: batch 3 differs from sample's 1"):
            _denoise(den, "wan", timestep=torch.tensor([1.0, 2.0, 3.0]))
    with gkd.GuidedDenoiser(sd35) as den:
        with pytest.raises(ValueError, match="GuidedDenoiser: pooled_projections: required by SD3Transformer2DModel"):
            _denoise(den, "sd35", pooled_projections=None)
        with pytest.raises(ValueError, match="GuidedDenoiser: negative_pooled_projections: required for CFG"):
            _denoise(den, "sd35", negative_pooled_projections=None)
    with gkd.GuidedDenoiser(models["ltx"], seg_layers="blocks.0") as den:
        _, _, _, kw, _ = tm.dit_inputs("ltx")
        with pytest.raises(ValueError, match="GuidedDenoiser: model_kwargs: LTXVideoTransformer3DModel needs "
                                             "num_frames, height and width"):
            _denoise(den, "ltx", seg_scale=1.0, model_kwargs={k: v for k, v in kw.items() if k != "height"})
    with gkd.GuidedDenoiser(models["flux"], seg_layers="blocks.0") as den:
        with pytest.raises(ValueError, match=r"GuidedDenoiser: token_grid: the grid \(1, 5, 5\) has 25 tokens but "
                                             r"sample has 24"):
            _denoise(den, "flux", seg_scale=1.0, token_grid=(5, 5))


# --------------------------------------------------------------------------- benchmark cases


def test_dit_bench_cases_run_on_cpu():
    """The benchmark family's cases build on the CPU (tiny Wan), their FLOP limits order as the fork
    predicts, and every guided provider of a case computes the same step."""
    from guidance_kernels.bench import cases_dit

    flux, wan = cases_dit._specs(gpu=False)
    assert flux.cls == "FluxTransformer2DModel" and wan.cls == "WanTransformer3DModel"
    cases = cases_dit._spec_cases(wan, torch.device("cpu"), torch.float32)
    assert [c.name.split(" (")[0] for c in cases] == ["Wan tiny CFG+PAG blocks.2", "Wan tiny CFG+SEG inf blocks.2",
                                                      "Wan tiny CFG+SLG [2]", "Wan tiny CFG+PAG+SEG+SLG"]
    limits = [float(c.name.rsplit("limit ", 1)[1].split("x")[0]) for c in cases]
    assert all(1.0 < x < 1.5 for x in limits[:3]) and 1.5 < limits[3] < 2.5, limits
    outputs = {p.name: p.fn() for p in cases[-1].providers}
    guided = [v for k, v in outputs.items() if k != "CFG-only step"]
    for out in guided[1:]:
        _close(out, guided[0])


def test_video_example_runs_and_both_paths_agree(capsys, monkeypatch):
    example = Path(__file__).resolve().parents[1] / "examples" / "guided_video_sampling.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--steps", "2", "--frames", "2", "--size", "8", "--device", "cpu"])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"one forward \(forked\)\s+[\d.]+ ms/step", out), out
    assert re.search(r"one call per branch .*\s[\d.]+ ms/step", out), out
    diff = float(re.search(r"max \|difference\| of the final latents: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-4, out  # fp32: one batched forward equals one call per branch

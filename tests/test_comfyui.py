"""The ComfyUI nodes against the stock nodes, on the real ComfyUI sampler with tiny models built in code.

Each test samples a few steps with the stock node(s) and with ours on the same model, seed and
sampler, and compares the latents (fp32, ≤ 1e-5 relative) and the diffusion-model calls per step.
SEG has no stock node: its reference is the community node's method (one extra call per step with
blurred queries) written out here. ComfyUI is a test dependency that only some environments can
import (it needs torchvision); elsewhere this module is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from guidance_kernels.integrations.comfyui import tiny

try:
    comfy = tiny.import_comfy()
except ImportError as exc:  # e.g. no torchvision build for this torch
    pytest.skip(f"ComfyUI cannot be imported here: {exc}", allow_module_level=True)

import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from comfy.ldm.modules.attention import optimized_attention  # noqa: E402
from comfy_extras.nodes import (  # noqa: E402
    nodes_apg,
    nodes_cfg,
    nodes_mahiro,
    nodes_model_advanced,
    nodes_pag,
    nodes_sag,
    nodes_slg,
    nodes_tcfg,
)

import guidance_kernels as gk  # noqa: E402
from guidance_kernels.integrations.comfyui import batch, nodes  # noqa: E402

WrappersMP = comfy.patcher_extension.WrappersMP
TOLERANCE = 1e-5
STEPS = 3
SIZE = (12, 12)  # latent; the middle block sees 6x6 tokens


class Calls:
    """Counts diffusion-model forwards (``apply_model``: one per batched model call)."""

    def __init__(self):
        self.count = 0

    def __call__(self, executor, *args, **kwargs):
        self.count += 1
        return executor(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models():
    built = {}

    def get(kind):
        if kind not in built:
            patcher = tiny.build(kind)
            calls = Calls()
            patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test-calls", calls)
            built[kind] = (patcher, calls)
        return built[kind]

    return get


def sample(patcher, calls, kind, *, steps=STEPS, cfg=5.0, size=SIZE, sampler="euler", batch_size=1):
    positive, negative = tiny.conditioning(kind, batch=batch_size)
    noise = tiny.latent_noise(kind, *size, batch=batch_size)
    calls.count = 0
    out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, "normal", positive, negative, torch.zeros_like(noise),
                              disable_pbar=True, seed=0)
    return out, calls.count / steps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same(ours, stock, *, effect_over=None):
    assert torch.isfinite(ours).all()
    err = rel_err(ours, stock)
    assert err <= TOLERANCE, f"relative difference {err:.2e} > {TOLERANCE:g}"
    if effect_over is not None:  # the guidance must have changed something: the test would be vacuous otherwise
        assert rel_err(stock, effect_over) > 1e-3


def run(node, *args):
    return node.execute(*args).result[0]


# --------------------------------------------------------------------------- references without a stock node


def add_term(args, perturbed, scale):
    return args["denoised"] + (args["cond_denoised"] - perturbed) * scale


def separate_call_guidance(model, patch, keys, scale, *, kind="attn1", low=-math.inf, high=math.inf, finish=add_term,
                           disable_cfg1=False):
    """The stock nodes' structure: a post-CFG function that runs one more model call on ``[cond]`` with
    ``patch`` at ``keys`` and adds ``scale·(cond − that)`` (or ``finish``); active for ``low < σ ≤ high``."""
    m = model.clone()

    def post_cfg(args):
        if not low < float(args["sigma"][0]) <= high:
            return args["denoised"]
        options = args["model_options"]
        for key in keys:
            options = comfy.model_patcher.set_model_options_patch_replace(dict(options), patch, kind, *key)
        (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                      options)
        return finish(args, perturbed, scale)

    m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1)
    return m


def community_rescale(mode, rescale):
    """The community PAG/SEG node's ``rescale_guidance`` (per-sample std over (1, 2, 3))."""

    def finish(args, perturbed, scale):
        cond, denoised = args["cond_denoised"], args["denoised"]
        term = (cond - perturbed) * scale
        result = (denoised if mode == "full" else cond) + term
        std = lambda t: torch.std(t, dim=(1, 2, 3), keepdim=True)  # noqa: E731
        return denoised + term * (rescale * std(cond) / std(result) + (1.0 - rescale))

    return finish


def community_snf(args, perturbed, scale):
    """The community node's "snf" mode: per element the larger 3x3-blurred softmax saliency wins."""
    cond, uncond, denoised = args["cond_denoised"], args["uncond_denoised"], args["denoised"]
    term = (cond - perturbed) * scale
    if not uncond.any():
        return denoised + term
    cfg_term = denoised - uncond
    b, c, h, w = cfg_term.shape
    x = torch.linspace(-1, 1, 3)
    weights = torch.exp(-0.5 * x ** 2)
    kernel = torch.outer(weights / weights.sum(), weights / weights.sum()).expand(c, 1, 3, 3)

    def saliency(t):
        blurred = F.conv2d(F.pad(t.abs(), [1] * 4, mode="reflect"), kernel, groups=c)
        return torch.softmax(blurred.reshape(b * c, h * w), dim=1).reshape(b, c, h, w)

    pick = torch.stack([saliency(cfg_term), saliency(term)]).argmax(dim=0)
    return uncond + torch.where(pick == 1, term, cfg_term)


def identity_attention(q, k, v, extra_options, mask=None):
    return v


def seg_attention(sigma):
    """The community SEG node's attention: queries blurred over the latent-shaped grid (a k×k
    depthwise conv, reflect padding, kernel capped by the width), or their mean for σ < 0."""

    def attention(q, k, v, extra_options, mask=None):
        b, n, c = q.shape
        h, w = extra_options["original_shape"][2:4]
        scale = round(math.sqrt(h * w / n))
        image = q.permute(0, 2, 1).reshape(b, c, h // scale, w // scale)
        if sigma < 0:
            image = image.mean(dim=(-2, -1), keepdim=True).expand_as(image)
        else:
            size = min(math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2, image.shape[-1] - (image.shape[-1] % 2 - 1))
            x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size)
            weights = torch.exp(-0.5 * (x / sigma) ** 2)
            weights = (weights / weights.sum()).to(q.dtype)
            kernel = torch.outer(weights, weights).expand(c, 1, size, size)
            image = F.conv2d(F.pad(image, [size // 2] * 4, mode="reflect"), kernel, groups=c)
        blurred = image.reshape(b, c, n).permute(0, 2, 1)
        return optimized_attention(blurred, k, v, extra_options["n_heads"])

    return attention


# --------------------------------------------------------------------------- the nodes against the stock ones


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_pag_one_call_matches_stock(models, kind):
    model, calls = models(kind)
    base, _ = sample(model, calls, kind)
    stock, stock_calls = sample(run(nodes_pag.PerturbedAttentionGuidance, model, 3.0), calls, kind)
    ours, our_calls = sample(run(nodes.PerturbedAttentionGuidance, model, 3.0), calls, kind)
    assert (stock_calls, our_calls) == (2, 1)
    assert_same(ours, stock, effect_over=base)


@pytest.mark.parametrize("kind,size", [("sd15", SIZE), ("sdxl", (12, 16))])
def test_sag_matches_stock(models, kind, size):
    model, calls = models(kind)
    base, _ = sample(model, calls, kind, size=size)
    stock, stock_calls = sample(run(nodes_sag.SelfAttentionGuidance, model, 0.5, 2.0), calls, kind, size=size)
    ours, our_calls = sample(run(nodes.SelfAttentionGuidance, model, 0.5, 2.0), calls, kind, size=size)
    assert (stock_calls, our_calls) == (2, 2)  # SAG's degraded input needs this step's uncond: a second call
    assert_same(ours, stock, effect_over=base)


def test_sag_skips_blur_sigma_zero_and_small_latents(models):
    model, calls = models("sd15")
    ours, our_calls = sample(run(nodes.SelfAttentionGuidance, model, 0.5, 0.0), calls, "sd15")
    # The stock node's σ = 0 blur weights are 0/0 (NaN); ours takes the σ → 0 limit: no term, no call.
    assert our_calls == 1 and torch.isfinite(ours).all()
    small, small_calls = sample(run(nodes.SelfAttentionGuidance, model, 0.5, 2.0), calls, "sd15", size=(4, 6))
    assert small_calls == 1 and torch.isfinite(small).all()  # min(H, W) <= 4: skipped, as the stock node


@pytest.mark.parametrize("sigma", [-1.0, 2.0])
def test_seg_one_call_matches_community_method(models, sigma):
    model, calls = models("sd15")
    base, _ = sample(model, calls, "sd15")
    reference, ref_calls = sample(separate_call_guidance(model, seg_attention(sigma), [("middle", 0)], 3.0), calls,
                                  "sd15")
    ours, our_calls = sample(run(nodes.SmoothedEnergyGuidance, model, 3.0, sigma, "middle", 0, -1.0, -1.0, 0.0,
                                 "full"), calls, "sd15")
    assert (ref_calls, our_calls) == (2, 1)
    assert_same(ours, reference, effect_over=base)


@pytest.mark.parametrize("mode,rescale", [("full", 0.7), ("partial", 0.4), ("snf", 0.0)])
def test_seg_rescale_modes(models, mode, rescale):
    model, calls = models("sd15")
    finish = community_snf if mode == "snf" else community_rescale(mode, rescale)
    reference, _ = sample(separate_call_guidance(model, seg_attention(4.0), [("middle", 0)], 3.0, finish=finish,
                                                 disable_cfg1=mode == "snf"), calls, "sd15")
    ours, our_calls = sample(run(nodes.SmoothedEnergyGuidance, model, 3.0, 4.0, "middle", 0, -1.0, -1.0, rescale, mode),
                             calls, "sd15")
    assert our_calls == 1
    assert_same(ours, reference)


def test_pag_with_cfg_1_runs_one_batch_of_cond_and_perturbed(models):
    model, calls = models("sd15")
    stock, stock_calls = sample(run(nodes_pag.PerturbedAttentionGuidance, model, 3.0), calls, "sd15", cfg=1.0)
    ours, our_calls = sample(run(nodes.PerturbedAttentionGuidance, model, 3.0), calls, "sd15", cfg=1.0)
    assert (stock_calls, our_calls) == (2, 1)  # ComfyUI skips uncond at CFG 1: [cond, PAG] is the one call
    assert_same(ours, stock)


def test_seg_sigma_window_and_block_list(models):
    model, calls = models("sdxl")
    high, low = 5.0, 0.5  # the normal schedule's sigmas here: 14.6, 1.62, 0.03 (then 0): one step in three
    keys = [("output", 1, 0), ("middle", 0, 1)]
    reference, ref_calls = sample(separate_call_guidance(model, seg_attention(1.0), keys, 2.0, low=low, high=high),
                                  calls, "sdxl")
    ours, our_calls = sample(run(nodes.SmoothedEnergyGuidance, model, 2.0, 1.0, "middle", 0, high, low, 0.0, "full",
                                 "u1.0, m0.1"), calls, "sdxl")
    assert (ref_calls, our_calls) == (pytest.approx(4 / 3), 1)
    assert_same(ours, reference)


@pytest.mark.parametrize("kind,double,single,cfg", [("sd3", "1", "", 4.0), ("flux", "", "1, 2", 1.0)])
def test_slg_one_call_matches_stock(models, kind, double, single, cfg):
    model, calls = models(kind)
    args = (model, 3.0, 0.0, 0.6, double, single)  # scale, start_percent, end_percent, layers
    stock, stock_calls = sample(run(nodes_slg.SkipLayerGuidanceDiT, *args, 0.5), calls, kind, cfg=cfg)
    ours, our_calls = sample(run(nodes.SkipLayerGuidanceDiT, *args, 0.5), calls, kind, cfg=cfg)
    assert our_calls == 1 and stock_calls > 1
    assert_same(ours, stock)


@pytest.mark.parametrize("name", ["apg", "apg_momentum", "cfg_zero_star", "cfg_norm", "tcfg", "mahiro", "rescale_cfg"])
def test_combine_nodes_match_stock(models, name):
    stock_node, our_node, args = {
        "apg": (nodes_apg.APG, nodes.AdaptiveProjectedGuidance, (1.0, 5.0, 0.0)),
        "apg_momentum": (nodes_apg.APG, nodes.AdaptiveProjectedGuidance, (0.5, 2.0, -0.5)),
        "cfg_zero_star": (nodes_cfg.CFGZeroStar, nodes.CFGZeroStar, ()),
        "cfg_norm": (nodes_cfg.CFGNorm, nodes.CFGNorm, (0.9,)),
        "tcfg": (nodes_tcfg.TCFG, nodes.TCFG, ()),
        "mahiro": (nodes_mahiro.Mahiro, nodes.Mahiro, ()),
        "rescale_cfg": (None, nodes.RescaleCFG, (0.7,)),
    }[name]
    model, calls = models("sd15")
    base, _ = sample(model, calls, "sd15")
    stock_model = nodes_model_advanced.RescaleCFG().patch(model, *args)[0] if stock_node is None \
        else run(stock_node, model, *args)
    stock, stock_calls = sample(stock_model, calls, "sd15")
    ours, our_calls = sample(run(our_node, model, *args), calls, "sd15")
    assert stock_calls == our_calls == 1
    assert_same(ours, stock, effect_over=base)


# --------------------------------------------------------------------------- combinations, stacking


def test_pag_and_sag(models):
    model, calls = models("sd15")
    # Stock PAG + stock SAG: SAG's patch at ("middle", 0, 0) shadows PAG's ("middle", 0) in the PAG call,
    # so its PAG is not perturbed there. The reference is the two methods as each is meant.
    stock_sag = run(nodes_sag.SelfAttentionGuidance, model, 0.5, 2.0)
    reference, ref_calls = sample(separate_call_guidance(stock_sag, identity_attention,
                                                         [("middle", 0), ("middle", 0, 0)], 3.0), calls, "sd15")
    ours_model = run(nodes.PerturbedAttentionGuidance, run(nodes.SelfAttentionGuidance, model, 0.5, 2.0), 3.0)
    ours, our_calls = sample(ours_model, calls, "sd15")
    assert (ref_calls, our_calls) == (3, 2)
    assert_same(ours, reference)
    # the stock pair's PAG does nothing here (one middle transformer, shadowed): it equals SAG alone
    stock_pair, _ = sample(run(nodes_pag.PerturbedAttentionGuidance, stock_sag, 3.0), calls, "sd15")
    stock_sag_alone, _ = sample(stock_sag, calls, "sd15")
    assert rel_err(stock_pair, stock_sag_alone) <= TOLERANCE
    # Ours stacked on the stock SAG node: our branch rides in the main call, the stock SAG patch serves
    # the other chunks (and records the uncond attention) as the previous patch.
    mixed, mixed_calls = sample(run(nodes.PerturbedAttentionGuidance, stock_sag, 3.0), calls, "sd15")
    assert mixed_calls == 2
    assert_same(mixed, reference)


def foreign_attention(rows: list):
    """Another node's attn1 replace patch (plain attention), counting the batch rows it serves."""

    def attention(q, k, v, extra_options):
        rows.append(q.shape[0])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    return attention


@pytest.mark.parametrize("name", ["pag", "sag", "pag+sag"])
def test_a_foreign_patch_keeps_serving_the_chunks_we_do_not_perturb(models, name):
    model, calls = models("sd15")
    apply = {"pag": lambda m: run(nodes.PerturbedAttentionGuidance, m, 3.0),
             "sag": lambda m: run(nodes.SelfAttentionGuidance, m, 0.5, 2.0),
             "pag+sag": lambda m: run(nodes.PerturbedAttentionGuidance, run(nodes.SelfAttentionGuidance, m, 0.5, 2.0),
                                      3.0)}[name]
    alone, _ = sample(apply(model), calls, "sd15")
    rows = []
    patched = model.clone()
    patched.set_model_attn1_replace(foreign_attention(rows), "middle", 0)
    ours, _ = sample(apply(patched), calls, "sd15")
    # per step: cond and uncond in the batched call, uncond again in SAG's degraded call
    assert sum(rows) == STEPS * (2 + ("sag" in name))
    assert_same(ours, alone)


def test_pag_and_apg(models):
    model, calls = models("sd15")
    stock, stock_calls = sample(run(nodes_pag.PerturbedAttentionGuidance, run(nodes_apg.APG, model, 1.0, 5.0, 0.0), 3.0),
                                calls, "sd15")
    ours, our_calls = sample(run(nodes.PerturbedAttentionGuidance,
                                 run(nodes.AdaptiveProjectedGuidance, model, 1.0, 5.0, 0.0), 3.0), calls, "sd15")
    assert (stock_calls, our_calls) == (2, 1)
    assert_same(ours, stock)


def test_slg_and_cfg_zero_star(models):
    model, calls = models("sd3")
    stock_model = run(nodes_cfg.CFGZeroStar, run(nodes_slg.SkipLayerGuidanceDiT, model, 3.0, 0.0, 1.0, "1", "", 0.0))
    ours_model = run(nodes.CFGZeroStar, run(nodes.SkipLayerGuidanceDiT, model, 3.0, 0.0, 1.0, "1", "", 0.0))
    stock, stock_calls = sample(stock_model, calls, "sd3")
    ours, our_calls = sample(ours_model, calls, "sd3")
    assert (stock_calls, our_calls) == (2, 1)
    assert_same(ours, stock)


def test_pag_and_seg_share_one_call_and_one_attention_patch(models):
    model, calls = models("sd15")
    stock_pag = run(nodes_pag.PerturbedAttentionGuidance, model, 2.0)
    reference, ref_calls = sample(separate_call_guidance(stock_pag, seg_attention(-1.0), [("middle", 0)], 3.0),
                                  calls, "sd15")
    ours_model = run(nodes.SmoothedEnergyGuidance, run(nodes.PerturbedAttentionGuidance, model, 2.0), 3.0, -1.0,
                     "middle", 0, -1.0, -1.0, 0.0, "full")
    ours, our_calls = sample(ours_model, calls, "sd15")
    assert (ref_calls, our_calls) == (3, 1)
    assert_same(ours, reference)


# --------------------------------------------------------------------------- memory pressure, fallbacks


def test_results_stay_right_when_comfy_splits_the_batch(models, monkeypatch):
    model, calls = models("sd15")
    pag_sag = run(nodes.PerturbedAttentionGuidance, run(nodes.SelfAttentionGuidance, model, 0.5, 2.0), 3.0)
    whole, _ = sample(pag_sag, calls, "sd15")
    stock_pag, _ = sample(run(nodes_pag.PerturbedAttentionGuidance, model, 3.0), calls, "sd15")
    # No free memory: ComfyUI runs one chunk per model call.
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, device: 0)
    split, split_calls = sample(pag_sag, calls, "sd15")
    assert split_calls == 4  # cond, uncond and the PAG branch one by one, then the SAG call
    assert_same(split, whole)
    pag, pag_calls = sample(run(nodes.PerturbedAttentionGuidance, model, 3.0), calls, "sd15")
    assert pag_calls == 3
    assert_same(pag, stock_pag)


def _copy_input(executor, model, conds, x_in, timestep, model_options):
    return executor(model, conds, x_in.clone(), timestep, model_options)


@pytest.mark.parametrize("name,calls_per_step", [("pag", 2), ("sag", 3)])
def test_branch_falls_back_to_its_own_call_when_the_step_input_differs(models, name, calls_per_step):
    model, calls = models("sd15")
    stock_node, our_node, args = {"pag": (nodes_pag.PerturbedAttentionGuidance, nodes.PerturbedAttentionGuidance, (3.0,)),
                                  "sag": (nodes_sag.SelfAttentionGuidance, nodes.SelfAttentionGuidance, (0.5, 2.0))}[name]
    stock, _ = sample(run(stock_node, model, *args), calls, "sd15")
    # An outer wrapper hands the model a copy of the latent: what our wrapper kept does not belong to the
    # sampler's latent, so the node computes its branch (SAG: its key mass) in its own call.
    copying = model.clone()
    copying.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "test-copy", _copy_input)
    ours, our_calls = sample(run(our_node, copying, *args), calls, "sd15")
    assert our_calls == calls_per_step
    assert_same(ours, stock)


def test_batch_of_two_latents(models):
    model, calls = models("sd15")
    stock, _ = sample(run(nodes_pag.PerturbedAttentionGuidance, model, 3.0), calls, "sd15", batch_size=2)
    ours, our_calls = sample(run(nodes.PerturbedAttentionGuidance, model, 3.0), calls, "sd15", batch_size=2)
    assert our_calls == 1
    assert_same(ours, stock)


def test_sampler_under_torch_compile(models):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model, calls = models("sd15")
    ours = run(nodes.SelfAttentionGuidance, run(nodes.PerturbedAttentionGuidance, model, 3.0), 0.5, 2.0)
    eager, _ = sample(ours, calls, "sd15", steps=2)
    compiled = ours.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    out, compiled_calls = sample(compiled, calls, "sd15", steps=2)
    assert compiled_calls == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # the batched call and SAG's call, compiled once for both steps
    assert_same(out, eager)


def test_triton_kernels_in_the_sampler(models):
    """Every Triton kernel the nodes use (guided_attention with identity and blur items in one call,
    attention_key_mass, sag_degrade, guidance_combine) on ComfyUI's own layouts, here under the
    interpreter, against the PyTorch backends."""
    from conftest import HAS_TRITON, INTERPRETER

    if not (HAS_TRITON and INTERPRETER):
        pytest.skip("the tiny models run on the CPU: Triton kernels need TRITON_INTERPRET=1 there")
    model, calls = models("sd15")
    ours = run(nodes.SelfAttentionGuidance, run(nodes.SmoothedEnergyGuidance, run(nodes.PerturbedAttentionGuidance,
               model, 3.0), 3.0, 2.0, "middle", 0, -1.0, -1.0, 0.0, "full"), 0.5, 2.0)
    reference, _ = sample(ours, calls, "sd15", steps=1)
    with gk.use_backend("triton"):
        out, our_calls = sample(ours, calls, "sd15", steps=1)
    assert our_calls == 2
    assert_same(out, reference)


# --------------------------------------------------------------------------- the combines, one call each


def _state(seed=0, shape=(2, 4, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    x, cond, uncond = (torch.randn(shape, generator=g) for _ in range(3))
    return x, cond, uncond


def _post_cfg(node_model, x, cond, uncond, scale, sigma):
    fn = node_model.model_options["sampler_post_cfg_function"][-1]
    denoised = uncond + (cond - uncond) * scale
    return fn({"denoised": denoised, "cond": None, "uncond": None, "cond_scale": scale, "model": None,
               "uncond_denoised": uncond, "cond_denoised": cond, "sigma": sigma, "model_options": {}, "input": x})


def _pre_cfg(node_model, x, cond, uncond, scale, sigma):
    fn = node_model.model_options["sampler_pre_cfg_function"][-1]
    return fn({"conds": [[], []], "conds_out": [cond, uncond], "cond_scale": scale, "timestep": sigma, "input": x,
               "sigma": sigma, "model": None, "model_options": {}})


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (1, 16, 3, 9)])
@pytest.mark.parametrize("name", ["cfg_zero_star", "cfg_norm", "mahiro"])
def test_post_cfg_functions_match_stock(models, name, shape):
    model, _ = models("sd15")
    stock_node, our_node, args = {"cfg_zero_star": (nodes_cfg.CFGZeroStar, nodes.CFGZeroStar, ()),
                                  "cfg_norm": (nodes_cfg.CFGNorm, nodes.CFGNorm, (0.8,)),
                                  "mahiro": (nodes_mahiro.Mahiro, nodes.Mahiro, ())}[name]
    x, cond, uncond = _state(shape=shape)
    sigma = torch.full((shape[0],), 3.0)
    for scale in (1.0, 4.5):
        stock = _post_cfg(run(stock_node, model, *args), x, cond, uncond, scale, sigma)
        ours = _post_cfg(run(our_node, model, *args), x, cond, uncond, scale, sigma)
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (2, 3, 2, 4, 5)])
@pytest.mark.parametrize("args", [(1.0, 5.0, 0.0), (0.3, 1.5, -0.5), (-1.0, 0.0, 0.75)])
def test_apg_matches_stock_over_steps(models, shape, args):
    model, _ = models("sd15")
    stock_model, our_model = run(nodes_apg.APG, model, *args), run(nodes.AdaptiveProjectedGuidance, model, *args)
    for step, sigma in enumerate([5.0, 3.0, 1.0, 6.0, 2.0]):  # sigma rising again: a new run resets momentum
        x, cond, uncond = _state(step, shape)
        s = torch.full((shape[0],), sigma)
        stock = _pre_cfg(stock_model, x, cond, uncond, 4.0, s)
        ours = _pre_cfg(our_model, x, cond, uncond, 4.0, s)
        torch.testing.assert_close(ours[0], stock[0], rtol=1e-5, atol=1e-5)
        assert ours[1] is uncond


def test_rescale_cfg_matches_stock(models):
    model, _ = models("sd15")
    x, cond, uncond = _state()
    sigma = torch.tensor([0.5, 7.0])
    args = {"cond": x - cond, "uncond": x - uncond, "cond_scale": 6.0, "timestep": sigma, "input": x, "sigma": sigma,
            "cond_denoised": cond, "uncond_denoised": uncond, "model": None, "model_options": {}}
    stock = nodes_model_advanced.RescaleCFG().patch(model, 0.7)[0].model_options["sampler_cfg_function"](args)
    ours = run(nodes.RescaleCFG, model, 0.7).model_options["sampler_cfg_function"](args)
    torch.testing.assert_close(x - ours, x - stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_tcfg_cfg_norm_mahiro_paths(models, fused):
    from guidance_kernels.integrations.comfyui import combine

    assert all(hasattr(gk, op) for op in combine.FUSED_OPS.values())
    model, _ = models("sd15")
    x, cond, uncond = _state(3)
    sigma = torch.full((2,), 2.0)
    stock = _pre_cfg(run(nodes_tcfg.TCFG, model), x, cond, uncond, 5.0, sigma)[1]
    torch.testing.assert_close(combine.tangential_uncond(x, cond, uncond, fused=fused), stock, rtol=1e-5, atol=1e-5)
    denoised = uncond + (cond - uncond) * 5.0
    stock_norm = _post_cfg(run(nodes_cfg.CFGNorm, model, 0.8), x, cond, uncond, 5.0, sigma)
    torch.testing.assert_close(combine.cfg_norm(denoised, cond, 0.8, fused=fused), stock_norm, rtol=1e-5, atol=1e-6)
    stock_mahiro = _post_cfg(run(nodes_mahiro.Mahiro, model), x, cond, uncond, 5.0, sigma)
    torch.testing.assert_close(combine.mahiro(denoised, cond, uncond, 5.0), stock_mahiro, rtol=1e-5,
                               atol=1e-6)


def test_tcfg_degenerate_rows():
    from guidance_kernels.integrations.comfyui import combine

    x = torch.zeros(3, 4, 2, 2)
    uncond = torch.randn(3, 4, 2, 2)
    cond = uncond.clone()
    cond[1] = 2 * uncond[1]  # parallel rows: the projection keeps uncond
    cond[2] = 0
    uncond[2] = 0  # zero rows: zero
    out = combine.tangential_uncond(x, cond, uncond)
    torch.testing.assert_close(out, uncond)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- loading, layer selection


def test_nodes_load_from_custom_nodes(tmp_path):
    import os

    from comfy.nodes.vanilla_node_importing import _vanilla_load_custom_nodes_1

    import guidance_kernels.integrations.comfyui as package

    link = tmp_path / "guidance_kernels_nodes"
    os.symlink(os.path.dirname(package.__file__), link)
    exported = _vanilla_load_custom_nodes_1(str(link))
    assert set(exported.NODE_CLASS_MAPPINGS) == {n.GET_SCHEMA().node_id for n in nodes.NODES}
    assert exported.NODE_CLASS_MAPPINGS["GKPerturbedAttentionGuidance"] is nodes.PerturbedAttentionGuidance


def test_importing_the_package_imports_no_comfy():
    import subprocess
    import sys

    code = ("import sys, guidance_kernels.integrations.comfyui, guidance_kernels.integrations.comfyui.tiny;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'comfy_extras')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unet_block_list(models):
    from guidance_kernels.integrations.comfyui.blocks import parse_unet_blocks

    model, _ = models("sdxl")
    unet = model.get_model_object("diffusion_model")
    assert parse_unet_blocks(unet, "d0, m0.1, u0-1.0") == [("input", 3, None), ("middle", 0, 1), ("output", 0, 0),
                                                            ("output", 1, 0)]
    for text, message in [("x0", "must start with d, m or u"), ("m1", "block 1 out of range"),
                          ("m0.2", "transformer 2 out of range"), ("d0.a", "must be a number or a range"),
                          (" , ", "selects no layer")]:
        with pytest.raises(ValueError, match=message):
            parse_unet_blocks(unet, text)


def test_participants_survive_model_clones(models):
    model, _ = models("sd15")
    patched = run(nodes.PerturbedAttentionGuidance, model, 3.0)
    clone = patched.clone()
    (participant,) = batch.participants(clone.model_options)
    assert participant is batch.participants(patched.model_options)[0]
    patch = clone.model_options["transformer_options"]["patches_replace"]["attn1"][("middle", 0)]
    assert patch.rules[0].participant is participant

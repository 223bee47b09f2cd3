"""The V3 nodes. Importing this module imports ComfyUI (``comfy_api.latest``); ComfyUI imports it
through :func:`guidance_kernels.integrations.comfyui.comfy_entrypoint` when it loads the package.

Each node takes the stock node's inputs with the stock defaults (SEG: the community node's) and
patches a clone of the model. Perturbed branches (PAG, SEG, SLG) join the sampler's cond/uncond
model call through :mod:`.batch`; SAG records the uncond key mass in that call and runs its one
degraded call; the combines are in :mod:`.combine` (fused ops, Mahiro in PyTorch).
"""

from __future__ import annotations

import math
import re

from comfy_api.latest import ComfyExtension, io

from guidance_kernels.integrations.comfyui import batch, combine, patches
from guidance_kernels.integrations.comfyui.blocks import parse_unet_blocks


class _Window(batch.Participant):
    """A branch that takes part while ``scale`` is non-zero and sigma lies in a window."""

    def __init__(self, name: str, scale: float, low: float = -math.inf, high: float = math.inf,
                 low_inclusive: bool = True, enabled: bool = True):
        super().__init__(name)
        self.scale, self.low, self.high, self.low_inclusive, self.enabled = scale, low, high, low_inclusive, enabled

    def active(self, sigma, x) -> bool:
        if not self.enabled or self.scale == 0:
            return False
        value = float(sigma[0])
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and value <= self.high


class _SagRecorder(batch.Participant):
    branch, records = False, True

    def __init__(self, scale: float, blur_sigma: float):
        super().__init__("sag")
        self.scale, self.blur_sigma = scale, blur_sigma

    def active(self, sigma, x) -> bool:
        # blur σ = 0: the stock node's blur weights are 0/0 (NaN); its σ → 0 limit leaves x unchanged,
        # so the degraded prediction equals uncond and the term vanishes: SAG is skipped.
        return self.scale != 0 and self.blur_sigma > 0 and min(x.shape[2:]) > 4


class PerturbedAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GKPerturbedAttentionGuidance",
            display_name="Perturbed-Attention Guidance (one call, guidance_kernels)",
            category="model_patches/unet",
            description="PerturbedAttentionGuidance with the perturbed branch batched into the cond/uncond call "
                        "(identity attention in the middle block via guided_attention) and a fused combine.",
            inputs=[io.Model.Input("model"),
                    io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01, round=0.01)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale) -> io.NodeOutput:
        m = model.clone()
        branch = _Window("pag", scale)
        patches.add_attention_rule(m, "middle", 0, patches.Rule(branch, patches.IDENTITY))
        batch.install(m, branch)

        def post_cfg_function(args):
            if not branch.active(args["sigma"], args["input"]):
                return args["denoised"]
            return combine.add_term(args["denoised"], args["cond_denoised"], batch.branch_prediction(branch, args),
                                    scale)

        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)


class SelfAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GKSelfAttentionGuidance",
            display_name="Self-Attention Guidance (guidance_kernels)",
            category="_for_testing",
            description="SelfAttentionGuidance with the uncond key mass captured in the cond/uncond call without the "
                        "N×N attention map, the degrade step in one kernel and a fused combine.",
            inputs=[io.Model.Input("model"),
                    io.Float.Input("scale", default=0.5, min=-2.0, max=5.0, step=0.01),
                    io.Float.Input("blur_sigma", default=2.0, min=0.0, max=10.0, step=0.1)],
            outputs=[io.Model.Output()],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma) -> io.NodeOutput:
        import comfy.samplers

        import guidance_kernels as gk

        m = model.clone()
        recorder = _SagRecorder(scale, blur_sigma)
        # diffusers' and ComfyUI's layer: the first transformer of the middle block.
        patches.add_attention_rule(m, "middle", 0, patches.Rule(recorder, patches.RECORD, index=0))
        batch.install(m, recorder)

        def post_cfg_function(args):
            x = args["input"]
            if not recorder.active(args["sigma"], x):
                return args["denoised"]
            mass = batch.recorded_uncond(recorder, args)
            noised, degraded = gk.sag_degrade(args["uncond_denoised"], mass, sigma=blur_sigma, x_t=x,
                                              return_degraded=True)
            (prediction,) = comfy.samplers.calc_cond_batch(args["model"], [args["uncond"]], noised, args["sigma"],
                                                           args["model_options"])
            return combine.add_term(args["denoised"], degraded, prediction, scale)

        m.set_model_sampler_post_cfg_function(post_cfg_function, disable_cfg1_optimization=True)
        return io.NodeOutput(m)


class SmoothedEnergyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GKSmoothedEnergyGuidance",
            display_name="Smoothed Energy Guidance (one call, guidance_kernels)",
            category="model_patches/unet",
            description="Smoothed Energy Guidance (the community SmoothedEnergyGuidanceAdvanced node's inputs): "
                        "blurred queries in the chosen self-attention layers, the branch batched into the cond/uncond "
                        "call. blur_sigma < 0: infinite blur (every query is the image mean, O(N·d)).",
            inputs=[io.Model.Input("model"),
                    io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01),
                    io.Float.Input("blur_sigma", default=-1.0, min=-1.0, max=9999.0, step=0.01, round=0.001),
                    io.Combo.Input("unet_block", options=["input", "middle", "output"], default="middle"),
                    io.Int.Input("unet_block_id", default=0),
                    io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=False),
                    io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=False),
                    io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01),
                    io.Combo.Input("rescale_mode", options=["full", "partial", "snf"], default="full"),
                    io.String.Input("unet_block_list", default="", optional=True)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, unet_block, unet_block_id, sigma_start, sigma_end, rescale,
                rescale_mode, unet_block_list="") -> io.NodeOutput:
        m = model.clone()
        high = math.inf if sigma_start < 0 else sigma_start
        branch = _Window("seg", scale, low=sigma_end, high=high, low_inclusive=False, enabled=blur_sigma != 0)
        blocks = parse_unet_blocks(model.get_model_object("diffusion_model"), unet_block_list) if unet_block_list \
            else [(unet_block, unet_block_id, None)]
        sigma = math.inf if blur_sigma < 0 else blur_sigma
        for block, number, index in blocks:
            patches.add_attention_rule(m, block, number, patches.Rule(branch, patches.BLUR, index=index, sigma=sigma))
        batch.install(m, branch)

        def post_cfg_function(args):
            denoised = args["denoised"]
            if not branch.active(args["sigma"], args["input"]):
                return denoised
            cond, uncond = args["cond_denoised"], args["uncond_denoised"]
            perturbed = batch.branch_prediction(branch, args)
            if rescale_mode == "snf":
                if uncond.any():
                    return uncond + combine.saliency_fusion(denoised - uncond, (cond - perturbed) * scale)
                return combine.add_term(denoised, cond, perturbed, scale)
            if rescale == 0:
                return combine.add_term(denoised, cond, perturbed, scale)
            return combine.add_term_seg_rescale(denoised, cond, perturbed, scale, rescale, rescale_mode)

        m.set_model_sampler_post_cfg_function(post_cfg_function, rescale_mode == "snf")
        return io.NodeOutput(m)


def _layer_numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


class SkipLayerGuidanceDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GKSkipLayerGuidanceDiT",
            display_name="Skip Layer Guidance DiT (one call, guidance_kernels)",
            category="advanced/guidance",
            description="SkipLayerGuidanceDiT with the skip-layer branch batched into the cond/uncond call: its rows "
                        "bypass the chosen blocks inside the one model call.",
            inputs=[io.Model.Input("model"),
                    io.String.Input("double_layers", default="7, 8, 9"),
                    io.String.Input("single_layers", default="7, 8, 9"),
                    io.Float.Input("scale", default=3.0, min=0.0, max=10.0, step=0.1),
                    io.Float.Input("start_percent", default=0.01, min=0.0, max=1.0, step=0.001),
                    io.Float.Input("end_percent", default=0.15, min=0.0, max=1.0, step=0.001),
                    io.Float.Input("rescaling_scale", default=0.0, min=0.0, max=10.0, step=0.01)],
            outputs=[io.Model.Output()],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, scale, start_percent, end_percent, double_layers="", single_layers="",
                rescaling_scale=0.0) -> io.NodeOutput:
        double, single = _layer_numbers(double_layers), _layer_numbers(single_layers)
        if not double and not single:
            return io.NodeOutput(model)
        sampling = model.get_model_object("model_sampling")
        high, low = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)
        m = model.clone()
        branch = _Window("slg", scale if scale > 0 else 0.0, low=low, high=high)
        for index in double:
            patches.add_block_skip(m, "double_block", index, branch)
        for index in single:
            patches.add_block_skip(m, "single_block", index, branch)
        batch.install(m, branch)

        def post_cfg_function(args):
            if not branch.active(args["sigma"], args["input"]):
                return args["denoised"]
            skipped = batch.branch_prediction(branch, args)
            if rescaling_scale == 0:
                return combine.add_term(args["denoised"], args["cond_denoised"], skipped, scale)
            return combine.add_term_rescaled(args["denoised"], args["cond_denoised"], skipped, scale, rescaling_scale)

        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)


class AdaptiveProjectedGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GKAPG",
            display_name="Adaptive Projected Guidance (fused, guidance_kernels)",
            category="sampling/custom_sampling",
            inputs=[io.Model.Input("model"),
                    io.Float.Input("eta", default=1.0, min=-10.0, max=10.0, step=0.01,
                                   tooltip="Controls the scale of the parallel guidance vector. Default CFG behavior "
                                           "at a setting of 1."),
                    io.Float.Input("norm_threshold", default=5.0, min=0.0, max=50.0, step=0.1,
                                   tooltip="Normalize guidance vector to this value, normalization disable at a "
                                           "setting of 0."),
                    io.Float.Input("momentum", default=0.0, min=-5.0, max=1.0, step=0.01,
                                   tooltip="Controls a running average of guidance during diffusion, disabled at a "
                                           "setting of 0.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, eta, norm_threshold, momentum) -> io.NodeOutput:
        state = combine.ApgState(eta, norm_threshold, momentum)

        def pre_cfg_function(args):
            out = args["conds_out"]
            if len(out) == 1:
                return out
            modified = state.modified_cond(out[0], out[1], args["cond_scale"], float(args["sigma"][0]))
            return [modified, out[1]] + list(out[2:])

        m = model.clone()
        m.set_model_sampler_pre_cfg_function(pre_cfg_function)
        return io.NodeOutput(m)


class CFGZeroStar(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GKCFGZeroStar", display_name="CFG-Zero* (fused, guidance_kernels)",
                         category="advanced/guidance", inputs=[io.Model.Input("model")],
                         outputs=[io.Model.Output(display_name="patched_model")])

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        def post_cfg_function(args):
            return combine.cfg_zero_star(args["denoised"], args["cond_denoised"], args["uncond_denoised"],
                                         args["input"], args["cond_scale"])

        m = model.clone()
        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)


class CFGNorm(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GKCFGNorm", display_name="CFGNorm (guidance_kernels)", category="advanced/guidance",
                         inputs=[io.Model.Input("model"),
                                 io.Float.Input("strength", default=1.0, min=0.0, max=100.0, step=0.01)],
                         outputs=[io.Model.Output(display_name="patched_model")], is_experimental=True)

    @classmethod
    def execute(cls, model, strength) -> io.NodeOutput:
        def post_cfg_function(args):
            return combine.cfg_norm(args["denoised"], args["cond_denoised"], strength)

        m = model.clone()
        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)


class TCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GKTCFG", display_name="Tangential Damping CFG (guidance_kernels)",
                         category="advanced/guidance",
                         description="TCFG (2503.18137) without the SVD: the uncond is damped in closed form.",
                         inputs=[io.Model.Input("model")], outputs=[io.Model.Output(display_name="patched_model")])

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        def pre_cfg_function(args):
            out = args["conds_out"]
            if len(out) <= 1 or None in args["conds"][:2]:
                return out
            return [out[0], combine.tangential_uncond(args["input"], out[0], out[1])] + list(out[2:])

        m = model.clone()
        m.set_model_sampler_pre_cfg_function(pre_cfg_function)
        return io.NodeOutput(m)


class Mahiro(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GKMahiro", display_name="Mahiro CFG (guidance_kernels)", category="_for_testing",
                         inputs=[io.Model.Input("model")], outputs=[io.Model.Output(display_name="patched_model")],
                         is_experimental=True)

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        def post_cfg_function(args):
            return combine.mahiro(args["denoised"], args["cond_denoised"], args["uncond_denoised"], args["cond_scale"])

        m = model.clone()
        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)


class RescaleCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GKRescaleCFG", display_name="RescaleCFG (fused, guidance_kernels)",
                         category="advanced/model",
                         inputs=[io.Model.Input("model"),
                                 io.Float.Input("multiplier", default=0.7, min=0.0, max=1.0, step=0.01)],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, multiplier) -> io.NodeOutput:
        def sampler_cfg_function(args):
            x = args["input"]
            return x - combine.rescale_cfg(x, args["cond_denoised"], args["uncond_denoised"], args["sigma"],
                                           args["cond_scale"], multiplier)

        m = model.clone()
        m.set_model_sampler_cfg_function(sampler_cfg_function)
        return io.NodeOutput(m)


NODES = [PerturbedAttentionGuidance, SelfAttentionGuidance, SmoothedEnergyGuidance, SkipLayerGuidanceDiT,
         AdaptiveProjectedGuidance, CFGZeroStar, CFGNorm, TCFG, Mahiro, RescaleCFG]


class GuidanceKernelsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

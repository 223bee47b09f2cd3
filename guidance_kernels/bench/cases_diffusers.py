"""Benchmark cases of the diffusers integration: per-step time of guided denoising.

GPU (bf16): the SDXL UNet in its real configuration with random weights at 1024×1024 (latent
128×128), batch 1 — a CFG-only step (2 branches, stock processors) against CFG+PAG (mid),
CFG+SEG (σ = ∞, mid) and CFG+PAG+SEG through the GuidedDenoiser with and without forking, and
stock diffusers' PAG step (3 branches, diffusers' PAG processors and combine). Goals: ≤ 1.35×
the CFG-only step for CFG+PAG and CFG+SEG, ≤ 1.7× for CFG+PAG+SEG. An SD3-style transformer
(24 blocks, SD3-medium widths) with PAG at block 7 reports the fork's saving over the full batch.

Beside each measured ratio the table prints its FLOP limit: the share ``f`` of the model's FLOPs
before the fork block, counted with ``torch.utils.flop_counter`` on the meta device (no memory,
the benchmarked configuration, and the real SDXL one on CPU runs), and a step that runs ``p``
branches before the fork and ``s`` after it costs ``p·f + s·(1 − f)`` forwards (CFG-only: 2).
The fraction of UNet *time* spent before the mid block is measured in the same run.

CPU: the same cases on tiny models, so the benchmark runs everywhere (the ratios then mostly
show batching overheads, not GPU behaviour).
"""

from __future__ import annotations

import time

import torch

from .harness import Case, Goal, Provider, Rows, Setup, dtype_name, within

OPS = ["diffusers"]
REQUIRES = ("diffusers",)

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                 cross_attention_dim=64,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32,
                 norm_num_groups=16)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TINY_SD3 = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=8, attention_head_dim=16, num_attention_heads=4,
                joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4)


CFG_ONLY = "CFG-only step"
# provider -> (branches before the fork, branches after it), and the goal on its ratio to CFG_ONLY
UNET_BRANCHES = {CFG_ONLY: (2, 2), "diffusers PAG step (3 branches)": (3, 3), "CFG+PAG mid (no fork)": (3, 3),
                 "CFG+PAG mid (fork)": (2, 3), "CFG+SEG inf mid (fork)": (2, 3), "CFG+PAG+SEG mid (fork)": (2, 4)}
UNET_GOALS = {"CFG+PAG mid (fork)": 1.35, "CFG+SEG inf mid (fork)": 1.35, "CFG+PAG+SEG mid (fork)": 1.7}
SD3_BLOCK = 7
SD3_FULL, SD3_FORKED = f"CFG+PAG blocks.{SD3_BLOCK} full batch", f"CFG+PAG blocks.{SD3_BLOCK} forked"
SD3_BRANCHES = {SD3_FULL: (3, 3), SD3_FORKED: (2, 3)}


# --------------------------------------------------------------------------- FLOP limits


def _unet_inputs(config: dict, batch: int, device, dtype, generator=None) -> tuple[tuple, dict]:
    side = config["sample_size"]
    width = config["cross_attention_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device, dtype=dtype)
    return ((randn(batch, 4, side, side), torch.tensor(500, device=device)),
            {"encoder_hidden_states": randn(batch, 77, width),
             "added_cond_kwargs": {"text_embeds": randn(batch, pooled), "time_ids": ids}})


def _sd3_inputs(config: dict, batch: int, device, dtype, generator=None) -> tuple[tuple, dict]:
    side, tokens = config["sample_size"], (333 if config["joint_attention_dim"] == 4096 else 16)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    return ((randn(batch, config["in_channels"], side, side),),
            {"encoder_hidden_states": randn(batch, tokens, config["joint_attention_dim"]),
             "pooled_projections": randn(batch, config["pooled_projection_dim"]),
             "timestep": torch.tensor([500.0] * batch, device=device)})


def flop_prefix_fraction(cls, config: dict, inputs, fork_block: str) -> float:
    """Share of one forward's FLOPs spent before ``fork_block`` starts, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    before = []

    def mark(module, args) -> None:  # a pre-hook returning a value would replace the block's inputs
        before.append(counter.get_total_flops())

    with torch.device("meta"):  # tensors made inside the forward land on meta too
        model = cls(**config)
        args, kwargs = inputs(config, 1, "meta", torch.float32)
        handle = model.get_submodule(fork_block).register_forward_pre_hook(mark)
        with torch.no_grad(), counter:
            model(*args, **kwargs)
        handle.remove()
    return before[0] / counter.get_total_flops()


def flop_ratio(fraction: float, branches: tuple[int, int], baseline: tuple[int, int]) -> float:
    """Forwards of a step with ``(before, after)`` branches around the fork, over the baseline's."""
    def cost(b):
        return b[0] * fraction + b[1] * (1 - fraction)
    return cost(branches) / cost(baseline)


def _limit_report(label: str, fraction: float, branches: dict, baseline: str, extra: list[str] = ()):
    """The case's report: every provider's measured ratio to the baseline beside its FLOP limit."""
    def report(rows: Rows) -> list[str]:
        lines = [f"FLOP limits ({label}: {100 * fraction:.1f}% of the FLOPs precede the fork block; "
                 "torch.utils.flop_counter, meta device):"]
        base = rows.get(baseline)
        for name, b in branches.items():
            row = rows.get(name)
            measured = f"{row.ms / base.ms:.3f}x" if row and row.ms and base and base.ms else "-"
            lines.append(f"  {name:<34} measured {measured:>7}   FLOP limit "
                         f"{flop_ratio(fraction, b, branches[baseline]):.3f}x")
        return lines + list(extra)
    return report


# --------------------------------------------------------------------------- models and steps


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


class _UNetSteps:
    """The step variants of one UNet on fixed inputs ([uncond, cond] text, SDXL's added conditions)."""

    def __init__(self, setup: Setup):
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.config = SDXL_UNET if setup.shapes == "real" else TINY_UNET
        self.unet = _build(UNet2DConditionModel, self.config, setup.device, setup.dtype)
        g = torch.Generator(device=setup.device).manual_seed(0)
        (self.sample, self.t), cond = _unet_inputs(self.config, 1, setup.device, setup.dtype, g)
        (_, _), uncond = _unet_inputs(self.config, 1, setup.device, setup.dtype, g)
        self.cond, self.uncond = cond["encoder_hidden_states"], uncond["encoder_hidden_states"]
        self.added = cond["added_cond_kwargs"]
        self.negative_added = {"text_embeds": torch.zeros_like(self.added["text_embeds"]),
                               "time_ids": self.added["time_ids"]}
        self.scales = {k: torch.tensor(v, device=setup.device) for k, v in (("s", 7.0), ("p", 3.0), ("q", 3.0))}
        self.configs = _Configs(self.unet, AttnProcessor2_0)
        self.denoiser = None

    def stock(self, n: int):
        """diffusers' batched step over n branches [uncond, cond, (perturbed)] and its combine."""
        x = torch.cat([self.sample] * n)
        ehs = torch.cat([self.uncond] + [self.cond] * (n - 1))
        added = {k: torch.cat([self.negative_added[k]] + [self.added[k]] * (n - 1)) for k in self.added}
        parts = self.unet(x, self.t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample.chunk(n)
        out = parts[0] + 7.0 * (parts[1] - parts[0])
        return out + 3.0 * (parts[1] - parts[2]) if n == 3 else out

    def cfg_only(self):
        self.configs.use("stock", lambda: None)
        return self.stock(2)

    def diffusers_pag(self):
        from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

        from ..integrations import diffusers as gkd

        def install():
            layers = gkd.self_attention_layers(self.unet)
            for name in gkd.select_layers(self.unet, "mid"):
                layers[name].set_processor(PAGCFGIdentitySelfAttnProcessor2_0())

        self.configs.use("diffusers-pag", install)
        return self.stock(3)

    def guided(self, pag: bool, seg: bool, fork: bool):
        from ..integrations import diffusers as gkd

        def install():
            self.denoiser = gkd.GuidedDenoiser(self.unet, pag_layers="mid", seg_layers="mid", fork=fork)
            return self.denoiser.remove

        def step():
            self.configs.use(("guided", fork), install)
            return self.denoiser(self.sample, self.t, encoder_hidden_states=self.cond,
                                 negative_encoder_hidden_states=self.uncond, guidance_scale=self.scales["s"],
                                 pag_scale=self.scales["p"] if pag else 0.0, seg_scale=self.scales["q"] if seg else 0.0,
                                 added_cond_kwargs=self.added, negative_added_cond_kwargs=self.negative_added)

        return step


def _unet_case(setup: Setup) -> Case:
    from diffusers import UNet2DConditionModel

    steps = _UNetSteps(setup)
    steps.configs.use("stock", lambda: None)
    providers = [Provider(CFG_ONLY, steps.cfg_only), Provider("diffusers PAG step (3 branches)", steps.diffusers_pag),
                 Provider("CFG+PAG mid (no fork)", steps.guided(True, False, False), ours=True),
                 Provider("CFG+PAG mid (fork)", steps.guided(True, False, True), ours=True),
                 Provider("CFG+SEG inf mid (fork)", steps.guided(False, True, True), ours=True),
                 Provider("CFG+PAG+SEG mid (fork)", steps.guided(True, True, True), ours=True)]
    real = setup.shapes == "real"
    fraction = flop_prefix_fraction(UNet2DConditionModel, steps.config, _unet_inputs, "mid_block")
    extra = []
    if setup.shapes == "small":  # the tiny model's limits differ from the real one's: state both
        f = flop_prefix_fraction(UNet2DConditionModel, SDXL_UNET, _unet_inputs, "mid_block")
        extra = [f"  the real SDXL UNet at 1024 px: {100 * f:.1f}% before the mid block; FLOP limits " + ", ".join(
            f"{name} {flop_ratio(f, UNET_BRANCHES[name], UNET_BRANCHES[CFG_ONLY]):.3f}x" for name in UNET_GOALS)]
    if not setup.smoke:
        time_share = _prefix_fraction(steps.unet, lambda: steps.stock(2), "mid_block", setup.device)
        extra.append(f"  measured: {100 * time_share:.0f}% of the CFG-only UNet forward's time precedes the mid block")
    goals = [Goal(f"{name} <= {limit}x the {CFG_ONLY} (GPU; FLOP limit "
                  f"{flop_ratio(fraction, UNET_BRANCHES[name], UNET_BRANCHES[CFG_ONLY]):.3f}x)",
                  within((CFG_ONLY,), limit), counts=lambda r, name=name: r.provider == name)
             for name, limit in UNET_GOALS.items()]
    side = steps.config["sample_size"]
    return Case(op="diffusers", name=f"SDXL UNet {'1024px' if real else 'tiny'} step", shape=f"1x4x{side}x{side}",
                dtype=dtype_name(setup.dtype), providers=providers, baseline=CFG_ONLY, goals=goals,
                report=_limit_report("this UNet", fraction, UNET_BRANCHES, CFG_ONLY, extra))


def _sd3_case(setup: Setup) -> Case:
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from ..integrations import diffusers as gkd

    config = SD3_MEDIUM if setup.shapes == "real" else TINY_SD3
    model = _build(SD3Transformer2DModel, config, setup.device, setup.dtype)
    g = torch.Generator(device=setup.device).manual_seed(0)
    (sample,), cond = _sd3_inputs(config, 1, setup.device, setup.dtype, g)
    (_,), uncond = _sd3_inputs(config, 1, setup.device, setup.dtype, g)
    configs, holder = _Configs(model, JointAttnProcessor2_0), {}
    s, p = torch.tensor(5.0, device=setup.device), torch.tensor(3.0, device=setup.device)

    def step(fork: bool):
        def install():
            holder["den"] = gkd.GuidedDenoiser(model, pag_layers=SD3_BLOCK, fork=fork)
            return holder["den"].remove

        def run():
            configs.use(fork, install)
            return holder["den"](sample, cond["timestep"], encoder_hidden_states=cond["encoder_hidden_states"],
                                 negative_encoder_hidden_states=uncond["encoder_hidden_states"],
                                 pooled_projections=cond["pooled_projections"],
                                 negative_pooled_projections=cond["pooled_projections"], guidance_scale=s, pag_scale=p)

        return run

    fraction = flop_prefix_fraction(SD3Transformer2DModel, config, _sd3_inputs, f"transformer_blocks.{SD3_BLOCK}")
    side = config["sample_size"]
    return Case(op="diffusers", name=f"SD3 {'medium-size' if setup.shapes == 'real' else 'tiny'} transformer, "
                f"{config['num_layers']} blocks, fork at block {SD3_BLOCK}",
                shape=f"1x{config['in_channels']}x{side}x{side}", dtype=dtype_name(setup.dtype),
                providers=[Provider(SD3_FULL, step(False), ours=True), Provider(SD3_FORKED, step(True), ours=True)],
                baseline=SD3_FULL, report=_limit_report("this transformer", fraction, SD3_BRANCHES, SD3_FULL))


def cases(setup: Setup) -> list[Case]:
    return [_unet_case(setup), _sd3_case(setup)]

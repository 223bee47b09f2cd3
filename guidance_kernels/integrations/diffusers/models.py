"""What the guided denoiser needs to know about each diffusers model class: its blocks, their
signatures and return orders, its self-attention and feed-forward modules, how it patches the
latent into a (T, H, W) token grid, and how it is called.

===============================  ==========================================  ===================  ==============
class (family)                   top-level blocks (forward order)            block returns        token grid
===============================  ==========================================  ===================  ==============
UNet2DConditionModel (unet)      down_blocks.i, mid_block, up_blocks.i       (UNet layouts)       per layer
SD3Transformer2DModel (sd3)      transformer_blocks.i                        (encoder, hidden)    (1, H/p, W/p)
FluxTransformer2DModel (flux)    transformer_blocks.i, single_transformer_   (encoder, hidden)    img_ids / given
                                 blocks.i
WanTransformer3DModel (wan)      blocks.i                                    hidden               (T/pt, H/ph, W/pw)
LTXVideoTransformer3DModel (ltx) transformer_blocks.i                        hidden               num_frames ×
                                                                                                  height × width
HunyuanVideoTransformer3DModel   transformer_blocks.i, single_transformer_   (hidden, encoder)    (T/pt, H/p, W/p)
(hunyuan_video)                  blocks.i
===============================  ==========================================  ===================  ==============

Self-attention modules per block (what PAG and SEG perturb): SD3 ``attn`` (joint) and, in SD3.5's
dual-attention blocks, ``attn2`` (image tokens only); Flux and HunyuanVideo ``attn`` (joint in the
double-stream blocks, over the concatenated stream in the single-stream ones); Wan and LTX ``attn1``
(video tokens; their ``attn2`` is cross-attention). Text tokens sit after the image tokens in SD3 and
HunyuanVideo, before them in Flux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "WanTransformer3DModel",
             "LTXVideoTransformer3DModel", "HunyuanVideoTransformer3DModel")


@dataclass(frozen=True)
class Family:
    """One supported model class.

    ``block_lists``: the ModuleLists of top-level blocks in forward order (empty for UNets).
    ``attention`` / ``feed_forward``: per block class name, the attribute names of its self-attention
    and feed-forward (diffusers ``FeedForward``) modules. ``returns``: per block class name, the
    block argument each output position returns (its skip passes those arguments through).
    ``shared_args``: block / attention arguments that are not per batch row (rotary tables).
    ``sample_arg``: the model's name for the latent; ``branch_inputs``: conditioning that differs
    between the cond and uncond branches besides ``encoder_hidden_states``; ``required``: those
    the model cannot run without; ``per_sample_kwargs``: other model arguments given per sample
    (repeated for every branch). ``text``: where joint attention keeps its text tokens.
    """

    name: str
    cls: str
    block_lists: tuple[str, ...]
    attention: dict
    feed_forward: dict
    returns: dict
    shared_args: frozenset = frozenset()
    sample_arg: str = "hidden_states"
    sample_dims: int = 4
    branch_inputs: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    per_sample_kwargs: frozenset = frozenset()
    text: str | None = None

    @property
    def is_unet(self) -> bool:
        return self.name == "unet"


_FAMILIES = (
    Family("unet", "UNet2DConditionModel", (), {}, {}, {}, sample_arg="sample",
           branch_inputs=("added_cond_kwargs",)),
    Family("sd3", "SD3Transformer2DModel", ("transformer_blocks",),
           attention={"JointTransformerBlock": ("attn", "attn2")},
           feed_forward={"JointTransformerBlock": ("ff", "ff_context")},
           returns={"JointTransformerBlock": ("encoder_hidden_states", "hidden_states")},
           branch_inputs=("pooled_projections",), required=("pooled_projections",), text="after"),
    Family("flux", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
           attention={"FluxTransformerBlock": ("attn",), "FluxSingleTransformerBlock": ("attn",)},
           feed_forward={"FluxTransformerBlock": ("ff", "ff_context"), "FluxSingleTransformerBlock": ()},
           returns={"FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states")},
           shared_args=frozenset({"image_rotary_emb"}), sample_dims=3, branch_inputs=("pooled_projections",),
           required=("pooled_projections",), per_sample_kwargs=frozenset({"guidance"}), text="before"),
    Family("wan", "WanTransformer3DModel", ("blocks",),
           attention={"WanTransformerBlock": ("attn1",)}, feed_forward={"WanTransformerBlock": ("ffn",)},
           returns={"WanTransformerBlock": ("hidden_states",)}, shared_args=frozenset({"rotary_emb"}),
           sample_dims=5, per_sample_kwargs=frozenset({"encoder_hidden_states_image"})),
    Family("ltx", "LTXVideoTransformer3DModel", ("transformer_blocks",),
           attention={"LTXVideoTransformerBlock": ("attn1",)}, feed_forward={"LTXVideoTransformerBlock": ("ff",)},
           returns={"LTXVideoTransformerBlock": ("hidden_states",)}, sample_dims=3,
           branch_inputs=("encoder_attention_mask",), per_sample_kwargs=frozenset({"video_coords"})),
    Family("hunyuan_video", "HunyuanVideoTransformer3DModel", ("transformer_blocks", "single_transformer_blocks"),
           attention={"HunyuanVideoTransformerBlock": ("attn",), "HunyuanVideoSingleTransformerBlock": ("attn",),
                      "HunyuanVideoTokenReplaceTransformerBlock": ("attn",),
                      "HunyuanVideoTokenReplaceSingleTransformerBlock": ("attn",)},
           feed_forward={"HunyuanVideoTransformerBlock": ("ff", "ff_context"),
                         "HunyuanVideoSingleTransformerBlock": (),
                         "HunyuanVideoTokenReplaceTransformerBlock": ("ff", "ff_context"),
                         "HunyuanVideoTokenReplaceSingleTransformerBlock": ()},
           returns={name: ("hidden_states", "encoder_hidden_states") for name in (
               "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
               "HunyuanVideoTokenReplaceTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock")},
           shared_args=frozenset({"freqs_cis", "image_rotary_emb", "first_frame_num_tokens"}), sample_dims=5,
           branch_inputs=("encoder_attention_mask", "pooled_projections"),
           required=("encoder_attention_mask", "pooled_projections"), per_sample_kwargs=frozenset({"guidance"}),
           text="after"),
)


def family_of(model: torch.nn.Module) -> Family | None:
    """The supported family of ``model`` (a diffusers class or a subclass of one), else None."""
    import diffusers

    for family in _FAMILIES:
        cls = getattr(diffusers, family.cls, None)
        if cls is not None and isinstance(model, cls):
            return family
    return None


def require_family(fn: str, model) -> Family:
    family = family_of(model) if isinstance(model, torch.nn.Module) else None
    if family is None:
        raise TypeError(f"{fn}: model: {type(model).__name__} is not a supported diffusers model "
                        f"(supported: {', '.join(SUPPORTED)})")
    return family


# --------------------------------------------------------------------------- token grids


def _patch(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _divide(fn: str, family: Family, dims: tuple[int, ...], patch: tuple[int, ...], names: str) -> tuple[int, ...]:
    if any(d % p for d, p in zip(dims, patch)):
        raise ValueError(f"{fn}: sample: the latent {names} = {dims} is not divisible by {family.cls}'s patch size "
                         f"{patch}: the patch embedding would drop the remainder")
    return tuple(d // p for d, p in zip(dims, patch))


def check_sample(fn: str, family: Family, sample) -> None:
    if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
        raise TypeError(f"{fn}: sample: expected a floating-point tensor, got {type(sample).__name__}")
    if sample.dim() != family.sample_dims:
        layout = {3: "(B, N, C) packed tokens", 4: "(B, C, H, W)", 5: "(B, C, T, H, W)"}[family.sample_dims]
        raise ValueError(f"{fn}: sample: {family.cls} takes {layout}, got shape {tuple(sample.shape)}")


def token_grid(fn: str, family: Family, model, sample: torch.Tensor, model_kwargs: dict,
               given=None) -> tuple[int, int, int]:
    """(T, H, W) of a DiT's image/video tokens for ``sample``, from the model's patching.

    Flux and LTX take packed tokens: LTX's grid is its ``num_frames, height, width`` arguments;
    Flux's is ``given`` (``(H, W)`` or ``(T, H, W)``) or else read from ``img_ids`` (row and column
    ids, as diffusers' Flux pipelines build them; a host read)."""
    config = model.config
    if given is not None:
        grid = tuple(int(g) for g in given)
        grid = (1,) + grid if len(grid) == 2 else grid
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"{fn}: token_grid: expected (H, W) or (T, H, W) of positive ints, got {given!r}")
    elif family.name == "sd3":
        grid = (1,) + _divide(fn, family, tuple(sample.shape[-2:]), _patch(config.patch_size, 2), "(H, W)")
    elif family.name == "wan":
        grid = _divide(fn, family, tuple(sample.shape[-3:]), _patch(config.patch_size, 3), "(T, H, W)")
    elif family.name == "hunyuan_video":
        grid = _divide(fn, family, tuple(sample.shape[-3:]),
                       (config.patch_size_t, config.patch_size, config.patch_size), "(T, H, W)")
    elif family.name == "ltx":
        missing = [k for k in ("num_frames", "height", "width") if model_kwargs.get(k) is None]
        if missing:
            raise ValueError(f"{fn}: model_kwargs: LTXVideoTransformer3DModel needs num_frames, height and width "
                             f"(its token grid); missing {', '.join(missing)}")
        grid = tuple(int(model_kwargs[k]) for k in ("num_frames", "height", "width"))
    elif family.name == "flux":
        ids = model_kwargs.get("img_ids")
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{fn}: token_grid: FluxTransformer2DModel takes packed tokens; pass token_grid=(H, W) "
                             "or img_ids in model_kwargs")
        ids = ids.detach().reshape(-1, ids.shape[-1]).cpu()
        grid = (1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    else:
        raise ValueError(f"{fn}: model: {family.cls} has no token grid")
    tokens = sample.shape[1] if family.sample_dims == 3 else math.prod(grid)
    if math.prod(grid) != tokens:
        raise ValueError(f"{fn}: token_grid: the grid {grid} has {math.prod(grid)} tokens but sample has {tokens}")
    return grid

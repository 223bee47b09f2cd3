"""guidance_kernels: fused CUDA and Triton kernels for diffusion-model guidance, as torch custom ops.

Importing the package registers the ``guidance_kernels`` torch.library ops; it never imports
triton or the CUDA extension and never initialises CUDA (both happen on first use).
"""

from . import _library  # noqa: F401  (registers the torch.library ops)
from ._version import __version__
from .backends import BackendError, use_backend
from .ops.attention_key_mass import attention_key_mass
from .ops.fdg_combine import fdg_combine
from .ops.gaussian_blur_2d import gaussian_blur_2d
from .ops.guidance_combine import (apg_combine, apg_mix, apg_momentum_buffer, cfg_zero_star_combine, guidance_combine,
                                   mag_combine, tcfg_combine)
from .ops.guided_attention import guided_attention
from .ops.sag_degrade import sag_degrade, sag_map_grid
from .sag_masks import attention_mask, global_mask, high_frequency_mask, random_patch_mask, square_patch_mask
from .terms import (
    Guidance,
    Term,
    adaptive_pag_scale,
    autoguidance,
    cfg,
    guidance_interval,
    icg,
    icg_noise_condition,
    icg_random_labels,
    interval_schedule,
    kucvlab_pag,
    pag,
    sag,
    seg,
    sigma_interval,
    sims,
)

__all__ = [
    "__version__",
    "BackendError",
    "use_backend",
    "guidance_combine",
    "apg_combine",
    "apg_momentum_buffer",
    "cfg_zero_star_combine",
    "tcfg_combine",
    "mag_combine",
    "apg_mix",
    "fdg_combine",
    "gaussian_blur_2d",
    "guided_attention",
    "Guidance",
    "Term",
    "cfg",
    "pag",
    "seg",
    "sag",
    "autoguidance",
    "icg",
    "sims",
    "kucvlab_pag",
    "adaptive_pag_scale",
    "guidance_interval",
    "interval_schedule",
    "sigma_interval",
    "icg_random_labels",
    "icg_noise_condition",
    "attention_key_mass",
    "sag_degrade",
    "sag_map_grid",
    "attention_mask",
    "global_mask",
    "random_patch_mask",
    "square_patch_mask",
    "high_frequency_mask",
]

from . import backends as _backends  # noqa: E402

_backends.check_environment()  # every op is registered now: an unknown op name in the env var is an error

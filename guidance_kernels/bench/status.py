"""What backs each op's backend priority: a measurement on a GPU, or a prediction.

This is the one place that status is written: ``python -m guidance_kernels info`` prints it next to
each op's priority list, and benchmarks/README.md points here. No GPU run has been recorded yet, so
every entry is a prediction (bytes / FLOPs counted, the sm_90 SASS of the AOT lane read). When a GPU
run's folder is committed under ``benchmarks/results/<date>-<gpu>-<commit>/``, set
:data:`MEASURED_IN` to it, and for each op whose order the run confirms (or that was reordered to
match it) change the basis to ``"measured"`` with what the run showed.
"""

from __future__ import annotations

from dataclasses import dataclass

# The results folder of the GPU run that the "measured" entries cite (None: no GPU run yet).
MEASURED_IN: str | None = None


@dataclass(frozen=True)
class Status:
    basis: str  # "predicted" or "measured"
    why: str


PRIORITIES = {
    "guidance_combine": Status("predicted", "cuda before triton: the same single pass, 16-byte vector loads, and "
                                            "no Triton launcher on the host path (issue 12 §1)"),
    "apg_combine": Status("predicted", "cuda before triton, as guidance_combine"),
    "cfg_zero_star_combine": Status("predicted", "cuda before triton, as guidance_combine"),
    "tcfg_combine": Status("predicted", "cuda before triton, as guidance_combine"),
    "mag_combine": Status("predicted", "cuda before triton, as guidance_combine"),
    "fdg_combine": Status("predicted", "cuda before triton: the same launches (pyramid, statistics, rebuild); "
                                        "the CUDA glue plans them with no Triton launcher on the host path"),
    "sag_degrade": Status("predicted", "cuda before triton, as guidance_combine"),
    "gaussian_blur_2d": Status("predicted", "triton before torch: one separable pass instead of the reference's "
                                            "k×k convolution"),
    "guided_attention": Status("predicted", "triton_sdpa (pre-passes + torch SDPA, our kernel only for identity "
                                            "/ σ = ∞ items) before triton (one fused launch, predicted at "
                                            "0.35-0.9x of FA2/cuDNN on sm_90, issue 12 §3) before torch"),
    "attention_key_mass": Status("predicted", "triton before torch: the mass without the (N, N) map, "
                                              "predicted 2-3x SDPA time (issue 12 §3)"),
}


def describe(op: str) -> str:
    """'predicted (no GPU run yet): why' or 'measured (folder): why'."""
    status = PRIORITIES.get(op)
    if status is None:
        return "predicted (no GPU run yet; no note for this op)"
    if status.basis == "measured":
        return f"measured ({MEASURED_IN}): {status.why}"
    return f"predicted ({'no GPU run yet' if MEASURED_IN is None else 'not confirmed by ' + MEASURED_IN}): {status.why}"

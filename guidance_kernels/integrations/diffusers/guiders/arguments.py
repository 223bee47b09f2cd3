"""Constructor argument checks of the guiders, by argument name, before diffusers' constructor
runs: a bad value raises ``ValueError`` / ``TypeError`` as ``"<Guider>: <argument>: <message>"``
(diffusers' own constructors accept e.g. a string scale or a NaN and fail later, inside a step).
What diffusers' constructor still refuses (both of ``*_layers`` and ``*_config``, list lengths of
FDG) is re-raised in the same form, the argument taken from its message.
"""

from __future__ import annotations

import functools
import inspect
import re

from guidance_kernels import _checks

# finite real numbers
NUMBERS = ("guidance_scale", "perturbed_guidance_scale", "skip_layer_guidance_scale", "seg_guidance_scale", "eta",
           "pag_scale", "seg_scale", "slg_scale")
# real numbers >= 0
NON_NEGATIVE = ("alpha", "adaptive_projected_guidance_rescale")
# fractions of the schedule in [0, 1], as (start, stop) pairs
INTERVALS = (("start", "stop"), ("perturbed_guidance_start", "perturbed_guidance_stop"),
             ("skip_layer_guidance_start", "skip_layer_guidance_stop"), ("seg_guidance_start", "seg_guidance_stop"))
FLAGS = ("enabled", "use_original_formulation", "upcast_to_double")
CHOICES = {"guidance_rescale_space": ("data", "freq"), "slg_skip": ("block", "attention", "ff"),
           "seg_blur": ("frame", "3d")}


def _number(fn: str, arg: str, value, minimum: float | None = None) -> float:
    return _checks.finite_number(fn, arg, value, minimum=minimum)


def _fraction(fn: str, arg: str, value) -> float:
    value = _number(fn, arg, value)
    if not 0.0 <= value <= 1.0:
        _checks.fail(fn, arg, f"a fraction of the schedule must be in [0, 1], got {value}")
    return value


def _numbers(fn: str, arg: str, value, check) -> list:
    """One number, or a list / tuple of them (FDG's per-level arguments)."""
    if isinstance(value, (list, tuple)):
        if not value:
            _checks.fail(fn, arg, "expected at least one value")
        return [check(fn, f"{arg}[{i}]", v) for i, v in enumerate(value)]
    return [check(fn, arg, value)]


def _rescale(fn: str, arg: str, value) -> float:
    value = _number(fn, arg, value)
    if not 0.0 <= value <= 1.0:
        _checks.fail(fn, arg, f"guidance rescale φ must be in [0, 1], got {value}")
    return value


def check(fn: str, args: dict) -> None:
    """Check the bound constructor arguments ``args`` of guider ``fn``."""
    for name in NUMBERS:
        if name in args:
            _number(fn, name, args[name])
    for name in NON_NEGATIVE:
        if name in args:
            _number(fn, name, args[name], minimum=0.0)
    if "guidance_scales" in args:  # FDG: one per level
        value = args["guidance_scales"]
        if not isinstance(value, (list, tuple)) or not value:
            _checks.fail(fn, "guidance_scales", f"expected a list of per-level scales (highest frequency first), got "
                                                f"{value!r}", TypeError)
        _numbers(fn, "guidance_scales", value, _number)
    if "guidance_scales" in args:  # diffusers' FDG takes a float (not an int) or a list per level
        for name in ("guidance_rescale", "parallel_weights", "start", "stop"):
            value = args.get(name)
            if value is not None and not isinstance(value, (float, list, tuple)):
                _checks.fail(fn, name, f"expected a float or a list (one per level), got {value!r}", TypeError)
    if "guidance_rescale" in args:
        _numbers(fn, "guidance_rescale", args["guidance_rescale"], _rescale)
    if args.get("parallel_weights") is not None:
        _numbers(fn, "parallel_weights", args["parallel_weights"], _number)
    for start, stop in INTERVALS:
        if start not in args:
            continue
        starts, stops = _numbers(fn, start, args[start], _fraction), _numbers(fn, stop, args[stop], _fraction)
        if len(starts) == len(stops) and any(a > b for a, b in zip(starts, stops)):
            _checks.fail(fn, f"{start}/{stop}", f"need {start} <= {stop}, got {args[start]} and {args[stop]}")
    for name in FLAGS:
        if name in args and not isinstance(args[name], bool):
            _checks.fail(fn, name, f"expected True or False, got {args[name]!r}", TypeError)
    for name, choices in CHOICES.items():
        if name in args and args[name] not in choices:
            _checks.fail(fn, name, f"must be one of {choices}, got {args[name]!r}")
    if args.get("adaptive_projected_guidance_momentum") is not None:
        _number(fn, "adaptive_projected_guidance_momentum", args["adaptive_projected_guidance_momentum"])
    if "zero_init_steps" in args:
        _checks.integer(fn, "zero_init_steps", args["zero_init_steps"], minimum=0)
    for name in ("seg_blur_sigma", "seg_blur_threshold_inf"):
        if name in args:
            _checks.sigma(fn, name, args[name])
    if args.get("dropout") is not None:
        _number(fn, "dropout", args["dropout"], minimum=0.0)


def _argument_of(message: str, names) -> str:
    """The constructor argument a diffusers message is about (its first back-quoted name)."""
    for quoted in re.findall(r"`(\w+)`", message):
        if quoted in names:
            return quoted
    return "arguments"


def checked(fn: str, init):
    """``init`` (a guider constructor) with :func:`check` before it and its ValueErrors named.
    ``functools.wraps`` keeps the signature, which diffusers' ``from_config`` reads."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{fn}: arguments: {exc}") from None
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        check(fn, values)
        try:
            init(self, *args, **kwargs)
        except ValueError as exc:
            message = str(exc)
            if message.startswith(f"{fn}: "):
                raise
            raise ValueError(f"{fn}: {_argument_of(message, values)}: {message}") from None
        self._check_configuration()

    __init__._guider_checked = True
    return __init__

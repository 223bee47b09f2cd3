"""The bench PNG: one small panel per op family, the speed-up of every provider over the case's
baseline (log scale; the black line at 1 is the baseline itself, the eager formula unless the
panel says otherwise), this package's backends in warm colours, the others in cold ones, and each
goal as a dashed red line over its case (GPU runs; elsewhere goals are not evaluated)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from .harness import COMPILED, Case

_OTHER_COLOURS = ["#9e9e9e", "#17becf", "#2ca02c", "#bcbd22", "#9467bd", "#8c564b", "#7f7f7f", "#aec7e8"]
_OUR_COLOURS = ["#d62728", "#ff7f0e", "#e377c2", "#8b0000", "#ffbb78", "#ff9896"]
_COLUMNS = 3
_CASES_PER_COLUMN = 6


def _colours(rows) -> dict[str, str]:
    """Colours of one panel's providers in order of appearance (ours warm, the others cold)."""
    ours, other, colours = iter(_OUR_COLOURS * 3), iter(_OTHER_COLOURS * 3), {COMPILED: "#1f77b4"}
    for r in rows:
        if r.provider not in colours:
            colours[r.provider] = next(ours) if r.ours else next(other)
    return colours


def _log_axis(ax, values: list[float]) -> None:
    """Log y axis with plain labels (0.5x, 1x, 2x...) spanning the values and 1."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    low, high = min(values + [1.0]) / 1.3, max(values + [1.0]) * 1.3
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0**e for e in decades for m in mantissas if low <= m * 10.0**e <= high]
        if len(ticks) >= 3:
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.tick_params(axis="y", labelsize=7)


def _panel(ax, run, family: str, cases: list[Case]) -> None:
    per_case = [[r for r in run.rows(c) if r.provider != c.baseline] for c in cases]
    colours = _colours([r for rows in per_case for r in rows])
    width = min(0.25, 0.8 / max([1] + [len(rows) for rows in per_case]))
    values, drawn, ticks = [], set(), []
    for x, (case, rows) in enumerate(zip(cases, per_case)):
        start = x - width * (len(rows) - 1) / 2
        for i, r in enumerate(rows):
            if r.speedup:
                ax.bar(start + i * width, r.speedup, width, color=colours[r.provider],
                       label=None if r.provider in drawn else r.provider)
                drawn.add(r.provider)
                values.append(r.speedup)
        for v in run.verdicts:
            if v.op == case.op and v.case == case.name and v.required_speedup:
                half = max(0.2, width * len(rows) / 2 + 0.05)
                ax.hlines(v.required_speedup, x - half, x + half, colors="red", linestyles="--", linewidth=1.3,
                          label=None if "goal" in drawn else "goal")
                drawn.add("goal")
                values.append(v.required_speedup)
        label = case.name if len({c.baseline for c in cases}) == 1 else f"{case.name} (vs {case.baseline})"
        ticks.append("\n".join(textwrap.wrap(label, 14)[:3]))
    ax.axhline(1.0, color="black", linewidth=0.8)
    _log_axis(ax, values)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(ticks, fontsize=6)
    baselines = {c.baseline for c in cases}
    ax.set_title(f"{family}: speed-up over " + (baselines.pop() if len(baselines) == 1 else "each case's baseline"),
                 fontsize=8)
    ax.legend(fontsize=5.5, ncol=2, loc="best", framealpha=0.7)


def _message(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 50)), ha="center", va="center", fontsize=8,
            transform=ax.transAxes)


def plot(run, path: Path) -> Path | None:
    """Draw ``path``; None when matplotlib is missing (the JSON and table are still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    families: dict[str, list[Case]] = {}
    for case in run.cases:
        families.setdefault(case.family, []).append(case)
    panels = [(name, min(_COLUMNS, math.ceil(len(cases) / _CASES_PER_COLUMN))) for name, cases in families.items()]
    panels += [(name, 1) for name in list(run.skipped) + list(run.failed)]
    if not panels:
        return None
    # lay the panels out row by row, a family with many cases spanning several columns
    placed, row, col = [], 0, 0
    for name, span in panels:
        if col + span > _COLUMNS:
            row, col = row + 1, 0
        placed.append((name, row, col, span))
        col += span
    fig = plt.figure(figsize=(5.2 * _COLUMNS, 3.6 * (row + 1)))
    grid = fig.add_gridspec(row + 1, _COLUMNS)
    for name, r, c, span in placed:
        ax = fig.add_subplot(grid[r, c:c + span])
        if name in families:
            _panel(ax, run, name, families[name])
        elif name in run.skipped:
            _message(ax, f"{name}: skipped: {run.skipped[name]}")
        else:
            _message(ax, f"{name}: FAILED while building its cases: {run.failed[name]}")
    env = run.env
    fig.suptitle(f"guidance_kernels bench on {env['device_name']} ({env['device']}, {env['shapes']} shapes) — "
                 f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

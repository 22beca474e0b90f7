"""Matplotlib figures for the run report, written as small PNG files."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: importing this changes no global backend or state

PALETTE = ["#3367d6", "#e8710a", "#7cb342", "#8e24aa", "#757575"]
CURVES = [("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction")]


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=96, bbox_inches="tight")


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def training_curves(log: list[dict], path: Path) -> list[str]:
    """Loss, FVU, L0 and dead fraction against the step; returns the curves that had data."""
    present = [(key, title) for key, title in CURVES if any(_number(r.get(key)) is not None for r in log)]
    if not present:
        return []
    fig = Figure(figsize=(3.4 * len(present), 2.8))
    axes = fig.subplots(1, len(present), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        pts = [(r.get("step", i), _number(r.get(key))) for i, r in enumerate(log)]
        pts = [(s, v) for s, v in pts if v is not None and _number(s) is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], color="#3367d6", linewidth=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("loss", "fvu") and all(v > 0 for _, v in pts) and max(v for _, v in pts) > 20 * min(v for _, v in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return [key for key, _ in present]


def histograms(series: list[tuple[str, list, list, str]], path: Path, title: str) -> None:
    """Precomputed histograms ``(label, counts, edges, x label)`` drawn as steps on one axis."""
    fig = Figure(figsize=(5.6, 2.9))
    ax = fig.subplots()
    for i, (label, counts, edges, _) in enumerate(series):
        ax.stairs(counts, edges, label=label, linewidth=1.6, fill=len(series) == 1, color=PALETTE[i % len(PALETTE)])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(series[0][3], fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def score_bars(table: dict[str, dict[str, dict[str, float]]], columns: list[str], path: Path) -> None:
    """One panel per scorer: the explanation's mean score and each baseline's, per category.

    ``table[scorer][baseline][column]`` is a mean; missing cells are left out.
    """
    scorers = list(table)
    fig = Figure(figsize=(max(4.5, 0.9 * len(columns) + 2.5) * len(scorers) ** 0.8, 3.0))
    axes = fig.subplots(1, len(scorers), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        baselines = list(table[scorer])
        width = 0.8 / max(1, len(baselines))
        for j, baseline in enumerate(baselines):
            xs = [i + j * width for i, c in enumerate(columns) if c in table[scorer][baseline]]
            ys = [table[scorer][baseline][c] for c in columns if c in table[scorer][baseline]]
            label = "explanation" if baseline == "none" else baseline
            ax.bar(xs, ys, width=width, label=label, color=PALETTE[j % len(PALETTE)])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))])
        ax.set_xticklabels(columns, fontsize=7, rotation=30, ha="right")
        ax.set_title(scorer, fontsize=10)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)

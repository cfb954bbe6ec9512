"""One look for every figure in the book, and the plots the chapters share."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def style() -> None:
    """Set the book's matplotlib style: small clean axes, light grid, a fixed colour cycle."""
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 3.2),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            # Large enough to read when a 7-inch figure shrinks to a phone's width.
            "font.size": 12,
            "axes.titlesize": 12,
            "axes.labelsize": 12,
            "xtick.labelsize": 11,
            "ytick.labelsize": 11,
            "legend.fontsize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.prop_cycle": mpl.cycler(color=COLORS),
            "legend.frameon": False,
            "figure.constrained_layout.use": True,
        }
    )


def unit_histograms(
    stages: Mapping[str, np.ndarray], units: Sequence[int], bins: int = 20
) -> tuple[plt.Figure, np.ndarray]:
    """Histograms of a few hidden units (columns of z) at several stages, one panel per stage.

    stages: title -> array (m, n), e.g. {"z": z, "z_norm": z_norm}; units: column indices.
    Each panel overlays the chosen units, one colour per unit, on shared bin edges; the
    panels are stacked (one above the other), so that each stays readable on a phone.
    Returns the figure and its array of axes (one per stage).
    """
    fig, axes = plt.subplots(len(stages), 1, figsize=(7.0, 2.4 * len(stages)), squeeze=False)
    axes = axes[:, 0]
    for ax, (title, z) in zip(axes, stages.items()):
        edges = np.histogram_bin_edges(z[:, list(units)], bins=bins)
        for j, unit in enumerate(units):
            ax.hist(z[:, unit], bins=edges, alpha=0.5, color=COLORS[j % len(COLORS)], label=f"unit {unit}")
        ax.set_title(title)
        ax.set_xlabel("value")
        ax.set_ylabel("examples")
    axes[0].legend()
    return fig, axes


def unit_stages(
    stages: Mapping[str, np.ndarray], units: Sequence[int], seed: int = 0
) -> tuple[plt.Figure, np.ndarray]:
    """Two panels: a few units' values at each stage, and every unit's (mean, std) per stage.

    stages: title -> array (m, n), e.g. {"z": z, "z_norm": z_norm}; units: column indices.
    Left: one row per (unit, stage), the m values as jittered dots, the mean as a bar; right:
    one dot per unit and stage at (batch mean, batch std), one colour per stage.
    Returns the figure and its two axes.
    """
    rng = np.random.default_rng(seed)
    fig, (ax_values, ax_moments) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    ticks, labels = [], []
    for k, unit in enumerate(units):
        for s, (title, z) in enumerate(stages.items()):
            y = k * (len(stages) + 1) + s
            values = z[:, unit]  # (m,)
            jitter = rng.uniform(-0.25, 0.25, size=len(values))
            ax_values.plot(values, y + jitter, ".", ms=3, color=COLORS[s], alpha=0.6)
            ax_values.plot([values.mean()] * 2, [y - 0.4, y + 0.4], color="k", lw=1.5)
            ticks.append(y)
            labels.append(f"unit {unit}: {title}")
    ax_values.set_yticks(ticks, labels, fontsize=7)
    ax_values.invert_yaxis()
    ax_values.set_xlabel("value (dots: the batch; bar: its mean)")
    for s, (title, z) in enumerate(stages.items()):
        ax_moments.plot(z.mean(axis=0), z.std(axis=0), "o", ms=4, color=COLORS[s],
                        alpha=0.7, label=title)
    ax_moments.set_xlabel("batch mean of the unit")
    ax_moments.set_ylabel("batch std of the unit")
    ax_moments.set_title(f"all {stages[next(iter(stages))].shape[1]} units, one dot each")
    ax_moments.legend(fontsize=8)
    return fig, np.array([ax_values, ax_moments])


def power_of_ten_above(x: float) -> float:
    """The smallest power of ten >= x > 0: a round-off error shown as "below 1e-15" stays the
    same printed number when its last bits change (a stored output nbval compares)."""
    if not (x > 0 and np.isfinite(x)):
        raise ValueError(f"expected a positive finite number, got {x!r}")
    return float(10.0 ** np.ceil(np.log10(x)))

"""The figures a pathologist expects: confusion matrix and Kaplan-Meier curves by risk group.

Figures are built without pyplot (no global state, no display backend needed); each function
draws on a given Axes or a new one and returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from lifelines import KaplanMeierFitter
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def new_axes(figsize: tuple[float, float] = (5.0, 4.0)) -> Axes:
    """A fresh Axes on its own Figure (reach the figure with `ax.figure`)."""
    return Figure(figsize=figsize, layout="constrained").subplots()


def plot_confusion(
    matrix: np.ndarray, classes: Sequence[str], ax: Axes | None = None, title: str = ""
) -> Axes:
    """Row-normalised confusion matrix (rows = true class) with the raw counts written in."""
    ax = ax or new_axes()
    counts = np.asarray(matrix)  # (classes, classes)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    ax.figure.colorbar(image, ax=ax, label="share of true class")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if share[i, j] > 0.5 else "k")
    ax.set_title(title or "confusion matrix (out-of-fold)")
    return ax


def plot_kaplan_meier(
    fitters: Mapping[str, KaplanMeierFitter],
    p_value: float | None = None,
    ax: Axes | None = None,
    time_unit: str = "months",
) -> Axes:
    """Kaplan-Meier curves with confidence bands, one per group, log-rank p in the title."""
    ax = ax or new_axes()
    for fitter in fitters.values():
        fitter.plot_survival_function(ax=ax, ci_show=True, show_censors=True)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    p_text = "" if p_value is None else f" (log-rank p = {p_value:.2g})"
    ax.set_title("Kaplan-Meier by predicted risk" + p_text)
    return ax

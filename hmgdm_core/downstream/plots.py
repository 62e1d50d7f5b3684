"""The figures a pathologist expects: confusion matrix, ROC curves, Kaplan-Meier curves by
risk group, and accuracy against the share of labelled patients.

Figures are built without pyplot (no global state, no display backend needed); each function
draws on a given Axes or a new one and returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from lifelines import KaplanMeierFitter
from matplotlib.axes import Axes
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import pandas as pd


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


def plot_roc(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    ax: Axes | None = None,
    title: str = "",
) -> Axes:
    """One-vs-rest ROC curve of each class from out-of-fold probabilities (n, classes), with
    its AUC in the legend; classes absent from `y_true` (or alone in it) have no curve."""
    from sklearn.metrics import roc_auc_score, roc_curve

    ax = ax or new_axes()
    y_true = np.asarray(y_true).astype(str)
    for k, name in enumerate(classes):
        positive = y_true == str(name)
        if not 0 < positive.sum() < len(y_true):
            continue
        fpr, tpr, _ = roc_curve(positive, proba[:, k])
        auc = roc_auc_score(positive, proba[:, k])
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {auc:.3f}, n={positive.sum()})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "ROC, one class vs the rest (pooled out-of-fold)")
    return ax


def plot_label_efficiency(table: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Probe accuracy (mean ± std over folds and draws) against the share of training patients
    labelled, one line per feature set, from a `classify.label_efficiency` table."""
    ax = ax or new_axes((5.5, 4.0))
    for name, rows in table.groupby("features", sort=False):
        ax.errorbar(
            100 * rows["share"], rows["accuracy_mean"], yerr=rows["accuracy_std"],
            marker="o", capsize=3, lw=1.6, label=str(name),
        )  # fmt: skip
    ax.set_xscale("log")
    shares = sorted(table["share"].unique())
    ax.set_xticks([100 * s for s in shares], labels=[f"{100 * s:g}%" for s in shares])
    ax.minorticks_off()
    ax.set_xlabel("share of each training fold's patients labelled")
    ax.set_ylabel("accuracy on the fold's test patients")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("label efficiency (same folds and patients for every line)")
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

"""A study's report: the summary table (mean ± std over seeds), `report.md` and its PNG plots
(utility vs epsilon, regimes side by side, per-site spread), and the rich table for the console.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from hmgdm_core.atomic import atomic_write, save_figure
from hmgdm_core.downstream.plots import new_axes

KEYS = ["sites", "partition", "regime", "noise"]
ORDER = ("local", "centralized", "fedavg", "fedprox", "central_dp", "local_dp",
         "random_init", "graphmae", "raw")  # fmt: skip


_FAMILY_COLOUR = {
    "local": "tab:orange", "centralized": "tab:green", "fedavg": "tab:blue", "fedprox": "tab:blue",
    "central_dp": "tab:purple", "local_dp": "tab:purple",
}  # fmt: skip


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: metrics as mean and std over seeds, in regime order."""
    metric = "cindex" if results["accuracy"].isna().all() else "accuracy"
    frame = results.assign(noise=pd.to_numeric(results["noise"]).fillna(0.0))
    agg = frame.groupby(KEYS, sort=False).agg(
        seeds=("seed", "nunique"),
        utility=(metric, "mean"),
        utility_std=(metric, "std"),
        worst=(f"{metric}_worst", "mean"),
        macro_f1=("macro_f1", "mean"),
        epsilon=("epsilon", "mean"),
        seconds=("seconds", "mean"),
        mbytes=("bytes_sent", lambda b: b.mean() / 1e6),
    )
    agg = agg.reset_index()
    agg["rank"] = agg["regime"].map({r: i for i, r in enumerate(ORDER)})
    agg = agg.sort_values(["sites", "partition", "rank", "noise"]).drop(columns="rank")
    agg.attrs["metric"] = metric
    return agg


_PROTOCOL = {
    "accuracy": "Accuracy of the linear probe on frozen embeddings, the same grouped folds for "
    "every cell; worst site = the weakest hospital (local-only: its own encoder; others: "
    "out-of-fold accuracy on its images).",
    "cindex": "C-index of Cox regression on clinical covariates, the same patient folds for "
    "every cell; sites = tissue source sites; worst site = the weakest site's own Cox model.",
}


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _cells(row: pd.Series) -> list[str]:
    noise = f"{row.noise:g}" if row.noise else "–"
    spread = f" ± {_fmt(row.utility_std)}" if row.seeds > 1 else ""
    return [
        str(row.sites), row.partition, row.regime, noise, _fmt(row.epsilon, 2),
        f"{_fmt(row.utility)}{spread}", _fmt(row.worst), _fmt(row.macro_f1),
        f"{row.seconds:.1f}", _fmt(row.mbytes, 2),
    ]  # fmt: skip


def _header(metric: str) -> list[str]:
    return ["sites", "partition", "regime", "noise", "epsilon", metric, "worst site", "macro-F1",
            "seconds", "MB sent"]  # fmt: skip


def markdown_table(summary: pd.DataFrame) -> str:
    head = _header(summary.attrs.get("metric", "accuracy"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in summary.itertuples()]
    return "\n".join(lines)


def rich_table(summary: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for name in _header(summary.attrs.get("metric", "accuracy")):
        table.add_column(name, justify="left" if name in ("partition", "regime") else "right")
    for row in summary.itertuples():
        table.add_row(*_cells(row))
    return table


def plot_epsilon(results: pd.DataFrame, metric: str):
    """Utility vs epsilon of the DP regimes, with the non-private references as lines."""
    ax = new_axes((6, 4))
    dp = results.dropna(subset=["epsilon"])
    for regime, part in dp.groupby("regime"):
        pts = part.groupby("noise").agg(eps=("epsilon", "mean"), u=(metric, "mean"))
        ax.plot(pts["eps"], pts["u"], marker="o", label=regime)
    for regime, style in (("centralized", "--"), ("fedavg", ":"), ("local", "-.")):
        if (results["regime"] == regime).any():
            level = results.loc[results.regime == regime, metric].mean()
            ax.axhline(level, ls=style, c="grey")
            ax.annotate(
                regime, (1, level), xycoords=("axes fraction", "data"), ha="right", va="bottom"
            )
    if len(dp):
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        # Ticks at the epsilons reached: log-axis labels like 3x10^1 4x10^1 would overlap.
        eps = sorted(dp.groupby(["regime", "noise"])["epsilon"].mean())
        ax.set_xticks(eps, [f"{e:.3g}" for e in eps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    ax.set(xlabel="epsilon (δ as configured)", ylabel=metric, title="utility vs privacy")
    return ax


def plot_regimes(summary: pd.DataFrame, metric: str):
    """Mean utility (± std over seeds) of every regime, one group of bars per partition."""
    ax = new_axes((max(6, 0.5 * len(summary)), 4))
    labels = [
        f"{r.regime}" + (f" z={r.noise:g}" if r.noise else "") + f"\n{r.partition} s{r.sites}"
        for r in summary.itertuples()
    ]
    x = np.arange(len(summary))
    colours = [_FAMILY_COLOUR.get(r, "tab:grey") for r in summary["regime"]]
    ax.bar(x, summary["utility"], yerr=summary["utility_std"].fillna(0), color=colours)
    ax.scatter(x, summary["worst"], marker="v", color="black", zorder=3, label="worst site")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.legend(loc="lower right", fontsize=8)
    ax.set(ylabel=metric, title="federated vs centralized vs local (mean ± std over seeds)")
    return ax


def plot_site_spread(results: pd.DataFrame):
    """Per-site accuracy of every regime (out-of-fold, or each site's own encoder if local)."""
    ax = new_axes((6, 4))
    regimes = [r for r in ORDER if r in set(results["regime"])]
    data = [
        [a for s in results.loc[results.regime == r, "site_accuracy"] for a in json.loads(s)]
        for r in regimes
    ]
    ax.boxplot(data, tick_labels=regimes)
    ax.tick_params(axis="x", rotation=45)
    ax.set(ylabel="accuracy per site", title="per-site spread")
    return ax


def write_report(out: Path, results: pd.DataFrame, title: str) -> pd.DataFrame:
    """OUT/report.md and OUT/*.png from the results table; returns the summary table."""
    out = Path(out)
    summary = summarise(results)
    metric = summary.attrs["metric"]
    plots = {"utility_vs_epsilon.png": plot_epsilon(results, metric),
             "regimes.png": plot_regimes(summary, metric)}  # fmt: skip
    if metric == "accuracy":
        plots["site_spread.png"] = plot_site_spread(results)
    for name, ax in plots.items():
        save_figure(out / name, ax.figure, private=False)
    text = "\n".join([
        f"# Study: {title}", "",
        f"{len(results)} runs (cell x seed); mean ± std over seeds. " + _PROTOCOL[metric],
        "", markdown_table(summary), "",
        *[f"![{name[:-4]}]({name})" for name in plots], "",
    ])  # fmt: skip
    atomic_write(out / "report.md", lambda p: p.write_text(text), private=False)
    return summary

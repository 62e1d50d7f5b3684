"""`hmgdm-server report RUN_DIR`: one self-contained HTML page of a federated pretraining run
(plots as inline PNG, inline CSS, nothing fetched from the network): losses and every other
metric per round, which site took part in which round, epsilon per site, round times, and the
tables of rounds, sites and failure reasons. Built from RUN_DIR/run_summary.json alone.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from hmgdm_core.atomic import atomic_write
from hmgdm_core.exceptions import HmgdmError
from server.summary import read_run_summary

REPORT_NAME = "report.html"
# Metrics that are not figures of the model (plotted elsewhere or counts).
BOOKKEEPING = {"loss", "num-examples", "num-steps", "seconds", "dp-weight"}
# Participation colours: used (green), failed or refused (orange), dropped by validation (red).
COLOURS = {"replied": "#2ca02c", "failed": "#ff7f0e", "dropped": "#d62728"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } .failed { color: #b00; font-weight: bold; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _png(fig) -> str:
    """A matplotlib figure as an <img> with the PNG inline (data URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _sites(rounds: list[dict[str, Any]]) -> list[str]:
    names = {s for r in rounds for k in ("replied", "failed", "dropped") for s in r[k]}
    return sorted(names)


def _figures(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, <img>) for each plot the run has data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    figures = []
    for draw in (_loss_plot, _metrics_plot, _participation_plot, _privacy_plot, _time_plot):
        if (drawn := draw(plt, rounds, [r["round"] for r in rounds])) is not None:
            caption, fig = drawn
            figures.append((caption, _png(fig)))
            plt.close(fig)
    return figures


def _loss_plot(plt, rounds: list[dict[str, Any]], x: list[int]):
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for key, label, colour in (("train_loss", "train (mean of sites)", "#1f77b4"),
                               ("eval_loss", "held-out", "#17becf")):  # fmt: skip
        pts = [(r["round"], r[key]) for r in rounds if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label, color=colour)
    for r in rounds:
        if not r["aggregated"]:
            ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, color=COLOURS["failed"], alpha=0.15)
    ax.set(xlabel="round", ylabel="loss", xticks=x)
    if ax.lines:
        ax.legend()
    return "Loss per round (shaded: round not aggregated).", fig


def _metrics_plot(plt, rounds: list[dict[str, Any]], x: list[int]):
    extra = sorted({f"{part}/{k}" for r in rounds for part in ("train", "eval")
                    for k in r.get(part, {}) if k not in BOOKKEEPING})  # fmt: skip
    if not extra:
        return None
    cols = min(4, len(extra))
    rows = -(-len(extra) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, extra, strict=False):
        part, key = name.split("/", 1)
        pts = [(r["round"], r[part][key]) for r in rounds if key in r.get(part, {})]
        ax.plot(*zip(*pts, strict=True), marker="o", color="#9467bd")
        ax.set_title(name, fontsize="small")
        ax.set_xticks(x)
    for ax in list(axes.flat)[len(extra) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return ("Every other metric the sites reported, per round (train: mean over the sites that "
            "trained; eval: over their held-out graphs).", fig)  # fmt: skip


def _participation_plot(plt, rounds: list[dict[str, Any]], x: list[int]):
    from matplotlib.colors import ListedColormap

    sites = _sites(rounds)
    if not sites:
        return None
    codes = {"": 0, "replied": 1, "failed": 2, "dropped": 3}
    grid = [[codes[next((k for k in ("replied", "failed", "dropped") if s in r[k]), "")]
             for r in rounds] for s in sites]  # fmt: skip
    cmap = ListedColormap(["#ffffff", COLOURS["replied"], COLOURS["failed"], COLOURS["dropped"]])
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * len(sites)))
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=3, aspect="auto", interpolation="nearest")
    ax.set(xticks=range(len(x)), xticklabels=x, yticks=range(len(sites)), yticklabels=sites,
           xlabel="round")  # fmt: skip
    return ("Participation: green = update used, orange = failed or refused, red = dropped by "
            "validation, white = not asked.", fig)  # fmt: skip


def _privacy_plot(plt, rounds: list[dict[str, Any]], x: list[int]):
    eps_sites = sorted({s for r in rounds for s in r.get("site_epsilon", {})})
    central = [(r["round"], r["central_epsilon"]) for r in rounds if r.get("central_epsilon")]
    if not (eps_sites or central):
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for site in eps_sites:
        pts = [(r["round"], r["site_epsilon"][site]) for r in rounds
               if site in r.get("site_epsilon", {})]  # fmt: skip
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{site} (local DP)")
    if central:
        ax.plot(*zip(*central, strict=True), marker="s", color="k", label="central DP")
    ax.set(xlabel="round", ylabel="epsilon spent", xticks=x)
    ax.legend(fontsize="small")
    return "Privacy: epsilon spent so far, per site (its ledger) and for the run.", fig


def _time_plot(plt, rounds: list[dict[str, Any]], x: list[int]):
    fig, ax = plt.subplots(figsize=(8, 3.0))
    ax.bar(x, [r["seconds"] for r in rounds], color="#aec7e8", label="round")
    slowest = [(r["round"], max(r["site_seconds"].values())) for r in rounds
               if r.get("site_seconds")]  # fmt: skip
    if slowest:
        ax.plot(*zip(*slowest, strict=True), "o-", color="#8c564b", label="slowest site training")
    ax.set(xlabel="round", ylabel="seconds", xticks=x)
    ax.legend(fontsize="small")
    return "Round time, and the slowest site's own training time in it.", fig


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_report(summary: dict[str, Any]) -> str:
    """The HTML page of a run summary (see server.summary.run_summary)."""
    rounds = summary["rounds"]
    status = html.escape(summary["status"])
    facts = [
        ["status", summary["status"]],
        ["why", summary.get("reason") or "-"],
        ["rounds aggregated / run / planned",
         f"{summary['rounds_aggregated']} / {summary['rounds_run']} / {summary['rounds_planned']}"],
        ["final train loss", _fmt(summary.get("final_train_loss"))],
        ["wall time", f"{summary['wall_seconds']:.1f} s"],
        ["final checkpoint", summary.get("final_checkpoint") or "none (the run did not train)"],
        ["run directory", summary["run_dir"]],
    ]  # fmt: skip
    if central := summary.get("central_dp"):
        facts.append(
            ["central DP", f"epsilon {central['epsilon']:.4f} at delta {central['delta']:g}"]
        )
    round_rows = [
        [r["round"], r["stage"], ", ".join(r["replied"]) or "-",
         "; ".join(f"{s}: {why}" for s, why in {**r["failed"], **r["dropped"]}.items()) or "-",
         _fmt(r["train_loss"]), _fmt(r["eval_loss"]), "yes" if r["aggregated"] else "NO",
         f"{r['seconds']:.1f}"]
        for r in rounds
    ]  # fmt: skip
    site_rows = [
        [name, s["rounds_replied"], s["rounds_failed"], s["updates_dropped"], _fmt(s["epsilon"])]
        for name, s in summary["sites"].items()
    ]
    figures = "".join(
        f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, img in _figures(summary)
    )
    failed = ' class="failed"' if summary["status"] == "failed" else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hmgdm run: {status}</title>
<style>{CSS}</style></head><body>
<h1>Federated pretraining run: <span{failed}>{status}</span></h1>
{_table(["", ""], facts)}
<h2>Curves</h2>{figures}
<h2>Rounds</h2>
{
        _table(
            [
                "round",
                "stage",
                "used",
                "failed or dropped (why)",
                "train loss",
                "eval loss",
                "aggregated",
                "s",
            ],
            round_rows,
        )
    }
<h2>Sites</h2>
{_table(["site", "rounds replied", "failed", "dropped", "local DP epsilon"], site_rows)}
</body></html>
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's report (default RUN_DIR/report.html) atomically; returns its path."""
    summary = read_run_summary(run_dir)
    if summary is None:
        raise HmgdmError(f"{run_dir}: no run_summary.json (not a federated pretraining run dir)")
    if "rounds" not in summary:
        why = summary.get("reason") or "see its log"
        raise HmgdmError(f"{run_dir}: the run stopped before its first round ({why})")
    text = render_report(summary)
    return atomic_write(
        Path(out or Path(run_dir) / REPORT_NAME), lambda p: p.write_text(text), private=False
    )

"""The run summary: `run_summary.json` (rounds, per-site participation and epsilon, central
DP, repeat malformed senders) rewritten after every round, and the tables printed at the end.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from hmgdm_core.atomic import write_json

SUMMARY_FILE = "run_summary.json"
FORMAT = "hmgdm-run-summary/1"
REPEAT_OFFENDER = 2  # malformed replies after which a site is named in the run summary


def malformed_counts(history: list[dict[str, Any]]) -> Counter[str]:
    """Site -> how many of its updates validation refused over the run."""
    return Counter(site for h in history for site in h.get("dropped", {}))


def _loss(metrics: dict | None) -> float | None:
    return float(metrics["loss"]) if metrics and "loss" in metrics else None


def run_summary(
    history: list[dict[str, Any]],
    *,
    status: str,
    run_dir: Path,
    rounds_planned: int,
    wall_seconds: float,
    final: Path | None = None,
) -> dict[str, Any]:
    """Everything an operator reads after a run, derived from the round history alone."""
    sites: dict[str, dict[str, Any]] = {}

    def site(name: str) -> dict[str, Any]:
        return sites.setdefault(
            name, {"rounds_replied": 0, "rounds_failed": 0, "updates_dropped": 0, "epsilon": None}
        )

    for h in history:
        for name in h["replied"]:
            site(name)["rounds_replied"] += 1
        for name in h["failed"]:
            site(name)["rounds_failed"] += 1
        for name in h.get("dropped", {}):
            site(name)["updates_dropped"] += 1
        for name, eps in h.get("site_epsilon", {}).items():
            site(name)["epsilon"] = float(eps)  # the ledger's running total: the last is the run's
    central = [h["central_dp"] for h in history if "central_dp" in h]
    return {
        "format": FORMAT,
        "status": status,
        "run_dir": str(run_dir),
        "final_checkpoint": str(final) if final else None,
        "rounds_planned": rounds_planned,
        "rounds_run": len(history),
        "rounds_aggregated": sum(bool(h["aggregated"]) for h in history),
        "wall_seconds": round(wall_seconds, 3),
        "final_train_loss": next(
            (loss for h in reversed(history) if (loss := _loss(h.get("train"))) is not None), None
        ),
        "rounds": [
            {
                "round": h["round"],
                "stage": h["stage"],
                "replied": h["replied"],
                "failed": h["failed"],
                "dropped": h.get("dropped", {}),
                "aggregated": h["aggregated"],
                "train_loss": _loss(h.get("train")),
                "eval_loss": _loss(h.get("eval")),
                "seconds": round(float(h.get("seconds", 0.0)), 3),
            }
            for h in history
        ],
        "sites": dict(sorted(sites.items())),
        "central_dp": central[-1] if central else None,
        "repeat_offenders": sorted(
            s for s, n in malformed_counts(history).items() if n >= REPEAT_OFFENDER
        ),
    }


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / SUMMARY_FILE, summary, private=False)


def read_run_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def summary_table(summary: dict[str, Any]):
    """Rounds (stage, sites used/asked, losses, time), per-site figures, privacy if any."""
    from rich.console import Group
    from rich.table import Table

    title = f"federated pretraining: {summary['status']}"
    rounds = Table(title=title, caption=f"checkpoint: {summary['final_checkpoint'] or '-'}")
    for col in ("round", "stage", "sites", "train loss", "eval loss", "aggregated", "s"):
        rounds.add_column(col, justify="right" if col in ("round", "s") else "left")

    def fmt(loss: float | None) -> str:
        return "-" if loss is None else f"{loss:.4f}"

    for r in summary["rounds"]:
        asked = len(r["replied"]) + len(r["failed"]) + len(r["dropped"])
        rounds.add_row(
            str(r["round"]), r["stage"], f"{len(r['replied'])}/{asked}", fmt(r["train_loss"]),
            fmt(r["eval_loss"]), "yes" if r["aggregated"] else "NO", f"{r['seconds']:.1f}",
        )  # fmt: skip
    sites = Table("site", "rounds replied", "failed", "dropped", "local DP epsilon")
    for name, s in summary["sites"].items():
        eps = "-" if s["epsilon"] is None else f"{s['epsilon']:.4f}"
        sites.add_row(
            name, str(s["rounds_replied"]), str(s["rounds_failed"]), str(s["updates_dropped"]), eps
        )
    parts = [rounds, sites]
    if (privacy := privacy_table(summary)) is not None:
        parts.append(privacy)
    return Group(*parts)


def privacy_table(summary: dict[str, Any]):
    """Central epsilon, each site's local epsilon, repeat malformed senders; None if none."""
    from rich.table import Table

    rows: list[tuple[str, str]] = []
    if central := summary["central_dp"]:
        rows.append(
            (
                "central DP epsilon (unit: one site)",
                f"{central['epsilon']:.4f} at delta {central['delta']:g}",
            )
        )
    rows += [
        (f"local DP epsilon: {name}", f"{s['epsilon']:.4f}")
        for name, s in summary["sites"].items()
        if s["epsilon"] is not None
    ]
    rows += [
        (f"malformed replies: {name}", f"{summary['sites'][name]['updates_dropped']} "
         "(repeat offender)")
        for name in summary["repeat_offenders"]
    ]  # fmt: skip
    if not rows:
        return None
    table = Table("privacy and validation", "value", title_justify="left")
    for row in rows:
        table.add_row(*row)
    return table


def print_run_summary(run_dir: Path) -> dict[str, Any] | None:
    """Print the tables of a run's summary (None when the run wrote none)."""
    from rich.console import Console

    summary = read_run_summary(run_dir)
    if summary is not None:
        Console().print(summary_table(summary))
    return summary

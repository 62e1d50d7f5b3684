"""The run summary: `run_summary.json` (rounds, per-site participation and epsilon, central
DP, repeat malformed senders) rewritten after every round, and the tables printed at the end;
the status of every run mode (finished, or failed and why) that the CLIs turn into exit codes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from hmgdm_core.atomic import write_json
from hmgdm_core.exceptions import HmgdmError
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.tracking import numeric

SUMMARY_FILE = "run_summary.json"
STATUS_FAILED = "failed"
FORMAT = "hmgdm-run-summary/1"
REPEAT_OFFENDER = 2  # malformed replies after which a site is named in the run summary


class RunFailed(HmgdmError):
    """A run ended without the model or report it was for; the message says why."""


def malformed_counts(history: list[dict[str, Any]]) -> Counter[str]:
    """Site -> how many of its updates validation refused over the run."""
    return Counter(site for h in history for site in h.get("dropped", {}))


def _loss(metrics: dict | None, key: str = "loss") -> float | None:
    return float(metrics[key]) if metrics and key in metrics else None


def _round_row(h: dict[str, Any]) -> dict[str, Any]:
    """One round of the history as the summary lists it."""
    return {
        "round": h["round"],
        "stage": h["stage"],
        "replied": h["replied"],
        "failed": h["failed"],
        "dropped": h.get("dropped", {}),
        "aggregated": h["aggregated"],
        "train_loss": _loss(h.get("train")),
        "eval_loss": _loss(h.get("eval")),
        # Held-out share of the masked targets' variance the encoder's context explains.
        "context_share": _loss(h.get("eval"), "context-share"),
        "seconds": round(float(h.get("seconds", 0.0)), 3),
        # Everything else a report or a dashboard plots per round.
        "train": numeric(h.get("train") or {}),
        "eval": numeric(h.get("eval") or {}),
        "site_epsilon": numeric(h.get("site_epsilon", {})),
        "site_seconds": numeric(h.get("site_seconds", {})),
        "central_epsilon": (h.get("central_dp") or {}).get("epsilon"),
        "bytes_up": h.get("bytes_up", 0),
        "bytes_down": h.get("bytes_down", 0),
    }


def run_summary(
    history: list[dict[str, Any]],
    *,
    status: str,
    run_dir: Path,
    rounds_planned: int,
    wall_seconds: float,
    final: Path | None = None,
    reason: str | None = None,
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
        "mode": "pretrain",
        "status": status,
        "reason": reason,
        "run_dir": str(run_dir),
        "final_checkpoint": str(final) if final else None,
        "rounds_planned": rounds_planned,
        "rounds_run": len(history),
        "rounds_aggregated": sum(bool(h["aggregated"]) for h in history),
        "wall_seconds": round(wall_seconds, 3),
        "final_train_loss": next(
            (loss for h in reversed(history) if (loss := _loss(h.get("train"))) is not None), None
        ),
        "rounds": [_round_row(h) for h in history],
        "sites": dict(sorted(sites.items())),
        "central_dp": central[-1] if central else None,
        "repeat_offenders": sorted(
            s for s, n in malformed_counts(history).items() if n >= REPEAT_OFFENDER
        ),
    }


# How a site took part in a round, as one number per site in the TensorBoard scalars.
PARTICIPATION = {"replied": 1.0, "failed": 0.0, "dropped": -1.0}


def round_scalars(h: dict[str, Any]) -> dict[str, float]:
    """A round of the history as TensorBoard tags: losses and every other train/eval metric
    (e.g. a context-reliance figure when the model reports one), per-site participation,
    epsilon and training time, the round's time and traffic."""
    out: dict[str, Any] = {f"train/{k}": v for k, v in numeric(h.get("train") or {}).items()}
    out |= {f"eval/{k}": v for k, v in numeric(h.get("eval") or {}).items()}
    out |= {f"round/{k}": h.get(k) for k in ("aggregated", "seconds", "bytes_up", "bytes_down")}
    for kind in ("replied", "failed", "dropped"):
        sites = h.get(kind) or {}
        out[f"sites/{kind}"] = len(sites)
        out |= {f"participation/{site}": PARTICIPATION[kind] for site in sites}
    out |= {f"epsilon/{site}": eps for site, eps in h.get("site_epsilon", {}).items()}
    if central := h.get("central_dp"):
        out["epsilon/central"] = central["epsilon"]
    out |= {f"site_seconds/{site}": t for site, t in h.get("site_seconds", {}).items()}
    return numeric({k: v for k, v in out.items() if v is not None})


def untrained_reason(history: list[dict[str, Any]], fed: FederationConfig) -> str | None:
    """Why the run's model is not trained (too few aggregated rounds in a stage), or None.

    Names each short stage and, from its first round that was not aggregated, what the sites
    answered: "every site refused: privacy budget exhausted ..." when they all said the same.
    """
    short = fed.untrained_stages(h["round"] for h in history if h["aggregated"])
    if not short:
        return None
    counts, whys = [], {}
    for stage, (have, need) in short.items():
        rounds = [h for h in history if h["stage"] == stage]
        counts.append(f"{stage}: {have} of {len(rounds)} run, need {need}")
        if (missed := next((h for h in rounds if not h["aggregated"]), None)) is not None:
            whys.setdefault(_why_not_aggregated(missed, fed.min_replies), missed["round"])
    text = f"the model was not trained: too few aggregated rounds ({'; '.join(counts)})"
    return text + "".join(f"; round {rnd}: {why}" for why, rnd in whys.items())


def _why_not_aggregated(h: dict[str, Any], min_replies: int) -> str:
    refused = {**h["failed"], **h.get("dropped", {})}
    asked = len(h["replied"]) + len(refused)
    if not h["replied"] and len(set(refused.values())) == 1:
        # A site's category carries "refused: " itself (client/report.py); say it once.
        reason = next(iter(refused.values()))
        why = reason.removeprefix("refused: ")
        return f"every site ({asked}) {'failed' if why == reason else 'refused'}: {why}"
    sites = "; ".join(f"{site}: {reason}" for site, reason in sorted(refused.items()))
    return f"{len(h['replied'])} of {asked} sites replied (min_replies {min_replies}); {sites}"


def summary_path(run_dir: Path, mode: str = "pretrain") -> Path:
    """Pretraining keeps `run_summary.json`; other modes (which may share the run directory
    with the pretraining run they start from) write `<mode>_summary.json`."""
    return Path(run_dir) / (SUMMARY_FILE if mode == "pretrain" else f"{mode}_summary.json")


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    return write_json(
        summary_path(run_dir, summary.get("mode", "pretrain")), summary, private=False
    )


def read_run_summary(run_dir: Path, mode: str = "pretrain") -> dict[str, Any] | None:
    path = summary_path(run_dir, mode)
    return json.loads(path.read_text()) if path.is_file() else None


def mark_run(run_dir: Path, mode: str, status: str, reason: str | None = None) -> Path:
    """Set a run's status (keeping what its summary already holds); a fresh one if it has none."""
    summary = read_run_summary(run_dir, mode) or {
        "format": FORMAT, "mode": mode, "run_dir": str(run_dir)
    }  # fmt: skip
    return write_run_summary(run_dir, {**summary, "status": status, "reason": reason})


def check_run(run_dir: Path, mode: str, log: Path) -> dict[str, Any]:
    """The summary of a run that finished; a RunFailed naming why otherwise."""
    summary = read_run_summary(run_dir, mode)
    if summary is None or summary.get("status") == "running":
        raise RunFailed(f"the {mode} run did not finish; see {log}")
    if summary["status"] == STATUS_FAILED:
        raise RunFailed(f"the {mode} run failed: {summary['reason']}")
    return summary


def summary_table(summary: dict[str, Any]):
    """Rounds (stage, sites used/asked, losses, time), per-site figures, privacy if any."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    title = f"federated pretraining: {summary['status']}"
    # Reasons quote config sections ([privacy]), which rich would read as markup.
    caption = escape(summary["reason"]) if summary.get("reason") else None
    rounds = Table(title=title, caption=caption)
    columns = ("round", "stage", "sites", "train loss", "eval loss", "context", "aggregated", "s")
    for col in columns:
        rounds.add_column(col, justify="right" if col in ("round", "s") else "left")

    def fmt(loss: float | None) -> str:
        return "-" if loss is None else f"{loss:.4f}"

    for r in summary["rounds"]:
        asked = len(r["replied"]) + len(r["failed"]) + len(r["dropped"])
        rounds.add_row(
            str(r["round"]), r["stage"], f"{len(r['replied'])}/{asked}", fmt(r["train_loss"]),
            fmt(r["eval_loss"]), fmt(r.get("context_share")), "yes" if r["aggregated"] else "NO",
            f"{r['seconds']:.1f}",
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
    """Print the tables of a run's summary (None when the run wrote none). A run that stopped
    before its first round has only a status: `check_run` reports it."""
    from rich.console import Console

    summary = read_run_summary(run_dir)
    if summary is not None and "rounds" in summary:
        console = Console()
        console.print(summary_table(summary))
        # On one line whatever the terminal's width, so the path can be copied from the log.
        checkpoint = summary["final_checkpoint"] or "-"
        console.print(f"checkpoint: {checkpoint}", soft_wrap=True, markup=False, highlight=False)
    return summary

"""The privacy ledger as rich tables, for `hmgdm-client privacy-report` and run summaries."""

from __future__ import annotations

from rich.table import Table

from hmgdm_core.privacy.ledger import PrivacyLedger


def ledger_tables(ledger: PrivacyLedger) -> tuple[Table, Table]:
    """(summary, rounds): the guarantee so far, then one row per trained round."""
    budget = "none" if ledger.max_epsilon is None else f"{ledger.max_epsilon:g}"
    left = (
        "-"
        if ledger.max_epsilon is None
        else f"{max(0.0, ledger.max_epsilon - ledger.epsilon):.4f}"
    )
    summary = Table("setting", "value", title="privacy ledger", title_justify="left")
    for key, value in [
        ("mechanism", f"{ledger.mechanism} (unit: one {ledger.unit})"),
        ("epsilon spent", f"{ledger.epsilon:.4f} at delta {ledger.delta:g} ({ledger.accountant})"),
        ("max epsilon", budget),
        ("epsilon left", left),
        ("rounds / steps", f"{ledger.rounds} / {ledger.steps}"),
        ("clip norm", f"{ledger.clip_norm:g}"),
        ("noise multiplier", f"{ledger.noise_multiplier:g}"),
        ("sample rate", f"{ledger.sample_rate:.4g}"),
    ]:
        summary.add_row(key, value)
    rounds = Table(
        "round",
        "steps",
        "noise",
        "sample rate",
        "patients",
        "epsilon after",
        "recorded (UTC)",
        title="history",
        title_justify="left",
    )
    for e in ledger.history:
        rounds.add_row(
            str(e.round),
            str(e.steps),
            f"{e.noise_multiplier:g}",
            f"{e.sample_rate:.4g}",
            str(e.patients),
            f"{e.epsilon:.4f}",
            e.recorded,
        )
    return summary, rounds

"""The ledger tables and the `privacy-report` command that prints them."""

from __future__ import annotations

import typer
from rich.console import Console
from typer.testing import CliRunner

from client.privacy import privacy_report
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger
from hmgdm_core.privacy.report import ledger_tables


def _ledger(tmp_path) -> PrivacyLedger:
    cfg = LocalDP(max_epsilon=8.0, patients_per_step=2)
    ledger = PrivacyLedger.open(tmp_path / LEDGER_NAME, cfg, num_patients=20)
    ledger = ledger.record(1, 30, patients=20).record(2, 30, patients=20)
    ledger.save(tmp_path / LEDGER_NAME)
    return ledger


def test_tables_show_spent_left_and_every_round(tmp_path):
    ledger = _ledger(tmp_path)
    console = Console(record=True, width=140)
    for table in ledger_tables(ledger):
        console.print(table)
    text = console.export_text()
    assert f"{ledger.epsilon:.4f} at delta 1e-05 (rdp)" in text
    assert f"{8.0 - ledger.epsilon:.4f}" in text and "2 / 60" in text
    assert text.count(f"{ledger.history[0].epsilon:.4f}") == 1


def test_privacy_report_command_prints_the_ledger_or_a_clear_error(tmp_path):
    app = typer.Typer()
    app.command()(privacy_report)
    runner = CliRunner()
    missing = runner.invoke(app, ["--site-dir", str(tmp_path)])
    assert missing.exit_code == 2
    ledger = _ledger(tmp_path)
    shown = runner.invoke(app, ["--site-dir", str(tmp_path)], terminal_width=160)
    assert shown.exit_code == 0 and f"{ledger.epsilon:.4f}" in shown.stdout
    assert "patient" in shown.stdout

"""A curious operator against a real site on loopback (SuperLink with TLS and node auth, one
SuperNode joined with its own clinical table and no disclosure settings of its own): what it
asks for beyond the site's policy never leaves the site, and its errors carry no detail."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA

from client.records import SimulatedSites
from hmgdm_core.config import load_config
from hmgdm_core.events import EVENTS_FILE
from hmgdm_core.privacy.disclosure import LOG_NAME
from server.run_config import submission

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"
RUN = {"federation.min_sites": 1, "federation.min_replies": 1, "federation.wait_timeout_s": 90,
       "federation.round_timeout_s": 120}  # fmt: skip


def _submit(fed, **fields) -> str:
    return fed.submit(submission(load_config(DEBUG, RUN), **fields), timeout=240)


def test_a_hostile_operator_gets_no_fine_life_tables_and_no_error_detail(federation, site_caches):
    fed = federation
    raw = pd.read_csv(DATA / "tcga_survival" / "tcga_lusc_survival.csv", dtype={"site": str})
    table = fed.root / "clinical.csv"
    raw[raw["site"] == "22"].to_csv(table, index=False)  # 36 patients
    key, _ = fed.new_key("A")
    # No --privacy-config: the site answers under the default policy, not the server's config.
    fed.join("A", site_caches["A"], key, clinical=table, privacy_config=None)

    # The honest ServerApp, asked by its operator for life tables at a hundredth of a month:
    # enough to read off every patient's (time, event) before the site had a policy.
    cox_dir = fed.root / "cox"
    out = _submit(fed, mode="survival-clinical", km_bin_width=0.01, run_dir=cox_dir)
    assert (cox_dir / "metrics.json").is_file(), out[-3000:]
    metrics = json.loads((cox_dir / "metrics.json").read_text())
    assert metrics["patients"] == 36 and metrics["km_sites"] == []
    assert not (cox_dir / "km.json").exists()  # no life table reached the server
    site_state = fed.root / "sites" / "A"
    assert (site_state / LOG_NAME).is_file()

    # A run that points the site at a file of the server's choosing: refused, and the server
    # learns only the category; the detail stays in the site's own event log.
    out = _submit(fed, mode="survival-clinical", run_dir=fed.root / "cox2",
                  sim=SimulatedSites(clinical_dir=fed.root))  # fmt: skip
    assert "refused: invalid request" in out, out[-3000:]
    assert "for simulated sites only" not in out
    events = [json.loads(line) for line in (site_state / EVENTS_FILE).read_text().splitlines()]
    assert any("for simulated sites only" in (e.get("reason") or "") for e in events)
    assert not (fed.root / "cox2" / "metrics.json").exists()

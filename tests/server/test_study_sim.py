"""`hmgdm-server study run` with a federated cell on Flower's simulation engine (one Ray run,
shared by every assertion): central DP reports epsilon and traffic, a rerun does no work."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import tomli_w
from conftest import TINY_MODEL
from typer.testing import CliRunner

from server.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY = {
    "name": "sim",
    "sites": [3],
    "regimes": ["centralized", "central_dp"],
    "noise": [1.0],
    "seeds": [0],
    "cohort": {"per_class": 6},
    "training": {"stage1_rounds": 1, "stage2_rounds": 1, "local_steps": 1, "model": TINY_MODEL},
    "probe": {"folds": 3},
    "resources": {"num_cpus": 1, "ray_cpus": 1},
}


# One test, not two sharing a module fixture: pytest-xdist may run two tests of a module on
# different workers, and each would then pay for the whole study (~50 s).
def test_federated_cell_reports_privacy_and_traffic_and_a_rerun_does_no_work(tmp_path):
    config, out = tmp_path / "sim.toml", tmp_path / "out"
    config.write_text(tomli_w.dumps(STUDY))
    runner = CliRunner()
    first = runner.invoke(app, ["study", "run", str(config), "--out", str(out)])
    assert first.exit_code == 0, first.output
    table = pd.read_csv(out / "results.csv")
    assert list(table.regime) == ["centralized", "central_dp"]
    dp = table.set_index("regime").loc["central_dp"]
    # The server's opacus accountant: 2 rounds of noise 1.0 on the mean of 3 clipped updates.
    assert 0 < dp.epsilon < 100 and dp.delta == 1e-5
    assert dp.bytes_sent > 0 and table.set_index("regime").loc["centralized"].bytes_sent == 0
    assert len(json.loads(dp.site_accuracy)) == 3 and 0 <= dp.accuracy <= 1
    assert "| 3 | iid | central_dp | 1 |" in (out / "report.md").read_text()
    assert "2 cells run now, 0 already done" in first.output

    result = out / "cells" / "s3-iid-central_dp-z1-seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    second = runner.invoke(app, ["study", "run", str(config), "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "0 cells run now, 2 already done" in second.output
    assert result.stat().st_mtime_ns == stamp

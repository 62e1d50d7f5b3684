"""The same ServerApp/ClientApp on Flower's simulation engine, sites = partitions of one cache."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from hmgdm_core.train import load_checkpoint
from server.superlink import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


def test_simulated_hospitals_train_and_report(site_caches, tmp_path, capsys):
    final = simulate(
        site_caches["B"], tmp_path, sites=3, config=DEBUG_TOML,
        overrides={"federation.local_steps": 1, "federation.stage2_rounds": 1},
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "federated pretraining: finished" in table and str(final.name) in table
    ckpt = load_checkpoint(final)  # what `hmgdm-client embed` loads
    history = ckpt.extra["federation"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(len(h["replied"]) == 3 and h["aggregated"] for h in history)
    assert all(torch.isfinite(torch.tensor(h["eval"]["loss"])) for h in history)
    # Three virtual sites kept three private checkpoints; nothing of the engine is left running.
    assert len(list((tmp_path / "sites").glob("site-*/run-*.pt"))) == 3
    assert not _processes_using(tmp_path)


def _processes_using(path: Path) -> list[int]:
    """Live processes whose command line or FLWR_HOME points into `path`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            text = " ".join(proc.info["cmdline"] or []) + proc.environ().get("FLWR_HOME", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if str(path) in text:
            found.append(proc.info["pid"])
    return found

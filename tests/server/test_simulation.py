"""The same ServerApp/ClientApp on Flower's simulation engine, sites = partitions of one cache."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from hmgdm_core.train import load_checkpoint
from server.simulation import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


def test_simulated_hospitals_train_and_report_and_broken_updates_are_dropped(
    site_caches, tmp_path, capsys
):
    # Five virtual sites; three send a NaN, a wrong-shape and an oversized update every round,
    # one claims 1e15 examples (in the audit such a site became the global model), and one
    # reports NaN feature moments (once pooled and broadcast as every site's standardisation).
    final = simulate(
        site_caches["B"], tmp_path, sites=5, config=DEBUG_TOML,
        faults="0:stats,1:liar,2:nan,3:shape,4:huge",
        overrides={"federation.local_steps": 1, "federation.stage2_rounds": 1,
                   "federation.min_replies": 2, "privacy.validation.max_update_norm": 100.0},
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "federated pretraining: finished" in table
    assert f"checkpoint: {final}\n" in table  # whole, on one line, however long the path
    ckpt = load_checkpoint(final)  # what `hmgdm-client embed` loads
    history = ckpt.extra["federation"]
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert h["aggregated"] and len(h["replied"]) == 2 and not h["failed"]
        reasons = sorted(h["dropped"].values())
        assert len(reasons) == 3, h["dropped"]
        assert any("NaN" in r for r in reasons)
        assert any("expected float32" in r for r in reasons)
        assert any("exceeds max_update_norm" in r for r in reasons)
        # The liar's update is used, weighing at most its own graph count (a few tiles).
        ((liar, reason),) = [(s, r) for s, r in h["capped"].items() if "1e+15" in r]
        assert liar in h["replied"] and reason.startswith("claimed 1e+15 examples, capped at ")
        assert 1 <= float(reason.rsplit(" ", 1)[1]) <= 20
    assert all(torch.isfinite(torch.tensor(h["eval"]["loss"])) for h in history)
    # The diffusion round's evaluation carries the context diagnostic, into the summary too.
    assert "context-share" not in history[0]["eval"]
    assert torch.isfinite(torch.tensor(history[1]["eval"]["context-share"]))
    assert "context" in table
    assert all(torch.isfinite(p).all() for p in ckpt.model.state_dict().values())
    assert "invalid reply: moment" in (tmp_path / "run.log").read_text()  # the NaN site's
    # Every virtual site kept its private checkpoint; nothing of the engine is left running.
    assert len(list((tmp_path / "sites").glob("site-*/run-*.pt"))) == 5
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

"""A curious operator against a real site on loopback (SuperLink with TLS and node auth, one
SuperNode joined with its own clinical table and no disclosure settings of its own): what it
asks for beyond the site's policy never leaves the site, and its errors carry no detail."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA, TINY_MODEL

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


@pytest.mark.long(100)
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


def test_a_local_dp_site_sends_the_operator_no_fine_tuned_weights(federation, site_caches):
    """In the audit a local-DP site with max_epsilon 1 answered a fine-tuning message with
    22,723 trained values, no DP and no ledger entry; now it refuses with a category only."""
    from hmgdm_core.data import graph_dims
    from hmgdm_core.graph.cache import load_graph_dir
    from hmgdm_core.train import build_model, save_checkpoint

    fed, cache = federation, site_caches["A"]
    fine = {"evaluation.folds": 3, "evaluation.fed_rounds": 1, "evaluation.finetune.hidden": 8}
    cfg = load_config(DEBUG, {**TINY_MODEL, **RUN, **fine})
    checkpoint = fed.root / "pretrained.pt"  # what a consortium's pretraining run would give
    model = build_model(cfg, graph_dims(load_graph_dir(cache)))
    save_checkpoint(checkpoint, model=model, cfg=cfg, epoch=0)
    manifest = pd.read_csv(cache / "manifest.csv")
    labels = fed.root / "labels.csv"
    classes = [Path(p).parent.name[3:] for p in manifest["path"]]  # 01_TUMOR -> TUMOR
    pd.DataFrame({"slide_id": manifest["slide_id"], "label": classes}).to_csv(labels, index=False)
    own = fed.root / "site_own.toml"  # the site's own file: local DP, a budget of 1
    own.write_text("[local_dp]\nmax_epsilon = 1.0\n[disclosure]\nmin_patients = 1\n")
    key, _ = fed.new_key("A")
    fed.join("A", cache, key, labels=labels, privacy_config=own)

    run_dir = fed.root / "finetune"
    run = submission(cfg, mode="downstream", checkpoint=checkpoint, task="classification",
                     classes=sorted(set(classes)), run_dir=run_dir)  # fmt: skip
    out = fed.submit(run, timeout=300)
    assert "fine-tuning round 1 not aggregated" in out, out[-3000:]
    assert "refused: privacy settings" in out and "not supported" not in out
    assert not (run_dir / "finetuned.pt").exists()
    site_state = fed.root / "sites" / "A"
    assert not (site_state / "privacy_ledger.json").exists()  # nothing trained, nothing spent
    events = [json.loads(line) for line in (site_state / EVENTS_FILE).read_text().splitlines()]
    (refusal,) = [e for e in events if e.get("type") == "train.finetune"]
    assert refusal["status"] == "error" and "local DP is not supported" in refusal["reason"]

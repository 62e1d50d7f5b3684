"""A run that trained nothing fails loudly: non-zero exit, no model file, a summary naming why;
for pretraining (simulated hospitals refusing under the shipped hospital privacy preset),
federated fine-tuning and federated survival."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import tomllib
from conftest import TINY_MODEL
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hmgdm_core.config import load_config
from hmgdm_core.data import graph_dims
from hmgdm_core.events import EVENTS_FILE, read_events
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.graph.cache import load_graph_dir
from hmgdm_core.tracking import TENSORBOARD_DIR
from hmgdm_core.train import build_model, save_checkpoint
from server.app import main
from server.messaging import FederationError
from server.report import write_report
from server.run_config import submission
from server.summary import (
    RunFailed,
    check_run,
    mark_run,
    print_run_summary,
    read_run_summary,
    untrained_reason,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REFUSED = "refused: privacy budget exhausted"  # the category a site replies (client/report.py)


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_a_simulated_run_in_which_every_site_refuses_exits_nonzero_without_final_pt(
    site_caches, tmp_path
):
    # The shipped hospital preset (local DP, patient-level DP-SGD) with a budget of 2: on a few
    # tiles each site's first round would already spend more, so every site refuses every round.
    cfg = tomllib.loads((CONFIGS / "hospital.toml").read_text())
    cfg["local_dp"]["max_epsilon"] = 2.0
    cfg["disclosure"] = {"min_patients": 1}  # a few tiles a site: below the small-cell minimum
    for section, values in _nested(TINY_MODEL).items():
        cfg.setdefault(section, {}).update(values)
    cfg["federation"] = {"stage2_rounds": 1, "local_steps": 1, "evaluate_every": 0}
    config = tmp_path / "hospital_eps2.toml"
    config.write_text(tomli_w.dumps(cfg))
    out = tmp_path / "sim"
    cmd = [str(Path(sys.executable).with_name("hmgdm-server")), "simulate",
           "--graphs", str(site_caches["B"]), "--sites", "2", "--config", str(config),
           "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=550)

    assert res.returncode != 0, res.stdout[-2000:]
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the pretrain run failed: the model was not trained")
    assert error.endswith("; round 1: every site (2) refused: privacy budget exhausted")
    # The server learns the category only; each site's own log says by how much.
    for site in ("site-0", "site-1"):
        assert "max_epsilon 2 " in (out / "sites" / site / EVENTS_FILE).read_text()
    run_dir = out / "run"
    assert not (run_dir / "final.pt").exists()
    summary = read_run_summary(run_dir)
    assert summary["status"] == "failed" and summary["final_checkpoint"] is None
    assert summary["rounds_aggregated"] == 0 and summary["reason"] in error
    (failed,) = [e for e in read_events(run_dir / EVENTS_FILE) if e["event"] == "run_failed"]
    assert failed["reason"] == summary["reason"]
    # The printed table says it too, not "finished" (the reason is the error line above).
    assert "federated pretraining: failed" in res.stdout
    # TensorBoard saw both rounds: no site took part (0 = failed or refused), nothing trained.
    scalars = EventAccumulator(str(run_dir / TENSORBOARD_DIR)).Reload()
    tags = scalars.Tags()["scalars"]
    sites = [t for t in tags if t.startswith("participation/")]
    assert len(sites) == 2 and "train/loss" not in tags
    for tag in [*sites, "round/aggregated", "sites/replied"]:
        assert [(e.step, e.value) for e in scalars.Scalars(tag)] == [(1, 0.0), (2, 0.0)], tag
    assert [e.value for e in scalars.Scalars("sites/failed")] == [2.0, 2.0]
    # The report says why, too.
    page = write_report(run_dir).read_text()
    assert "failed" in page and "every site (2) refused" in page


def test_a_model_whose_encoder_never_trained_is_named_untrained():
    fed = FederationConfig(stage1_rounds=1, stage2_rounds=2, min_sites=2, min_replies=2)

    def rnd(r: int, aggregated: bool, replied=(), failed=None) -> dict:
        return {"round": r, "stage": fed.stage_of(r), "aggregated": aggregated,
                "replied": list(replied), "failed": failed or {}, "dropped": {}}  # fmt: skip

    trained = [rnd(1, True, "AB"), rnd(2, False, "A", {"B": "no reply"}), rnd(3, True, "AB")]
    assert untrained_reason(trained, fed) is None
    # Stage 1 trained, then every diffusion round lacked a reply: the encoder is the random init.
    history = [rnd(1, True, "AB"), rnd(2, False, "A", {"B": "no reply before the round timeout"}),
               rnd(3, False, (), {"A": REFUSED, "B": REFUSED})]  # fmt: skip
    why = untrained_reason(history, fed)
    assert why == (
        "the model was not trained: too few aggregated rounds (diffusion: 0 of 2 run, need 1); "
        "round 2: 1 of 2 sites replied (min_replies 2); B: no reply before the round timeout"
    )
    stricter = fed.model_copy(update={"min_aggregated_rounds": 3})  # capped at a stage's rounds
    assert untrained_reason(history, stricter) == why.replace("need 1", "need 2")
    # All sites refusing for one reason is said once; a stage never reached is named too.
    assert untrained_reason([rnd(1, False, (), {"A": REFUSED, "B": REFUSED})], fed) == (
        "the model was not trained: too few aggregated rounds (autoencoder: 0 of 1 run, need 1; "
        "diffusion: 0 of 0 run, need 1); round 1: every site (2) refused: privacy budget exhausted"
    )


@pytest.fixture
def unlabelled_sites(site_caches, tmp_path) -> tuple[InProcessGrid, Path]:
    """Two sites that joined with their graphs only (no labels, no clinical table), and a tiny
    pretrained checkpoint for their graphs."""
    sites = {
        name: Context(run_id=1, node_id=0, state=RecordDict(), run_config={}, node_config={
            "graphs-dir": str(site_caches[name]), "state-dir": str(tmp_path / name)})
        for name in ("A", "B")
    }  # fmt: skip
    cfg = load_config(None, TINY_MODEL)
    dims = graph_dims(load_graph_dir(site_caches["A"]))
    ckpt = tmp_path / "final.pt"
    save_checkpoint(ckpt, model=build_model(cfg, dims), cfg=cfg, epoch=1)
    return InProcessGrid(sites), ckpt


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("mode", "output", "why"),
    [
        ("downstream", "finetuned.pt", "site data or setup unavailable"),
        ("survival-clinical", "metrics.json", "federated Cox, phase moments"),
    ],
)
def test_fine_tuning_and_survival_runs_without_answers_fail_and_say_why(
    unlabelled_sites, tmp_path, mode, output, why
):
    grid, ckpt = unlabelled_sites
    cfg = load_config(None, {"federation.poll_interval_s": 0.01, "federation.min_sites": 2})
    run_dir = tmp_path / "run"
    run_config = submission(
        cfg, run_dir=run_dir, mode=mode, checkpoint=ckpt, task="classification",
        classes=("TUMOR", "STROMA"),
    )  # fmt: skip
    with pytest.raises(FederationError):
        main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                           run_config=run_config))  # fmt: skip
    assert not (run_dir / output).exists()
    summary = read_run_summary(run_dir, mode)
    assert summary["status"] == "failed" and why in summary["reason"], summary
    # A pretraining run sharing the directory keeps its own summary (none here).
    assert read_run_summary(run_dir) is None
    assert json.loads((run_dir / f"{mode}_summary.json").read_text()) == summary


def test_a_run_that_stopped_before_round_one_prints_no_table_and_says_it_did_not_finish(
    tmp_path,
):
    # What main() leaves when the simulation engine or the ServerApp dies before round 1.
    mark_run(tmp_path, "pretrain", "running")
    assert print_run_summary(tmp_path)["status"] == "running"
    with pytest.raises(RunFailed, match=r"the pretrain run did not finish; see .*run\.log"):
        check_run(tmp_path, "pretrain", tmp_path / "run.log")
    mark_run(tmp_path, "pretrain", "failed", "Ray did not start")
    with pytest.raises(RunFailed, match="the pretrain run failed: Ray did not start"):
        check_run(tmp_path, "pretrain", tmp_path / "run.log")

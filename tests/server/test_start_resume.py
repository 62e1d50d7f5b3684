"""The operator and site CLIs end to end: `hmgdm-server start` with TLS and registered site keys,
two `hmgdm-client join` (with their labels), the server killed after round 1, `start --resume`
finishing it, then `start --finetune` fine-tuning the result on the same two sites' labels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_site_policy

from client.flower_env import stop_tree
from hmgdm_core.atomic import load_torch
from hmgdm_core.downstream.finetune import load_slide_net
from hmgdm_core.train import load_checkpoint
from server.downstream import MODEL_NAME, RESULT_NAME
from server.strategy import load_last_round

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.long(190)
def test_start_join_kill_resume(tmp_path, site_caches, federation_cleanup):
    port, tls = federation_cleanup.free_port(), tmp_path / "tls"
    subprocess.run([_cli("hmgdm-server"), "certs", "--out", str(tls)], check=True)
    (tmp_path / "sites").mkdir()
    for name in ("A", "B"):
        subprocess.run([_cli("hmgdm-client"), "keygen", "--out", str(tmp_path / name)], check=True)
        shutil.copy(tmp_path / name / "site.pub", tmp_path / "sites" / f"{name}.pub")
    config = tmp_path / "fed.toml"
    config.write_text(DEBUG_TOML.read_text() + (
        "\n[federation]\nstage1_rounds = 1\nstage2_rounds = 2\nlocal_steps = 2\n"
        "evaluate_every = 0\nwait_timeout_s = 120\nround_timeout_s = 180\nrun_dir = 'run'\n"
        "[evaluation]\nfolds = 3\nfed_rounds = 1\n[evaluation.finetune]\nhidden = 8\n"
    ))  # fmt: skip
    # Each site's labels name only its own tiles (3 per Kather class: 3 folds by class).
    labels = {}
    for name in ("A", "B"):
        manifest = pd.read_csv(site_caches[name] / "manifest.csv")
        labels[name] = tmp_path / f"labels_{name}.csv"
        pd.DataFrame({"slide_id": manifest["slide_id"],
                      "label": [Path(p).parent.name[3:] for p in manifest["path"]]}
                     ).to_csv(labels[name], index=False)  # fmt: skip
    state = tmp_path / "state"

    def start(*extra: str) -> subprocess.Popen:
        cmd = [_cli("hmgdm-server"), "start", "--config", str(config), "--tls-dir", str(tls),
               "--sites", str(tmp_path / "sites"), "--port", str(port), "--state", str(state),
               *extra]  # fmt: skip
        log = open(tmp_path / f"server{len(extra)}.log", "w")  # noqa: SIM115
        return federation_cleanup.track(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    server = start()
    _wait_for(lambda: "waiting up to" in (tmp_path / "server0.log").read_text(), 60, "SuperLink")
    for name in ("A", "B"):
        cmd = [_cli("hmgdm-client"), "join", "--superlink", f"127.0.0.1:{port}",
               "--graphs", str(site_caches[name]), "--root-cert", str(tls / "ca.crt"),
               "--auth-key", str(tmp_path / name / "site.key"),
               "--local-port", str(federation_cleanup.free_port()),
               "--labels", str(labels[name]),
               "--privacy-config", tiny_site_policy(tmp_path)]  # fmt: skip
        log = open(tmp_path / f"join{name}.log", "w")  # noqa: SIM115
        federation_cleanup.track(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    run_dir = state / "run"
    _wait_for(lambda: (run_dir / "round_0001.pt").exists(), 240, "round 1")
    stop_tree(server, timeout=0.1)  # a crash: SIGKILL soon after SIGTERM
    first = load_last_round(run_dir)
    assert first["round"] == 1

    resumed = start("--resume")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "server1.log").read_text()[-3000:]
    log = (tmp_path / "server1.log").read_text()
    assert "event=run_start" in log and "resume_after=1" in log
    assert "federated pretraining: finished" in log  # the summary table printed at the end
    last = load_last_round(run_dir)
    assert last["round"] == 3
    assert [h["round"] for h in last["history"]] == [1, 2, 3]
    assert last["history"][0] == first["history"][0]  # round 1 was not run again
    assert all(sorted(h["replied"]) == ["A", "B"] for h in last["history"])
    final = load_torch(run_dir / "final.pt")
    assert final["format"] == "hmgdm-checkpoint/1" and final["epoch"] == 3
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 3
    assert {n: s["rounds_replied"] for n, s in summary["sites"].items()} == {"A": 3, "B": 3}

    # The same consortium fine-tunes the federated encoder on the sites' own labels.
    classes = "TUMOR,STROMA,LYMPHO,MUCOSA,ADIPOSE"
    finetune = start("--finetune", str(run_dir / "final.pt"), "--task", "classification",
                     "--classes", classes)  # fmt: skip
    assert finetune.wait(timeout=300) == 0, (tmp_path / "server6.log").read_text()[-3000:]
    result = json.loads((run_dir / RESULT_NAME).read_text())
    assert result["task"] == "classification" and len(result["history"]) == 1
    # Each site evaluated its own held-out fold: one tile per class it has.
    assert {n: s["num_examples"] for n, s in result["sites"].items()} == {"A": 2, "B": 3}
    assert result["pooled"]["slides"] == 5 and 0 <= result["pooled"]["accuracy"] <= 1
    net, task, _ = load_slide_net(run_dir / MODEL_NAME)
    assert task.classes == tuple(classes.split(","))
    # From the federated model: stage-1 weights kept as they were, the encoder fine-tuned.
    final = load_checkpoint(run_dir / "final.pt").model.state_dict()
    tuned = net.backbone.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in final.items() if k.startswith("autoencoder."))
    assert any(not torch.equal(tuned[k], v) for k, v in final.items() if k.startswith("encoder."))

"""The operator and site CLIs end to end: `hmgdm-server start` with TLS and registered site keys,
two `hmgdm-client join`, the server killed after round 1, and `start --resume` finishing it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from server.strategy import load_last_round
from server.superlink import stop_tree

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
    ))  # fmt: skip
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
               "--local-port", str(federation_cleanup.free_port())]  # fmt: skip
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
    final = torch.load(run_dir / "final.pt", weights_only=False)
    assert final["format"] == "hmgdm-checkpoint/1" and final["epoch"] == 3
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 3
    assert {n: s["rounds_replied"] for n, s in summary["sites"].items()} == {"A": 3, "B": 3}

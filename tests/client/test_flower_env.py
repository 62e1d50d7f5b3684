"""Every Flower process hmgdm starts: no runtime installs (whatever the caller's environment
says), no usage telemetry unless the operator asks for it, and this interpreter's scripts."""

from __future__ import annotations

import sys
from pathlib import Path

from client.flower_env import flower_env


def test_defaults_for_a_hospital_deployment(monkeypatch):
    for var in ("FLWR_TELEMETRY_ENABLED", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "0")
    env = flower_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"  # never overridden
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    # The SuperLink side keeps Flower's task poll; only a site's launcher polls faster.
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in env


def test_an_operators_own_tunables_win(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    env = flower_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "1"
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.5"

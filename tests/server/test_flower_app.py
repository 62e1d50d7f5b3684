"""`flwr run .` in a checkout, as a Flower user runs it: on Flower's default local simulation
SuperLink, which installs the app's dependencies with uv before it runs (pyproject's [tool.uv]
leaves it nothing to install: offline and without a uv cache here, nothing may be downloaded)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import tomli_w
import tomllib
from conftest import TINY_MODEL, free_port

from client.records import SIM_SITES, SimulatedSites
from hmgdm_core.privacy.disclosure import DisclosureConfig

REPO = Path(__file__).resolve().parents[2]


def _processes_with_flwr_home(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_flwr_run_dot_trains_on_flowers_default_local_simulation(site_caches, tmp_path):
    """As a Flower user would: `flwr run .` in a checkout with the environment `make setup`
    built; Flower starts its own local simulation SuperLink, which installs the app's
    dependencies with uv (offline and without a uv cache here: nothing may be downloaded)."""
    home = tmp_path / "flwr_home"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "UV_OFFLINE": "1",
        "UV_CACHE_DIR": str(tmp_path / "uv_cache"),
    }
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # Flower's default: install
    cfg = tomllib.loads((REPO / "configs" / "debug.toml").read_text())
    disclosure = DisclosureConfig(**cfg.pop("disclosure"))  # the virtual sites' own section
    for key, value in TINY_MODEL.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    cfg["federation"] = {"local_steps": 1, "evaluate_every": 0}
    sim = SimulatedSites(
        graphs_dir=site_caches["B"], state_dir=tmp_path / "sites", disclosure=disclosure
    )
    run_config = tmp_path / "run.toml"
    # The rest of the config as JSON, a flat Flower knob for the rounds, the simulated sites.
    run_config.write_text(tomli_w.dumps({
        "config": json.dumps(cfg), "stage2-rounds": 1, "run-dir": str(tmp_path / "run"),
        SIM_SITES: sim.model_dump_json(),
    }))  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", ".", "--stream",
           "--run-config", str(run_config),
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]  # fmt: skip
    # Flower gives its local SuperLink 15 s to come up, too little on a loaded CI machine: start
    # it the way `flwr` does, with more patience; `flwr run` then finds it running.
    start = (
        "import flwr.cli.local_superlink as local; local.LOCAL_SUPERLINK_STARTUP_TIMEOUT = 300; "
        "local._start_local_superlink()"
    )
    try:
        subprocess.run([sys.executable, "-c", start], env=env, check=True, timeout=400)
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for proc in _processes_with_flwr_home(home):  # Flower leaves its SuperLink running
            proc.kill()
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 2, log[-3000:]
    assert len(summary["sites"]) == 2 and (tmp_path / "run" / "final.pt").is_file()
    assert "App dependencies installed successfully via uv sync" in log
    assert not re.search(r"Installed: \[", log)  # uv installed nothing into the run's env
    assert "[tool.flwr" in (REPO / "pyproject.toml").read_text()  # Flower migrated nothing

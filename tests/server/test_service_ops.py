"""Running the federation as a service, on real processes: a second site on one host, sites
listed (running or not), removed and logged, healthchecks that test the real thing, and SIGTERM
stopping `start` and `join` with everything they started."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import cmdline, tiny_site_policy

from client.heartbeat import HEARTBEAT_FILE
from hmgdm_core.events import EVENTS_FILE, read_events
from server.sites import REGISTRATIONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def _cli(name: str, *args: str) -> list[str]:
    return [str(Path(sys.executable).with_name(name)), *map(str, args)]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return value


def _sites(state: Path) -> dict[str, list[str]]:
    """`sites list`: name -> [node id, status, registered, last connected, removed]."""
    cmd = _cli("hmgdm-server", "sites", "list", "--state", state)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    return {row[2]: [row[0], row[1], *row[3:]] for row in rows}


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _with_flwr_home(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home.resolve()) and p.status() != "zombie":
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.long(105)
def test_two_sites_on_one_host_removal_healthchecks_and_sigterm(
    tmp_path, site_caches, federation_cleanup
):
    cleanup = federation_cleanup
    port, tls, state = cleanup.free_port(), tmp_path / "tls", tmp_path / "state"
    subprocess.run(_cli("hmgdm-server", "certs", "--out", tls), check=True, timeout=300)
    (tmp_path / "sites").mkdir()
    for name in ("A", "B"):
        subprocess.run(_cli("hmgdm-client", "keygen", "--out", tmp_path / name), check=True)
        shutil.copy(tmp_path / name / "site.pub", tmp_path / "sites" / f"{name}.pub")
    config = tmp_path / "fed.toml"
    config.write_text((REPO / "configs" / "debug.toml").read_text() + (
        "\n[federation]\nstage1_rounds = 1\nstage2_rounds = 30\nlocal_steps = 1\n"
        "evaluate_every = 0\nwait_timeout_s = 300\nround_timeout_s = 120\nrun_dir = 'run'\n"
    ))  # fmt: skip

    def spawn(cmd: list[str], log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:
            return cleanup.track(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))

    server = spawn(_cli("hmgdm-server", "start", "--config", config, "--tls-dir", tls,
                        "--sites", tmp_path / "sites", "--port", port, "--state", state),
                   "server.log")  # fmt: skip
    _wait_for(lambda: "waiting up to" in (tmp_path / "server.log").read_text(), 400, "SuperLink")

    def join(name: str, *extra: str) -> list[str]:
        return _cli("hmgdm-client", "join", "--superlink", f"127.0.0.1:{port}",
                    "--graphs", site_caches[name], "--root-cert", tls / "ca.crt",
                    "--auth-key", tmp_path / name / "site.key",
                    "--state-dir", tmp_path / f"site{name}",
                    "--privacy-config", tiny_site_policy(tmp_path), *extra)  # fmt: skip

    # Two sites on one host: A on a port of its choosing, B on one picked for it.
    local_port = cleanup.free_port()
    site_a = spawn(join("A", "--local-port", str(local_port)), "joinA.log")
    site_b = spawn(join("B"), "joinB.log")
    _wait_for(lambda: {s[1] for s in _sites(state).values()} == {"online"}, 300, "both online")
    # A third `join` on A's port stops at once with one line naming the option.
    clash = subprocess.run(join("A", "--local-port", str(local_port)), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert clash.returncode != 0
    assert clash.stderr.strip().splitlines() == [clash.stderr.strip()]  # one line
    assert clash.stderr.startswith(f"error: --local-port {local_port}: ")

    run_dir = state / "run"
    _wait_for(lambda: (run_dir / "round_0001.pt").exists(), 300, "round 1")
    sites = _sites(state)
    assert sorted(sites) == ["A", "B"] and {s[1] for s in sites.values()} == {"online"}
    # The healthchecks test what matters: the Fleet API answers over TLS; B heard from it.
    fleet = [sys.executable, HEALTHCHECK, "fleet", f"127.0.0.1:{port}", tls / "ca.crt"]
    assert subprocess.run(fleet, cwd=REPO, timeout=300).returncode == 0
    beat = [sys.executable, HEALTHCHECK, "heartbeat", tmp_path / "siteB" / HEARTBEAT_FILE, "90"]
    assert subprocess.run(beat, cwd=REPO, timeout=300).returncode == 0

    # Removing B: the SuperLink refuses its key from then on.
    removed = subprocess.run(_cli("hmgdm-server", "sites", "remove", "B", "--state", state),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert _sites(state)["B"][1] == "removed"
    again = spawn(join("B"), "joinB2.log")
    assert again.wait(timeout=300) != 0
    log = [(e["event"], e["site"]) for e in read_events(state / REGISTRATIONS)]
    assert log == [("site_added", "A"), ("site_added", "B"), ("site_removed", "B")]
    assert all(e["by"] and e["time"] for e in read_events(state / REGISTRATIONS))

    # SIGTERM, as systemctl stop / docker stop send it: every process either started goes.
    started = [*_tree(server), *_tree(site_a), *_with_flwr_home(state / "flwr_home")]
    assert any("flower-superlink" in cmdline(p) for p in started)
    assert any("flower-supernode" in cmdline(p) for p in started)
    t0 = time.monotonic()
    for proc in (server, site_a):
        proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=60) for proc in (server, site_a)]
    _, alive = psutil.wait_procs(started, timeout=30)
    stopped_in = time.monotonic() - t0
    assert not [p for p in alive if p.status() != "zombie"], [cmdline(p) for p in alive]
    assert codes == [128 + signal.SIGTERM] * 2, codes
    print(f"SIGTERM to start and join: {len(started)} processes gone in {stopped_in:.1f} s")
    assert subprocess.run(fleet, cwd=REPO, timeout=300).returncode == 1

    # Listed from the stored state with the SuperLink down: names, A offline, B removed.
    sites = _sites(state)
    assert {name: s[1] for name, s in sites.items()} == {"A": "offline", "B": "removed"}
    events = [e["event"] for e in read_events(run_dir / EVENTS_FILE)]
    assert "round_end" in events and "run_end" not in events
    assert json.loads((run_dir / "run_summary.json").read_text())["status"] == "running"
    print(f"B's first SuperNode after its removal: exit code {site_b.poll()}")

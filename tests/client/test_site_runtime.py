"""The warm ClientApp launcher runs the run's app code from its FAB, not the site's install, and
stops with its site."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import free_port
from flwr.supercore.object_ref import load_app

from client.commands_fed import supernode_command
from client.flower_env import flower_env, stop_tree
from client.site_runtime import APP_PACKAGES, PRELOAD, forget_app_packages


def _fake_fab(root):
    pkg = root / "client"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text("ORIGIN = 'fab'\n")
    return root


def test_a_forked_clientapp_loads_client_app_from_the_fab_dir(tmp_path, monkeypatch):
    import client.records  # noqa: F401  (what unpickling the launcher's target imports)

    fab = _fake_fab(tmp_path / "fab")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in APP_PACKAGES}
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        forget_app_packages()
        assert not [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]
        # Flower's own loader, as flwr-clientapp calls it with the installed FAB's directory.
        assert load_app("client.app:ORIGIN", ValueError, project_dir=fab) == "fab"
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_the_fork_server_preloads_no_hmgdm_code():
    assert not [m for m in PRELOAD if m.split(".")[0] in APP_PACKAGES]


@pytest.mark.integration
def test_stopping_a_site_stops_its_supernode_launcher_and_fork_server(tmp_path):
    (tmp_path / "cache" / "graphs").mkdir(parents=True)
    cmd = supernode_command(
        superlink=f"127.0.0.1:{free_port()}",  # nobody there: the SuperNode keeps retrying
        graphs=tmp_path / "cache", state_dir=tmp_path / "state", root_cert=None, auth_key=None,
        local_port=free_port(),
    )  # fmt: skip
    out = subprocess.DEVNULL
    site = subprocess.Popen(cmd, env=flower_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any("forkserver" in " ".join(p.cmdline()) for p in _tree(site)):
            assert site.poll() is None and time.monotonic() < deadline, "launcher never came up"
            time.sleep(0.5)
        tree = _tree(site)
        assert any("flower-supernode" in " ".join(p.cmdline()) for p in tree)
        site.send_signal(signal.SIGTERM)  # what Ctrl-C on `join` or `docker stop` sends
        assert site.wait(timeout=60) is not None
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        stop_tree(site)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(proc.pid).children(recursive=True)
    return []

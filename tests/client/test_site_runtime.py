"""The warm ClientApp launcher serves the site's installed ClientApp, never the run's FAB code
(tests/server/test_site_code.py attacks it on real processes), and stops with its site."""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import signal
import subprocess
import time

import psutil
import pytest
from conftest import cmdline, free_port
from flwr.clientapp.client_app import LoadClientAppError

from client.commands_fed import supernode_command
from client.flower_env import APP_PACKAGES, flower_env, stop_tree
from client.site_runtime import PRELOAD, site_clientapp_loader


def test_the_site_serves_its_installed_clientapp_and_refuses_other_apps_by_hash():
    import client.app

    load = site_clientapp_loader(default_app_ref="", app_path=None, multi_app=True)
    version = importlib.metadata.version("hmgdm")
    assert load("hmgdm/hmgdm", version, "ab" * 32) is client.app.app
    for app, ver in (("hmgdm/hmgdm", "9.9.9"), ("evil/app", version)):
        with pytest.raises(
            LoadClientAppError, match=rf"^refused run app {app} {ver} \(FAB sha256 (ab)+\)"
        ):
            load(app, ver, "ab" * 32)


def test_flower_unpacks_and_loads_the_fab_through_the_names_the_launcher_replaces():
    from flwr.supernode.runtime import run_clientapp as flower

    body = inspect.getsource(flower.run_clientapp)
    assert "install_from_fab(" in body and "get_load_client_app_fn(" in body
    assert "load_app(" not in body and "import_module(" not in body


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
        while not any("forkserver" in cmdline(p) for p in _tree(site)):
            assert site.poll() is None and time.monotonic() < deadline, "launcher never came up"
            time.sleep(0.5)
        tree = _tree(site)
        assert any("flower-supernode" in cmdline(p) for p in tree)
        site.send_signal(signal.SIGTERM)  # what Ctrl-C on `join` or `docker stop` sends
        assert site.wait(timeout=60) is not None
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [cmdline(p) for p in alive]
    finally:
        stop_tree(site)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(proc.pid).children(recursive=True)
    return []

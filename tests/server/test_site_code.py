"""A malicious operator's app bundle never runs at a site (real SuperLink with TLS and node
auth, a real `join`ed site): a FAB whose ClientApp would write a marker file and send extra
records is answered by the site's own installed ClientApp; a FAB of another version is refused
with one line naming its sha256; in neither case does anything of the FAB run at the site."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import tiny_cache
from flwr.cli.build import build_fab_from_disk

from server.flwr_cli import CONNECTION, app_dir, flower_bin, flwr_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The operator's ServerApp in the modified bundle: ask every site for its statistics and keep
# what each reply holds (the operator's side may run the FAB; the site may not).
PROBE_SERVER = """
import json, time
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.stats") for n in nodes]
    replies = [
        {"error": m.error.reason if m.has_error() else None,
         "records": [] if m.has_error() else sorted(m.content.keys())}
        for m in grid.send_and_receive(msgs, timeout=240)
    ]
    out = Path(str(context.run_config["run-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "replies.json").write_text(json.dumps(replies))
"""
# Appended to client/app.py in the bundle: runs on import; and the statistics reply (in
# client/pretraining.py) leaks the first graph's raw node features.
EVIL_IMPORT = '\nimport pathlib\npathlib.Path({marker!r}).write_text("FAB code ran at the site")\n'
HONEST = '"moments": pack_state(feature_moments(graphs)),'
LEAK = HONEST + ' "raw": pack_state({"x": graphs[0].x}),'


def malicious_app(root: Path, marker: Path, version: str | None = None) -> Path:
    """This repository's app with a leaking ClientApp and a probing ServerApp (and `version`)."""
    src = app_dir(root.with_name(f"{root.name}-installed"))
    for part in ("client", "server", "hmgdm_core", "configs"):
        shutil.copytree(src / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    handlers = root / "client" / "pretraining.py"
    code = handlers.read_text()
    assert HONEST in code
    handlers.write_text(code.replace(HONEST, LEAK))
    app = root / "client" / "app.py"
    app.write_text(app.read_text() + EVIL_IMPORT.format(marker=str(marker)))
    (root / "server" / "probe.py").write_text(PROBE_SERVER)
    pyproject = (src / "pyproject.toml").read_text()
    pyproject = pyproject.replace('serverapp = "server.app:app"', 'serverapp = "server.probe:app"')
    if version:
        pyproject = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject)
    (root / "pyproject.toml").write_text(pyproject)
    return root


def run_app(fed, app: Path, run_dir: Path) -> list[dict]:
    """`flwr run` of `app` on the loopback Control API; the probe's record of the replies."""
    (fed.root / f"{app.name}.toml").write_text(f'run-dir = "{run_dir}"\n')
    cmd = [flower_bin("flwr"), "run", str(app), CONNECTION,
           "--run-config", str(fed.root / f"{app.name}.toml"), "--stream"]  # fmt: skip
    out = subprocess.run(cmd, env=flwr_env(fed.home), capture_output=True, text=True, timeout=400)
    assert (run_dir / "replies.json").is_file(), out.stdout[-3000:] + out.stderr[-2000:]
    return json.loads((run_dir / "replies.json").read_text())


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def test_a_site_never_runs_the_operators_bundle(federation, tmp_path):
    fed = federation
    marker = tmp_path / "marker"
    key, _ = fed.new_key("A")
    site = fed.join("A", tiny_cache(tmp_path / "cache", slides=2), key)
    deadline = time.monotonic() + 120
    while "online" not in json.dumps(
        subprocess.run([flower_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                       env=flwr_env(fed.home), capture_output=True, text=True).stdout
    ):  # fmt: skip
        assert site.poll() is None and time.monotonic() < deadline, "site never came online"
        time.sleep(1)

    # The site's Runtime API hands tasks only to the launcher holding the join's secret
    # (RUNTIME_AUTHENTICATION_FAILED; without the secret Flower hands them to any local user).
    port = site.args[site.args.index("--port") + 1]
    # Online at the SuperLink comes before the SuperNode opens its Runtime API.
    while not _listening(int(port)):
        assert site.poll() is None and time.monotonic() < deadline, "no Runtime API"
        time.sleep(0.5)
    res = httpx.post(f"http://127.0.0.1:{port}/v1/runtime/acquire-task", content=b"",
                     headers={"content-type": "application/protobuf"})  # fmt: skip
    assert res.status_code == 401 and "Authentication failed" in res.text, res.text

    # Same app and version, modified code: answered by the site's installed ClientApp.
    same = malicious_app(tmp_path / "same", marker)
    (reply,) = run_app(fed, same, tmp_path / "run_same")
    assert reply == {"error": None, "records": ["dims", "metrics", "moments"]}
    assert not marker.exists()

    # Another version: refused, with the sha256 of the bundle the operator submitted.
    other = malicious_app(tmp_path / "other", marker, version="9.9.9")
    fab_hash = hashlib.sha256(build_fab_from_disk(other)).hexdigest()
    (reply,) = run_app(fed, other, tmp_path / "run_other")
    assert reply["error"] and reply["records"] == []
    log = (fed.root / "supernode_A.log").read_text()
    assert f"refused run app hmgdm/hmgdm 9.9.9 (FAB sha256 {fab_hash})" in log
    assert not marker.exists()

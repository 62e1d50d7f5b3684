"""CPU an idle federation burns: a SuperLink (TLS, SuperNode auth, fleet proxy) and one joined
site, polling at hmgdm's intervals against every SuperExec polling at 0.05 s (hmgdm's earlier
setting), measured in the same run.

Run: .venv/bin/python benchmarks/idle_cpu.py [--seconds 30]
Last output line: one JSON object; ratio = CPU at 0.05 s polling / CPU at hmgdm's intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.commands_fed import supernode_command, write_keypair  # noqa: E402
from client.flower_env import flower_env, free_port, stop_tree  # noqa: E402
from client.site_runtime import TASK_POLL_ENV  # noqa: E402
from server.certs import make_certificates  # noqa: E402
from server.flwr_cli import register_site  # noqa: E402
from server.superlink import start_superlink  # noqa: E402

TARGET = 3.0
OLD_POLL_S = "0.05"


def tree_cpu(roots: list[int]) -> float:
    """User + system CPU seconds of these processes and everything they started."""
    total = 0.0
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(p.cpu_times()[:2])
    return total


def idle_cpu(work: Path, poll: str | None, seconds: float, settle: float) -> dict[str, float]:
    """% of one core used by the SuperLink side and by the site while nothing runs; `poll`
    sets every SuperExec's task poll (None: hmgdm's own intervals)."""
    with patch.dict(os.environ):  # every Flower process gets its environment from os.environ
        os.environ.pop(TASK_POLL_ENV, None)
        if poll:
            os.environ[TASK_POLL_ENV] = poll
        tls = make_certificates(work / "tls", host="localhost")
        port = free_port()
        link = start_superlink(port=port, state_dir=work / "state", tls=tls,
                               flwr_home=work / "home", log_path=work / "link.log")  # fmt: skip
        try:
            key, public = write_keypair(work / "keys" / "site", "site")
            register_site(link.flwr_home, public, "site")
            (work / "cache" / "graphs").mkdir(parents=True)
            cmd = supernode_command(superlink=f"127.0.0.1:{port}", graphs=work / "cache",
                                    state_dir=work / "site", root_cert=tls.ca_cert, auth_key=key,
                                    local_port=free_port())  # fmt: skip
            with open(work / "site.log", "wb") as log:
                site = subprocess.Popen(cmd, env=flower_env(), stdout=log, stderr=subprocess.STDOUT)
            try:
                time.sleep(settle)  # imports and the SuperNode's activation are not idle time
                link_pids = [link.proc.pid] + ([link.proxy.pid] if link.proxy else [])
                before = tree_cpu(link_pids), tree_cpu([site.pid])
                time.sleep(seconds)
                after = tree_cpu(link_pids), tree_cpu([site.pid])
            finally:
                stop_tree(site)
        finally:
            link.stop()
    link_pct, site_pct = (100 * (a - b) / seconds for a, b in zip(after, before, strict=True))
    return {"superlink_pct": round(link_pct, 1), "site_pct": round(site_pct, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="idle time measured")
    parser.add_argument("--settle", type=float, default=20.0, help="start-up time not measured")
    args = parser.parse_args()
    figures = {}
    for name, poll in (("fast_poll", OLD_POLL_S), ("hmgdm", None)):
        with tempfile.TemporaryDirectory() as work:
            figures[name] = idle_cpu(Path(work), poll, args.seconds, args.settle)
        print(f"{name}: SuperLink side {figures[name]['superlink_pct']}% of a core, "
              f"site {figures[name]['site_pct']}%")  # fmt: skip
    total = {k: round(v["superlink_pct"] + v["site_pct"], 1) for k, v in figures.items()}
    ratio = total["fast_poll"] / max(total["hmgdm"], 1e-9)
    print(json.dumps({
        "benchmark": "idle_cpu", "ratio": round(ratio, 1), "target": TARGET,
        "met": ratio >= TARGET, "idle_pct_of_a_core": total, **figures,
    }))  # fmt: skip


if __name__ == "__main__":
    main()

"""Listing a federation's sites: the Control API call hmgdm makes in process
(`server.flwr_cli.list_sites`, which `wait_for_online` repeats every second while `start` waits
for sites) against the `flwr supernode list` CLI process it replaced, same SuperLink (TLS, SuperNode
auth, two registered sites), measured in the same run.

Run: .venv/bin/python benchmarks/control_api.py [--repeats 5]
Last output line: one JSON object; ratio = CLI process time / in-process call time (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.commands_fed import write_keypair  # noqa: E402
from client.flower_env import free_port  # noqa: E402
from server.certs import make_certificates  # noqa: E402
from server.flwr_cli import CONNECTION, flower_bin, flwr_env, list_sites, register_site  # noqa: E402
from server.superlink import start_superlink  # noqa: E402

TARGET = 10.0


def median_seconds(repeats: int, call) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tls = make_certificates(work / "tls", host="localhost")
        link = start_superlink(port=free_port(), state_dir=work / "state", tls=tls,
                               flwr_home=work / "home", log_path=work / "link.log")  # fmt: skip
        try:
            for name in ("a", "b"):
                register_site(link.flwr_home, write_keypair(work / "keys", name)[1], name)
            cli = [flower_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"]
            env = flwr_env(link.flwr_home)

            def by_cli() -> None:
                out = subprocess.run(cli, env=env, capture_output=True, text=True, check=True)
                assert len(json.loads(out.stdout[out.stdout.index("{") :])["nodes"]) == 2

            def in_process() -> None:
                assert len(list_sites(link.flwr_home)) == 2

            in_process()  # the first call imports Flower's client; a running `start` has it
            process_s = median_seconds(args.repeats, by_cli)
            call_s = median_seconds(args.repeats, in_process)
        finally:
            link.stop()
    ratio = process_s / call_s
    print(f"flwr supernode list: {process_s:.3f} s; in process: {call_s:.4f} s")
    print(json.dumps({
        "benchmark": "control_api", "ratio": round(ratio, 1), "target": TARGET,
        "met": ratio >= TARGET, "cli_process_s": round(process_s, 3),
        "in_process_s": round(call_s, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()

"""What runs at a site: Flower's SuperNode plus a warm ClientApp launcher, started and stopped
together (`python -m client.site_runtime --runtime-port P -- <flower-supernode args>`).

Flower starts a fresh `flwr-clientapp` process for every message, and importing torch, PyG and
Flower costs seconds of each round. The launcher is Flower's own SuperExec loop with one change:
each ClientApp is forked from a fork server that has imported those libraries and nothing else
(no hmgdm code, no model, no data), so every message still gets a fresh process that loads the
run's app code from its FAB, but skips the imports.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from logging import INFO
from pathlib import Path

from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from client.flower_env import stop_tree

# Third-party only: the run's own code must come from its FAB in the forked process. Importing
# torch starts neither CUDA nor its OpenMP threads, so a forked ClientApp may use both.
APP_PACKAGES = ("client", "server", "hmgdm_core")
PRELOAD = (
    "numpy",
    "torch",
    "torch_geometric",
    "pydantic",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


def forget_app_packages() -> None:
    """Unpickling the ClientApp's target imported the site's installed `client` package; forget
    it so that Flower loads the run's app code from the FAB it installs, as a cold process does."""
    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]


def _run_clientapp(spec: ExecutionSpec) -> None:
    """Body of one forked ClientApp process: what `flwr-clientapp --token ...` would do."""
    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    forget_app_packages()
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    log(INFO, "Start `flwr-clientapp` process (forked from the warm launcher)")
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


class ForkServerExecutor(SubprocessExecutor):
    """Launches each ClientApp as a new process forked from an import-only fork server."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        # Now, so the first round's message does not wait for the imports.
        multiprocessing.forkserver.ensure_running()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        from flwr.supercore.constant import TaskType

        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        name = f"clientapp-{spec.task_id}"
        self._ctx.Process(target=_run_clientapp, args=(spec,), name=name).start()
        return LaunchResult.accepted()


def run_launcher(runtime_api_address: str, parent_pid: int | None) -> None:
    """Flower's SuperExec loop (task polling, signals, parent monitor) with the warm executor."""
    from flwr.supercore.superexec import run_superexec as superexec

    executor = ForkServerExecutor()
    # run_superexec picks its executor by type through this module-level function; flwr is
    # pinned (pyproject), and a test runs this path against the installed version.
    superexec.get_executor = lambda *_args, **_kwargs: executor
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the Runtime API listens on loopback only (see supernode_command)
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def _wait_for_port(port: int, node: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the SuperNode's Runtime API listens (or the SuperNode has exited)."""
    deadline = time.monotonic() + timeout
    while node.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)


def run_site(
    supernode_args: Sequence[str], runtime_port: int, heartbeat: Path | None = None
) -> int:
    """Run the SuperNode and its launcher until the SuperNode exits; its exit code is ours.

    With `heartbeat`, a thread records there when the SuperLink last answered (client.heartbeat).
    """
    bin_dir = Path(sys.executable).parent
    # Own sessions: a terminal's Ctrl-C reaches only this process, which passes it on once.
    node = subprocess.Popen(
        [str(bin_dir / "flower-supernode"), *supernode_args, "--isolation", "process"],
        start_new_session=True,
    )
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: node.send_signal(signum))
    if heartbeat is not None:
        from client.heartbeat import start_heartbeat

        cert = _option(supernode_args, "--root-certificates")
        start_heartbeat(heartbeat, _option(supernode_args, "--superlink"), cert and Path(cert))
    _wait_for_port(runtime_port, node)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "client.site_runtime", "--launcher",
         "--runtime-port", str(runtime_port), "--parent-pid", str(node.pid)],
        start_new_session=True,
    )  # fmt: skip
    code = node.wait()
    # The launcher follows its parent SuperNode out (Flower's parent-process monitor); its fork
    # server and a ClientApp still training would not: stop them with it.
    stop_tree(launcher, timeout=10)
    return code


def _option(args: Sequence[str], name: str) -> str | None:
    """The value after `name` in an argument list (None when absent)."""
    args = list(args)
    return args[args.index(name) + 1] if name in args[:-1] else None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime-port", type=int, required=True, help="the SuperNode's --port")
    ap.add_argument("--launcher", action="store_true", help="run only the warm launcher")
    ap.add_argument("--parent-pid", type=int, help="launcher: exit when this process exits")
    ap.add_argument("--heartbeat", type=Path, help="file recording when the SuperLink answered")
    ap.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- flower-supernode args")
    args = ap.parse_args(argv)
    if args.launcher:
        run_launcher(f"127.0.0.1:{args.runtime_port}", args.parent_pid)
        return
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    sys.exit(run_site(rest, args.runtime_port, args.heartbeat))


if __name__ == "__main__":
    main()

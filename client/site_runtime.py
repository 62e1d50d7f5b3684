"""What runs at a site: Flower's SuperNode plus a warm ClientApp launcher, started and stopped
together (`python -m client.site_runtime --runtime-port P -- <flower-supernode args>`).

Flower starts a fresh `flwr-clientapp` process for every message, and importing torch, PyG and
Flower costs seconds of each round. The launcher is Flower's own SuperExec loop with one change:
each ClientApp is forked from a fork server that has imported those libraries and nothing else
(no hmgdm code, no model, no data), so every message still gets a fresh process but skips the
imports.

That process runs this site's own installed ClientApp, never code from the run's app bundle
(FAB): the SuperLink's operator chooses the FAB, and privacy enforcement is ClientApp code. The
FAB is neither unpacked nor imported; a run whose FAB names another app or version is refused
with one line naming its sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from logging import INFO
from pathlib import Path

from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from client.flower_env import stop_tree

# Third-party only: a fresh process per message imports this site's app code anew. Importing
# torch starts neither CUDA nor its OpenMP threads, so a forked ClientApp may use both.
APP_ID = "hmgdm/hmgdm"  # [tool.flwr.app] publisher / [project] name, as Flower names the FAB
PRELOAD = (
    "numpy",
    "torch",
    "torch_geometric",
    "pydantic",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


def site_clientapp_loader(**_flower_args) -> Callable[[str, str, str], object]:
    """Stands in for Flower's `get_load_client_app_fn`: whatever the run's FAB holds, the
    ClientApp is this site's installed `client.app`, and only for a run of the same app and
    version (the ServerApp speaks the same messages)."""

    def load(fab_id: str, fab_version: str, fab_hash: str):
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.supercore import log

        installed = importlib.metadata.version("hmgdm")
        if (fab_id, fab_version) != (APP_ID, installed):
            raise LoadClientAppError(
                f"refused run app {fab_id} {fab_version} (FAB sha256 {fab_hash}): this site "
                f"runs only its own installed {APP_ID} {installed}; install and review that "
                "version, or ask the operator to run this one"
            )
        from client.app import app

        log(INFO, "run app %s %s (FAB sha256 %s): serving with this site's installed "
            "ClientApp; no code from the FAB runs here", fab_id, fab_version, fab_hash)  # fmt: skip
        return app

    return load


def _never_install(*_args, **_kwargs) -> None:
    """Flower unpacks each run's FAB before loading it; this site never loads it."""


def _run_clientapp(spec: ExecutionSpec) -> None:
    """Body of one forked ClientApp process: what `flwr-clientapp --token ...` would do."""
    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as flower

    # flwr is pinned (pyproject); a test runs this path against the installed version.
    flower.install_from_fab = _never_install
    flower.get_load_client_app_fn = site_clientapp_loader
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    log(INFO, "Start `flwr-clientapp` process (forked from the warm launcher)")
    flower.run_clientapp(
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


TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's; an operator's value wins
SITE_TASK_POLL_S = "0.25"


def run_launcher(
    runtime_api_address: str, parent_pid: int | None, secret_file: Path | None = None
) -> None:
    """Flower's SuperExec loop (task polling, signals, parent monitor) with the warm executor;
    `secret_file` is the SuperNode's `--superexec-auth-secret-file`."""
    from flwr.supercore.superexec import run_superexec as superexec

    # Every message waits for this poll before its ClientApp starts; Flower's 1 s default would
    # cost each round about a second, and every poll is a request the SuperNode's API serves
    # (at 0.05 s the idle SuperNode used 11% of a core, at 0.25 s 3%).
    os.environ.setdefault(TASK_POLL_ENV, SITE_TASK_POLL_S)
    executor = ForkServerExecutor()
    # run_superexec picks its executor by type through this module-level function; flwr is
    # pinned (pyproject), and a test runs this path against the installed version.
    superexec.get_executor = lambda *_args, **_kwargs: executor
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the Runtime API listens on loopback only (see supernode_command)
        parent_pid=parent_pid,
        runtime_dependency_install=False,
        superexec_auth_secret=secret_file.read_bytes() if secret_file else None,
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
    secret_file = _option(supernode_args, "--superexec-auth-secret-file")
    secret = ["--secret-file", secret_file] if secret_file else []
    launcher = subprocess.Popen(
        [sys.executable, "-m", "client.site_runtime", "--launcher",
         "--runtime-port", str(runtime_port), "--parent-pid", str(node.pid), *secret],
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
    ap.add_argument("--secret-file", type=Path, help="launcher: the Runtime API's shared secret")
    ap.add_argument("--heartbeat", type=Path, help="file recording when the SuperLink answered")
    ap.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- flower-supernode args")
    args = ap.parse_args(argv)
    if args.launcher:
        run_launcher(f"127.0.0.1:{args.runtime_port}", args.parent_pid, args.secret_file)
        return
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    sys.exit(run_site(rest, args.runtime_port, args.heartbeat))


if __name__ == "__main__":
    main()

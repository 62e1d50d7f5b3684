"""How hmgdm runs Flower processes on either side (SuperLink, SuperNode, SuperExec, apps): their
environment (this interpreter's console scripts, nothing installed or reported at run
time), stopping a process and all it started, and a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

# The app's own packages: what the bundle ships and what a site must import anew per message.
APP_PACKAGES = ("client", "server", "hmgdm_core")


def flower_env() -> dict[str, str]:
    """os.environ plus the settings a hospital deployment needs; an operator's own values win
    for the tunables, never for dependency installation."""
    env = dict(os.environ)
    # Flower starts `flower-superexec`, `flwr-clientapp` and `flwr-serverapp` by bare name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Sites and operator install the environment beforehand (air-gapped hospitals).
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Flower sends usage events to telemetry.flower.ai by default; a hospital's machines
    # should not call out to anyone the consortium did not agree on.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # The SuperLink's SuperExec keeps Flower's 1 s task poll: it starts one ServerApp per run,
    # and each poll costs the SuperLink a request (at 0.05 s an idle SuperLink used 24% of a
    # core). Sites poll faster, per message (client.site_runtime).
    return env


def stop_tree(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate `proc` and every process it started, by pid (SIGKILL after `timeout`).

    Flower starts its SuperExec and apps in new sessions, so killing a process group is not
    enough; the tree is followed by parent pid.
    """
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    terminate(tree, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def terminate(procs: list, timeout: float) -> None:
    """SIGTERM each psutil.Process, then SIGKILL what is still alive after `timeout`."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP (systemctl stop, docker stop, kill, timeout, a closed terminal)
    end a command the way Ctrl-C does, so its `finally` blocks stop what it started."""

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def interrupted_exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command (SIGINT when Ctrl-C raised it)."""
    return 128 + (err.args[0] if err.args and isinstance(err.args[0], int) else signal.SIGINT)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def fleet_answers(address: str, ca_cert: Path | None, timeout: float = 5.0) -> str | None:
    """None when the Fleet API at HOST:PORT answers (over TLS checked against `ca_cert`; plain
    HTTP without one), else what went wrong in one line.

    An unauthenticated request is refused by the Fleet API itself (HTTP 401): that answer
    proves the TLS endpoint, the certificate and the SuperLink behind it all work. A 5xx is
    the proxy failing to reach the SuperLink.
    """
    import http.client
    import ssl

    host, port = address.rsplit(":", 1)
    conn = None
    try:  # ssl.SSLError (a CA file that is no certificate, a failed check) is an OSError
        if ca_cert is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        else:
            context = ssl.create_default_context(cafile=str(ca_cert))
            conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)
        conn.request("POST", "/v1/fleet/get-run", body=b"")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as err:
        return f"{address}: {type(err).__name__}: {err}"
    finally:
        if conn is not None:
            conn.close()
    return None if status < 500 else f"{address}: the Fleet API answered HTTP {status}"

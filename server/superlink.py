"""The SuperLink process: started (behind the Fleet-only TLS proxy when deployed), probed until
it listens, and stopped with every process it started.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.flower_env import free_port, stop_tree, terminate
from hmgdm_core.exceptions import HmgdmError
from server.certs import TlsFiles
from server.flwr_cli import flower_bin, flwr_env, write_flower_config


@dataclass
class SuperLink:
    """A running `flower-superlink` (and the Fleet-only proxy sites reach it through).

    `address` is where the operator's `flwr` talks to it (loopback when proxied), `site_address`
    where SuperNodes connect. `stop()` ends both and the ServerApp processes they started.
    """

    proc: subprocess.Popen
    address: str
    site_address: str
    flwr_home: Path
    proxy: subprocess.Popen | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proxy is not None:
            stop_tree(self.proxy, timeout)
        stop_tree(self.proc, timeout)
        # Simulation workers (Ray) can be reparented while the tree shuts down, escaping the
        # snapshot above; everything started for this SuperLink carries its FLWR_HOME.
        terminate(_processes_with_flwr_home(self.flwr_home), timeout)


def _processes_with_flwr_home(flwr_home: Path) -> list:
    import psutil

    home, found = str(Path(flwr_home).resolve()), []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.environ().get("FLWR_HOME") == home:
                found.append(p)
    return found


def _wait_listening(procs: list[subprocess.Popen], host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise HmgdmError(f"{proc.args[0]} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise HmgdmError(f"nothing listened on {host}:{port} within {timeout:.0f} s")


def start_superlink(
    *,
    port: int,
    state_dir: Path,
    tls: TlsFiles | None,
    flwr_home: Path,
    host: str = "127.0.0.1",
    node_auth: bool = True,
    log_path: Path | None = None,
    ready_timeout: float = 60.0,
    sim_sites: int | None = None,
    sim_backend: dict | None = None,
) -> SuperLink:
    """Start a SuperLink with a persistent state DB; sites connect to `host:port`.

    With TLS, the SuperLink itself listens on a loopback port and sites get only the Fleet API
    through `server.fleet_proxy` on `host:port`. With `sim_sites`, it runs Flower's simulation
    engine (virtual sites, no SuperNodes, nothing exposed).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    proxied = tls is not None and not sim_sites
    link_port = free_port() if proxied else port
    link_host = "127.0.0.1" if proxied else host
    cmd = [
        flower_bin("flower-superlink"),
        "--host", link_host,
        "--port", str(link_port),
        "--database", str(state_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if tls is None:
        if node_auth:
            raise HmgdmError("SuperNode authentication needs TLS: pass --tls-dir")
        cmd.append("--insecure")
    else:
        tls.check()
        cmd += [
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
        ]  # fmt: skip
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if sim_sites:
        cmd.append("--simulation")
    address = f"{link_host}:{link_port}"
    write_flower_config(flwr_home, address, tls.ca_cert if tls else None, sim_sites, sim_backend)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = flwr_env(flwr_home)
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    link = SuperLink(proc, address, f"{host}:{port}", Path(flwr_home))
    try:
        _wait_listening([proc], link_host, link_port, ready_timeout)
        if proxied:
            link.proxy = subprocess.Popen(
                [sys.executable, "-m", "server.fleet_proxy", "--listen", f"{host}:{port}",
                 "--upstream", address, "--tls-dir", str(tls.ca_cert.parent)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            _wait_listening([proc, link.proxy], host, port, ready_timeout)
    except HmgdmError as err:
        link.stop()
        raise HmgdmError(f"SuperLink did not start: {err}; see {log_path}") from None
    except BaseException:  # Ctrl-C or SIGTERM while starting: leave nothing running
        link.stop()
        raise
    return link

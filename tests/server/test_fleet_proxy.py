"""The public port of a real `hmgdm-server start` (TLS, loopback) answers only Fleet routes:
raw-path tricks that reached the Control API through the old prefix check, and a seeded fuzz
set of such paths, are refused; an unauthenticated huge body never grows the proxy."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import cmdline, free_port

from client.flower_env import stop_tree
from server.certs import make_certificates
from server.fleet_proxy import FLEET_ROUTES, MAX_BODY
from server.flwr_cli import CONNECTION, app_fab_hash, flower_bin, flwr_env, write_flower_config

pytestmark = pytest.mark.integration

REFUSED = b"not served to sites\n"
# Each of these reached /v1/control/list-runs through the old `startswith("/v1/fleet/")` check.
BYPASSES = [
    "/v1/control/list-runs",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E/control/list-runs",
    "/v1/fleet/..%2fcontrol/list-runs",
    "/v1/fleet/..%2Fcontrol/list-runs",
    "/v1/fleet/.%2e/control/list-runs",
    "/v1/fleet//../control/list-runs",
    "//v1/control/list-runs",
    "/v1/fleet/..\\control/list-runs",
    "/v1/fleet/get-run/../../control/list-runs",
    "/v1/fleet/get-run?x=/../../control/list-runs",
    "/v1/fleet/get-run;/../../control/list-runs",
    "https://localhost/v1/control/list-runs",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`hmgdm-server start` with TLS on a free loopback port, waiting for sites."""
    root = tmp_path_factory.mktemp("start")
    tls = make_certificates(root / "tls", host="localhost")
    (root / "fed.toml").write_text(
        "[federation]\nmin_sites = 1\nmin_replies = 1\nwait_timeout_s = 600\n"
    )
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("hmgdm-server")), "start", "--config",
           str(root / "fed.toml"), "--tls-dir", str(root / "tls"), "--host", "127.0.0.1",
           "--port", str(port), "--state", str(root / "state")]  # fmt: skip
    with open(root / "start.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_listening(proc, port, timeout=180)
        ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
        yield {"port": port, "ctx": ctx, "proc": proc, "log": root / "start.log", "ca": tls.ca_cert}
    finally:
        stop_tree(proc)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "hmgdm-server start exited"
        try:
            # The proxy starts after the SuperLink; its port answering means both are up.
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port}")


def _tls(server, timeout: float) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server["port"]), timeout=timeout)
    return server["ctx"].wrap_socket(raw, server_hostname="localhost")


def request(server, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send `target` exactly as given (like curl --path-as-is); status and body."""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/protobuf\r\nConnection: close\r\n\r\n"
    )
    with _tls(server, timeout=30) as s:
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("target", BYPASSES)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_raw_path_tricks_never_reach_another_api(server, target, method):
    assert request(server, method, target) == (403, REFUSED)


def test_a_fuzz_set_of_paths_only_passes_the_exact_fleet_routes(server):
    rng = random.Random(16)
    tokens = ["v1", "fleet", "control", "runtime", "list-runs", "get-run", "push-object", "..",
              ".", "%2e%2e", "%2E", "%2f", "%2F", "%5c", "", ";", "%00", "%252e%252e", "docs",
              "health", "..;", "fleet%2f..%2fcontrol"]  # fmt: skip
    targets = {"/" + "/".join(rng.choice(tokens) for _ in range(rng.randint(1, 6)))
               for _ in range(80)}  # fmt: skip
    targets |= {route.decode() + suffix for route in FLEET_ROUTES for suffix in ("/", "/.", "%20")}
    for target in sorted(targets):
        status, body = request(server, rng.choice(["POST", "GET", "PUT"]), target)
        assert (status, body) == (403, REFUSED), target


def test_the_stock_flwr_cli_from_outside_is_refused(server, tmp_path):
    # What the attacker used: `flwr` with the consortium's ca.crt, at the public port.
    home = tmp_path / "outsider"
    write_flower_config(home, f"127.0.0.1:{server['port']}", server["ca"])
    # (tests/server/test_deployment.py tries `flwr run` and `flwr supernode register` too.)
    res = subprocess.run([flower_bin("flwr"), "ls", CONNECTION], env=flwr_env(home),
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert res.returncode != 0 and "403 Forbidden" in res.stdout + res.stderr


def test_start_prints_the_sha256_of_the_app_bundle_sites_log(server, tmp_path):
    expected = f"app bundle: FAB sha256 {app_fab_hash(tmp_path)}\n"
    deadline = time.monotonic() + 120  # printed while start waits for sites
    while "app bundle:" not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert expected in server["log"].read_text()


def test_fleet_routes_reach_the_superlink(server):
    for route in sorted(FLEET_ROUTES):
        status, body = request(server, "POST", route.decode())
        # Unauthenticated and empty: the SuperLink refuses it, but it is the SuperLink.
        assert body != REFUSED and status >= 400, route


def _proxy(server) -> psutil.Process:
    procs = psutil.Process(server["proc"].pid).children(recursive=True)
    return next(p for p in procs if "server.fleet_proxy" in cmdline(p))


def _stream(server, head: str, chunks: int, chunk: bytes, chunked: bool) -> int:
    """Send `chunks` x `chunk` after `head` until the proxy answers; its status code."""
    with _tls(server, timeout=60) as s:
        s.sendall(head.encode())
        with contextlib.suppress(OSError):  # the proxy answered and closed while we sent
            for _ in range(chunks):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        return int(s.recv(4096).split()[1])


def test_huge_unauthenticated_bodies_are_refused_without_growing_the_proxy(server):
    proxy = _proxy(server)
    before = proxy.memory_info().rss
    chunk = random.Random(1).randbytes(1 << 20)
    target = "POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\n"
    declared = target + f"Content-Length: {256 << 20}\r\n\r\n"
    assert _stream(server, declared, 256, chunk, chunked=False) == 413
    # Without a declared length the proxy counts while reading and stops at MAX_BODY.
    streamed = target + "Transfer-Encoding: chunked\r\n\r\n"
    assert _stream(server, streamed, 3 * (MAX_BODY >> 20), chunk, chunked=True) == 413
    grown = (proxy.memory_info().rss - before) / 2**20
    assert grown < 48, f"proxy grew by {grown:.0f} MiB"
    assert request(server, "GET", "/v1/control/list-runs")[0] == 403  # still serving

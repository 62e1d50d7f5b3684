"""The operator's side of Flower: TLS material, the Flower config file `flwr` reads, the
SuperLink process (started, probed, stopped) and the register of SuperNode keys that may join.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.flower_env import flower_env
from hmgdm_core.atomic import atomic_write
from hmgdm_core.exceptions import HmgdmError

CONNECTION = "hmgdm"  # the SuperLink connection name written to $FLWR_HOME/config.toml


@dataclass(frozen=True)
class TlsFiles:
    """The files `hmgdm-server certs` writes; sites only ever receive `ca_cert`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, tls_dir: Path) -> TlsFiles:
        # Absolute: the SuperLink and the fleet proxy run with other working directories.
        d = Path(tls_dir).resolve()
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")

    def check(self) -> TlsFiles:
        missing = [
            p.name for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()
        ]
        if missing:
            raise HmgdmError(
                f"{self.ca_cert.parent}: missing {', '.join(missing)}; "
                "create them with `hmgdm-server certs --out DIR`"
            )
        return self


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Exclusive create: a CA or key is never silently replaced, and secrets are born 0600.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _ca_key_usage():
    from cryptography import x509

    # A CA key only signs certificates and revocation lists.
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def make_certificates(out_dir: Path, host: str = "localhost", days: int = 365) -> TlsFiles:
    """A private CA and a server certificate for `host` (plus 127.0.0.1 and localhost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = TlsFiles.in_dir(out_dir)
    existing = [p.name for p in vars(files).values() if p.exists()]
    if existing:
        raise HmgdmError(f"{out_dir}: {', '.join(existing)} already exist; choose another --out")
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hmgdm federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    names: list[x509.GeneralName] = []
    for name in dict.fromkeys([host, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem = serialization.Encoding.PEM
    _write_new(files.ca_key, key_pem(ca_key), 0o600)
    _write_new(files.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write_new(files.server_key, key_pem(server_key), 0o600)
    _write_new(files.server_cert, server_cert.public_bytes(pem), 0o644)
    return files


# One CPU per virtual site (Flower's default of 2 serialises sites on small machines).
DEFAULT_SIM_BACKEND = {"client-resources": {"num-cpus": 1, "num-gpus": 0.0}}


def write_flower_config(
    flwr_home: Path,
    address: str,
    root_cert: Path | None,
    sim_sites: int | None = None,
    sim_backend: dict | None = None,
) -> Path:
    """Point `flwr` (run, log, supernode register) at our SuperLink as its default connection.

    With `sim_sites`, the connection is a simulation federation of that many virtual sites on
    the Ray backend configured by `sim_backend`: "client-resources" (num-cpus, an integer in
    Flower 1.42, and num-gpus, a fraction packs several sites on one card) per virtual site, and
    optionally "init-args" (num-cpus / num-gpus Ray may use here). Ray runs as many sites at
    once as fit; that, not the number of sites, bounds memory.
    """
    import tomli_w

    conn: dict[str, object] = {"address": address}
    if sim_sites:
        conn["options"] = {
            "num-supernodes": sim_sites,
            "backend": sim_backend or DEFAULT_SIM_BACKEND,
        }
    if root_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_cert).resolve())
    doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    return atomic_write(flwr_home / "config.toml", lambda p: p.write_text(tomli_w.dumps(doc)))


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for `flwr` and Flower processes: ours (see flower_env) with our FLWR_HOME."""
    return flower_env() | {"FLWR_HOME": str(Path(flwr_home).resolve())}


def flower_bin(name: str) -> str:
    """A Flower console script from this interpreter's environment (not whatever is on PATH)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


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
        _terminate(_processes_with_flwr_home(self.flwr_home), timeout)


def stop_tree(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate `proc` and every process it started, by pid (SIGKILL after `timeout`).

    Flower starts its SuperExec in a new session, so killing the process group is not enough.
    """
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    _terminate(tree, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def _terminate(procs: list, timeout: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after `timeout`."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _processes_with_flwr_home(flwr_home: Path) -> list:
    import psutil

    home, found = str(Path(flwr_home).resolve()), []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.environ().get("FLWR_HOME") == home:
                found.append(p)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    link_port = _free_port() if proxied else port
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
    return link


def flwr_cli(flwr_home: Path, *args: str, timeout: float = 120.0) -> dict:
    """Run `flwr ARGS --format json` against our connection and return its JSON answer."""
    cmd = [flower_bin("flwr"), *args, "--format", "json"]
    res = subprocess.run(
        cmd, env=flwr_env(flwr_home), capture_output=True, text=True, timeout=timeout, check=False
    )
    # With --format json, flwr prints one JSON object on stdout, also for failures.
    try:
        answer = json.loads(res.stdout[res.stdout.index("{") :])
    except ValueError:
        answer = {"success": False, "error-message": (res.stderr or res.stdout).strip()}
    if res.returncode != 0 or not answer.get("success", True):
        msg = answer.get("error-message") or (res.stderr or res.stdout).strip()
        raise HmgdmError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed: {msg}")
    return answer


def register_site(flwr_home: Path, public_key: Path, name: str | None = None) -> int:
    """Allow the SuperNode holding `public_key`'s private half to join; returns its node id."""
    if not Path(public_key).is_file():
        raise HmgdmError(f"{public_key}: public key not found (create it with hmgdm-client keygen)")
    args = ["supernode", "register", str(public_key), CONNECTION]
    if name:
        args += ["--name", name]
    return int(flwr_cli(flwr_home, *args)["node-id"])


def list_sites(flwr_home: Path) -> list[dict]:
    """Registered SuperNodes with their status as the SuperLink reports them."""
    return list(flwr_cli(flwr_home, "supernode", "list", CONNECTION).get("nodes", []))


def wait_for_online(flwr_home: Path, minimum: int, timeout: float, poll: float = 1.0) -> int:
    """Block until `minimum` registered sites are online; a clear error after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            online = sum(1 for n in list_sites(flwr_home) if n.get("status") == "online")
        except HmgdmError as err:
            # A SuperLink that just started may accept connections before its API answers.
            if "unavailable" not in str(err) or time.monotonic() > deadline:
                raise
            online = 0
        if online >= minimum:
            return online
        if time.monotonic() > deadline:
            raise HmgdmError(
                f"only {online} of the required {minimum} sites came online within "
                f"{timeout:.0f} s; are they registered (`hmgdm-server sites add`) and joined?"
            )
        time.sleep(poll)


def app_dir() -> Path:
    """The Flower app (this project's pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parent.parent
    if "[tool.flwr.app]" not in (root / "pyproject.toml").read_text(errors="ignore"):
        raise HmgdmError(f"{root}: no pyproject.toml with [tool.flwr.app]; run from a checkout")
    return root


def app_fab_hash() -> str:
    """sha256 of the app bundle (FAB) `flwr run` builds from this checkout; each site logs the
    hash of every run it serves (and refuses a bundle of another app or version by it)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir())).hexdigest()


def submit_run(flwr_home: Path, run_config: dict, work_dir: Path) -> subprocess.Popen:
    """`flwr run` of this app with `run_config`, streaming its logs on the returned stdout."""
    import tomli_w

    path = Path(work_dir) / "run_config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(run_config))
    cmd = [flower_bin("flwr"), "run", str(app_dir()), CONNECTION, "--run-config", str(path)]
    return subprocess.Popen(
        [*cmd, "--stream"],
        env=flwr_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_simulation(
    graphs_dir: Path | None,
    out_dir: Path,
    *,
    sites: int,
    cfg,
    run_config: dict,
    echo: bool = False,
    backend: dict | None = None,
) -> Path:
    """One run of this app on Flower's simulation engine with `sites` virtual sites over
    partitions of one graph cache, if any (a local simulation SuperLink, stopped on return).

    Returns the run directory; the log is OUT/run.log.
    """
    import tomli_w

    out_dir = Path(out_dir).resolve()
    run_dir = out_dir / "run"
    link = start_superlink(
        port=_free_port(), state_dir=out_dir / "superlink", tls=None,
        flwr_home=out_dir / "flwr_home", node_auth=False, log_path=out_dir / "superlink.log",
        sim_sites=sites, sim_backend=backend,
    )  # fmt: skip
    try:
        run = submit_run(link.flwr_home, {
            "config-toml": tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)),
            "run-dir": str(run_dir),
            "sim-graphs-dir": str(Path(graphs_dir).resolve()) if graphs_dir else "",
            "sim-state-dir": str(out_dir / "sites"),
            **run_config,
        }, out_dir)  # fmt: skip
        with open(out_dir / "run.log", "w") as log:
            for line in run.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
        run.wait()
    finally:
        link.stop()
    return run_dir


def simulate(
    graphs_dir: Path,
    out_dir: Path,
    *,
    sites: int = 3,
    config: Path | None = None,
    overrides: dict | None = None,
    echo: bool = False,
    backend: dict | None = None,
    summary: bool = True,
    faults: str = "",
) -> Path:
    """Federated pretraining of `sites` simulated hospitals over partitions of one graph cache.

    Runs the same ServerApp/ClientApp as a deployment on Flower's simulation engine (a local
    simulation SuperLink, stopped on return). A cache with `site-K/` sub-caches gives virtual
    site K its own graphs; otherwise sites split the slides round-robin. `backend` sets what
    each virtual site gets from Ray (see `write_flower_config`); Ray joins the cluster named by
    `RAY_ADDRESS` when set. `faults` ("2:nan,3:shape") makes those virtual sites send corrupted
    updates (client/faults.py), to exercise validation. Returns the path of `final.pt`.
    """
    from hmgdm_core.config import load_config

    out_dir = Path(out_dir).resolve()
    cfg = load_config(config, {
        "federation.min_sites": sites, "federation.min_replies": sites, **(overrides or {}),
    })  # fmt: skip
    run_config = {"sim-faults": faults} if faults else {}
    run_dir = run_simulation(
        graphs_dir, out_dir, sites=sites, cfg=cfg, run_config=run_config, echo=echo, backend=backend
    )
    final = run_dir / "final.pt"
    if not final.is_file():
        raise HmgdmError(f"simulated federation did not finish; see {out_dir / 'run.log'}")
    if not summary:
        return final
    from server.summary import print_run_summary

    print_run_summary(run_dir)
    return final


def simulate_downstream(
    graphs_dir: Path,
    labels: Path,
    checkpoint: Path,
    out_dir: Path,
    *,
    task: str,
    sites: int = 3,
    config: Path | None = None,
    overrides: dict | None = None,
    id_column: str = "slide_id",
    patient_column: str = "patient_id",
    echo: bool = False,
) -> Path:
    """Federated fine-tuning + evaluation with `sites` simulated hospitals, each using the rows
    of `labels` for its own slides. Returns the metrics JSON (per-site and pooled figures)."""
    from hmgdm_core.config import load_config
    from hmgdm_core.downstream.labels import read_labels
    from server.downstream import RESULT_NAME

    out_dir = Path(out_dir).resolve()
    cfg = load_config(config, {
        "federation.min_sites": sites, "federation.min_replies": sites, **(overrides or {}),
    })  # fmt: skip
    # The consortium agrees on the class list up front; here it is read off the one file.
    lab = read_labels(labels, None, n_folds=2, task=task, id_column=id_column,
                      patient_column=patient_column)  # fmt: skip
    classes = sorted(set(lab.table["label"])) if task == "classification" else []
    run_dir = run_simulation(graphs_dir, out_dir, sites=sites, cfg=cfg, echo=echo, run_config={
        "mode": "downstream", "checkpoint": str(Path(checkpoint).resolve()), "task": task,
        "classes": ",".join(classes), "sim-labels": str(Path(labels).resolve()),
        "sim-labels-id-column": id_column, "sim-labels-patient-column": patient_column,
    })  # fmt: skip
    result = run_dir / RESULT_NAME
    if not result.is_file():
        raise HmgdmError(f"simulated downstream run did not finish; see {out_dir / 'run.log'}")
    return result

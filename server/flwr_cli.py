"""The operator's side of Flower pointed at our SuperLink: the `flwr` config file and environment,
run submission (`flwr run`), and the register of SuperNode keys that may join (Control API calls
made in this process).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from client.flower_env import APP_PACKAGES, flower_env
from hmgdm_core.atomic import atomic_write
from hmgdm_core.exceptions import HmgdmError

CONNECTION = "hmgdm"  # the SuperLink connection name written to $FLWR_HOME/config.toml


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


def control(flwr_home: Path, rpc: str, request: Any) -> Any:
    """One call `rpc` (e.g. "ListNodes": a protobuf request, its response) of our SuperLink's
    Control API, with Flower's own client in this process: a `flwr` CLI process per call costs
    about 1.2 s of CPU, and `wait_for_online` asks every second."""
    import httpx
    import tomllib
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    conn = tomllib.loads((Path(flwr_home) / "config.toml").read_text())["superlink"][CONNECTION]
    cert = conn.get("root-certificates")
    client = ControlHttpClient.from_server_address(
        server_address=conn["address"],
        insecure=bool(conn.get("insecure")),
        root_certificates=Path(cert).read_bytes() if cert else None,  # bytes: an SSL context
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor("flwr CLI")],
    )
    try:
        with client:
            return getattr(client, rpc)(request)
    except httpx.HTTPStatusError as err:
        answer = err.response.text.strip().replace("\n", " ")[:200]
        status = err.response.status_code
        raise HmgdmError(f"SuperLink {rpc} refused: HTTP {status} {answer}") from None
    except httpx.TransportError as err:
        why = f"{type(err).__name__}: {err}"
        raise HmgdmError(f"SuperLink {rpc} failed: unavailable ({why})") from None


def public_key_pem(public_key: Path) -> bytes:
    """A site.pub (OpenSSH, NIST EC curve) in the form Flower stores keys (PEM
    SubjectPublicKeyInfo); a clear error naming the file otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(public_key)
    if not path.is_file():
        raise HmgdmError(f"{path}: public key not found (create it with hmgdm-client keygen)")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise HmgdmError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise HmgdmError(f"{path}: not an EC public key (hmgdm-client keygen makes one)")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def register_site(flwr_home: Path, public_key: Path, name: str | None = None) -> int:
    """Allow the SuperNode holding `public_key`'s private half to join; returns its node id."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    request = RegisterNodeRequest(public_key=public_key_pem(public_key), name=name)
    return int(control(flwr_home, "RegisterNode", request).node_id)


def unregister_site(flwr_home: Path, node_id: int) -> None:
    """Refuse the key of SuperNode `node_id` from now on, including an open connection."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    control(flwr_home, "UnregisterNode", UnregisterNodeRequest(node_id=node_id))


def list_sites(flwr_home: Path) -> list[dict]:
    """Registered SuperNodes (node-id, name, status) as the SuperLink reports them."""
    from flwr.proto.control_pb2 import ListNodesRequest

    nodes = control(flwr_home, "ListNodes", ListNodesRequest()).nodes_info
    return [
        {"node-id": str(n.node_id), "name": n.name, "status": n.status}
        for n in nodes
        if n.status != "deleted"
    ]


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


def app_dir(work_dir: Path) -> Path:
    """The Flower app to run, staged as WORK_DIR/app: the app packages and the app definition
    (pyproject.toml, configs), from this checkout or, for an installed wheel, from the files the
    wheel carries, so both give the same app bundle. Staging also spares Flower's bundler a
    walk through every file of the checkout's .venv (5 s per `flwr run`)."""
    root = Path(__file__).resolve().parent.parent
    if _flower_app(root / "pyproject.toml"):
        definition = [root / "pyproject.toml", *sorted((root / "configs").glob("*.toml"))]
    else:
        definition = _installed_definition(root)
    stage = Path(work_dir) / "app"
    shutil.rmtree(stage, ignore_errors=True)
    for package in APP_PACKAGES:
        shutil.copytree(root / package, stage / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (stage / "configs").mkdir()
    for path in definition:
        shutil.copy(path, stage / ("configs" if path.parent.name == "configs" else "") / path.name)
    return stage


def _installed_definition(root: Path) -> list[Path]:
    """pyproject.toml and configs/*.toml as the installed wheel carries them."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("hmgdm")
    except PackageNotFoundError:
        raise HmgdmError(f"{root}: hmgdm is neither a checkout nor installed") from None
    data_dirs = (("share", "hmgdm"), ("hmgdm", "configs"))
    shared = [
        Path(str(dist.locate_file(f)))
        for f in dist.files or []
        if Path(str(f)).parts[-3:-1] in data_dirs
    ]
    project = next((p for p in shared if p.name == "pyproject.toml"), None)
    if project is None or not _flower_app(project):
        raise HmgdmError(f"{dist.locate_file('')}: the installed hmgdm carries no Flower app")
    return shared


def _flower_app(pyproject: Path) -> bool:
    return pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(errors="ignore")


def app_fab_hash(work_dir: Path) -> str:
    """sha256 of the app bundle (FAB) `flwr run` builds from `app_dir`; each site logs the hash
    of every run it serves (and refuses a bundle of another app or version by it)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir(work_dir))).hexdigest()


def submit_run(flwr_home: Path, run_config: dict, work_dir: Path) -> subprocess.Popen:
    """`flwr run` of this app with `run_config`, streaming its logs on the returned stdout."""
    import tomli_w

    path = Path(work_dir) / "run_config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(run_config))
    cmd = [flower_bin("flwr"), "run", str(app_dir(work_dir)), CONNECTION, "--run-config", str(path)]
    return subprocess.Popen(
        [*cmd, "--stream"],
        env=flwr_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

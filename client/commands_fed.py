"""`hmgdm-client keygen` and `hmgdm-client join`: a site's identity key and its SuperNode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from client.flower_env import (
    flower_env,
    free_port,
    interrupted_exit_code,
    port_in_use,
    stop_on_signals,
    stop_tree,
)
from client.heartbeat import HEARTBEAT_FILE
from hmgdm_core.atomic import atomic_write
from hmgdm_core.cli import check_plaintext, fail
from hmgdm_core.exceptions import HmgdmError

RUNTIME_SECRET = "runtime.secret"  # in the state dir: the SuperNode <-> launcher shared secret

if TYPE_CHECKING:
    from client.site import Site


def write_keypair(out_dir: Path, name: str = "site") -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, the form Flower's SuperNode auth loads."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise HmgdmError(f"{p} already exists; a site keeps one key (or choose another --out)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    # Exclusive create with 0600: the private key never exists world-readable, not even briefly.
    for path, data, mode in ((priv_path, private, 0o600), (pub_path, public + b"\n", 0o644)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return priv_path, pub_path


def keygen(
    out: Path = typer.Option(..., "--out", help="Directory for site.key (secret) and site.pub."),
) -> None:
    """Create this site's key pair; send site.pub to the consortium operator, keep site.key."""
    try:
        priv, pub = write_keypair(out)
    except HmgdmError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"private key: {priv} (keep it here)\npublic key:  {pub} (send to the operator)")


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).resolve()


def _checked_site(
    graphs: Path,
    state_dir: Path,
    *,
    privacy_config: Path | None,
    patients: Path | None,
    labels: Path | None,
    id_column: str,
    patient_column: str,
    clinical: Path | None,
) -> Site:
    """This site's settings for its node config, each file read now: a typo fails here, not in
    the middle of the consortium's first round."""
    from client.site import Site, load_site_privacy
    from hmgdm_core.privacy.patients import read_patients

    graphs, state_dir = Path(graphs).resolve(), Path(state_dir).resolve()
    if not (graphs / "graphs").is_dir():
        raise HmgdmError(f"{graphs}: not a graph cache (run hmgdm-client build-graphs first)")
    state_dir.mkdir(parents=True, exist_ok=True)
    if privacy_config is not None:
        load_site_privacy(privacy_config)
    if patients is not None:
        read_patients(patients)
    if labels is not None and not Path(labels).is_file():
        raise HmgdmError(f"{labels}: labels file not found")
    if clinical is not None:
        from hmgdm_core.downstream.tcga import read_tcga_survival

        read_tcga_survival(clinical)
    return Site(
        graphs_dir=graphs,
        state_dir=state_dir,
        privacy_config=_absolute(privacy_config),
        patients=_absolute(patients),
        # Read only by this site's ClientApp (federated fine-tuning and evaluation).
        labels=_absolute(labels),
        labels_id_column=id_column,
        labels_patient_column=patient_column,
        clinical=_absolute(clinical),
    )


def supernode_command(
    *,
    superlink: str,
    graphs: Path,
    state_dir: Path,
    root_cert: Path | None,
    auth_key: Path | None,
    local_port: int | None = None,
    max_wait_s: float | None = None,
    privacy_config: Path | None = None,
    patients: Path | None = None,
    labels: Path | None = None,
    id_column: str = "slide_id",
    patient_column: str = "patient_id",
    clinical: Path | None = None,
    warm: bool = True,
) -> list[str]:
    """The command that runs this site's SuperNode (also used by tests and benchmarks).

    `warm` (default, what `join` runs): with the warm ClientApp launcher of
    `client.site_runtime`, which serves only this installation's ClientApp and keeps
    STATE_DIR/heartbeat.json. Otherwise a plain `flower-supernode` that starts every ClientApp
    as a cold `flwr-clientapp` process from the run's FAB: Flower's stock behaviour, kept only
    as a benchmark baseline. `local_port`: the SuperNode's loopback ClientApp port; None picks
    a free one (several sites can run on one host).
    """
    import tomli_w

    site = _checked_site(
        graphs, state_dir, privacy_config=privacy_config, patients=patients, labels=labels,
        id_column=id_column, patient_column=patient_column, clinical=clinical,
    )  # fmt: skip
    if local_port is None:
        local_port = free_port()
    elif port_in_use(local_port):
        raise HmgdmError(
            f"--local-port {local_port}: 127.0.0.1:{local_port} is already in use (another site "
            "on this host?); pass a free port or leave --local-port out to pick one"
        )
    # A TOML file instead of an inline string: paths with spaces or quotes survive intact.
    node_config = site.state / "node_config.toml"
    node_config.write_text(tomli_w.dumps(site.node_config()))
    cmd = [
        "--superlink", superlink,
        "--node-config", str(node_config),
        # The ClientApp runtime API only ever listens on loopback.
        "--host", "127.0.0.1",
        "--port", str(local_port),
    ]  # fmt: skip
    if root_cert is None:
        cmd.append("--insecure")
    else:
        if not Path(root_cert).is_file():
            raise HmgdmError(f"{root_cert}: CA certificate not found")
        cmd += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        if not Path(auth_key).is_file():
            raise HmgdmError(f"{auth_key}: private key not found (hmgdm-client keygen makes one)")
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    if not warm:
        return [str(Path(sys.executable).with_name("flower-supernode")), *cmd,
                "--isolation", "subprocess"]  # fmt: skip
    # Only the launcher (and the site's own users) may take tasks from the Runtime API: a new
    # secret each start, readable by this user alone.
    secret = atomic_write(site.state / RUNTIME_SECRET, lambda p: p.write_bytes(os.urandom(32)))
    cmd += ["--superexec-auth-secret-file", str(secret)]
    launcher = [sys.executable, "-m", "client.site_runtime", "--runtime-port", str(local_port),
                "--heartbeat", str(site.state / HEARTBEAT_FILE)]  # fmt: skip
    return [*launcher, "--", *cmd]


def _check_transport(superlink: str, root_cert: Path | None, insecure: bool) -> None:
    """TLS unless the site says `--insecure`, and plaintext only to this machine."""
    if insecure and root_cert is not None:
        raise HmgdmError("--insecure and --root-cert: choose one")
    if insecure:
        check_plaintext(superlink.rsplit(":", 1)[0])
    elif root_cert is None:
        raise HmgdmError(
            "--root-cert is required: the consortium's ca.crt, from the operator "
            "(--insecure only for a SuperLink on this machine)"
        )


def _warn_unbounded_budget(privacy_config: Path | None) -> None:
    from client.site import load_site_privacy

    local_dp = load_site_privacy(privacy_config)[0] if privacy_config is not None else None
    if local_dp is not None and local_dp.max_epsilon is None:
        typer.secho(
            f"warning: {privacy_config} sets no [local_dp] max_epsilon: this site will train "
            "every round the server asks for and its epsilon has no limit",
            fg=typer.colors.YELLOW,
            err=True,
        )


def join(
    superlink: str = typer.Option(..., "--superlink", help="The consortium's HOST:PORT."),
    graphs: Path = typer.Option(..., "--graphs", help="This site's graph cache (build-graphs)."),
    root_cert: Path | None = typer.Option(
        None, "--root-cert", help="The consortium CA certificate (ca.crt), unless --insecure."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext, no TLS: only to a SuperLink on this machine (tests)."
    ),
    auth_key: Path | None = typer.Option(
        None, "--auth-key", help="This site's private key from keygen (site.key)."
    ),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Site checkpoints and local weights [default: GRAPHS/federation]."
    ),
    local_port: int | None = typer.Option(
        None, "--local-port", help="Loopback port for ClientApps [default: a free one]."
    ),
    privacy_config: Path | None = typer.Option(
        None,
        "--privacy-config",
        dir_okay=False,
        help="This site's own privacy TOML; local DP uses its settings, never the server's.",
    ),
    patients: Path | None = typer.Option(
        None,
        "--patients",
        dir_okay=False,
        help="CSV slide_id,patient_id: local DP protects each patient, not each slide.",
    ),
    labels: Path | None = typer.Option(
        None, "--labels", dir_okay=False, help="This site's labels.csv for federated fine-tuning."
    ),
    id_column: str = typer.Option("slide_id", "--id-column", help="Column naming the slide."),
    patient_column: str = typer.Option("patient_id", "--patient-column", help="Patient column."),
    clinical: Path | None = typer.Option(
        None,
        "--clinical",
        dir_okay=False,
        help="This site's clinical survival table (TCGA CSV format) for federated Cox.",
    ),
) -> None:
    """Join the federation: run a SuperNode that trains on GRAPHS when the server asks.

    Only model weights and scalar metrics leave this machine; graphs stay in GRAPHS.
    """
    try:
        _check_transport(superlink, root_cert, insecure)
        _warn_unbounded_budget(privacy_config)
        cmd = supernode_command(
            superlink=superlink,
            graphs=graphs,
            state_dir=state_dir or Path(graphs) / "federation",
            root_cert=root_cert,
            auth_key=auth_key,
            local_port=local_port,
            privacy_config=privacy_config,
            patients=patients,
            labels=labels,
            id_column=id_column,
            patient_column=patient_column,
            clinical=clinical,
        )
    except HmgdmError as err:
        raise fail(err) from None
    typer.echo(f"joining {superlink} with graphs from {graphs} (Ctrl-C to leave)")
    stop_on_signals()  # SIGTERM (systemctl, docker stop, kill) leaves like Ctrl-C does
    proc = subprocess.Popen(cmd, env=flower_env())
    try:
        code = proc.wait()
    except KeyboardInterrupt as err:
        # The SuperNode stops its ClientApps; whatever outlives the grace period is killed.
        stop_tree(proc, timeout=10)
        typer.echo("left the federation")
        code = interrupted_exit_code(err)
    raise typer.Exit(code)

"""`hmgdm-server certs`, `start`, `simulate` and `sites add|list|remove`: the operator's
federation commands."""

from __future__ import annotations

from pathlib import Path

import typer

from client.flower_env import stop_on_signals
from hmgdm_core.cli import fail
from hmgdm_core.exceptions import HmgdmError

DEFAULT_STATE = Path("federation")

sites = typer.Typer(help="Manage which sites (SuperNode keys) may join.", no_args_is_help=True)


_fail = fail


certs_app = typer.Typer(
    help="Create the consortium's CA and server certificate, or renew the server certificate."
)


@certs_app.callback(invoke_without_command=True)
def certs(
    ctx: typer.Context,
    out: Path | None = typer.Option(
        None, "--out", help="Directory for ca.crt, server.pem and keys (required to create)."
    ),
    host: str = typer.Option("localhost", "--host", help="Name sites use to reach the server."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of the certificates."),
) -> None:
    """Create a private CA and a server certificate; give sites only ca.crt."""
    from server.certs import make_certificates

    if ctx.invoked_subcommand is not None:
        return
    try:
        if out is None:
            raise HmgdmError("--out is required (or `certs renew --tls-dir DIR` to renew)")
        files = make_certificates(out, host=host, days=days)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(f"CA certificate (send to sites): {files.ca_cert}")
    typer.echo(f"server certificate for {host}, 127.0.0.1: {files.server_cert}")


@certs_app.command("renew")
def certs_renew(
    tls_dir: Path = typer.Option(..., "--tls-dir", help="The directory `certs --out` made."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of the new certificate."),
    host: str | None = typer.Option(
        None, "--host", help="Name sites use to reach the server [default: the current one]."
    ),
) -> None:
    """A new server key and certificate from the same CA (sites keep their ca.crt); then
    restart `hmgdm-server start --resume` to serve it."""
    from server.certs import renew_server_certificate

    try:
        done = renew_server_certificate(tls_dir, days=days, host=host)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(
        f"new server certificate for {done.host}, valid until {done.not_after:%Y-%m-%d} (was "
        f"{done.previous_not_after:%Y-%m-%d}; old pair kept as {done.backup.name} and "
        "server.key.old); restart `hmgdm-server start --resume` to serve it"
    )


def start(
    config: Path | None = typer.Option(None, "--config", "-c", help="hmgdm TOML config."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last round saved."),
    tls_dir: Path | None = typer.Option(None, "--tls-dir", help="Output of `certs` (required)."),
    sites_dir: Path | None = typer.Option(
        None, "--sites", help="Register every *.pub in this directory before starting."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on for sites."),
    port: int = typer.Option(9092, "--port", help="Port sites connect to."),
    state: Path = typer.Option(DEFAULT_STATE, "--state", help="SuperLink state, logs, runs."),
    insecure: bool = typer.Option(
        False, "--insecure", help="No TLS, no site auth: only with a loopback --host (tests)."
    ),
    finetune: Path | None = typer.Option(
        None,
        "--finetune",
        help="Instead of pretraining: fine-tune this checkpoint on the sites' "
        "labels (they join with --labels) and evaluate it federated.",
    ),
    task: str = typer.Option("classification", "--task", help="With --finetune: or survival."),
    classes: str = typer.Option(
        "", "--classes", help="With --finetune: the consortium's class names, comma-separated."
    ),
    survival_clinical: bool = typer.Option(
        False,
        "--survival-clinical",
        help="Instead of pretraining: federated Cox on the sites' clinical tables (they join "
        "with --clinical); report in the run directory.",
    ),
) -> None:
    """Start the SuperLink, wait for the minimum of sites, run federated pretraining.

    Sites reach only Flower's Fleet API (a TLS proxy on --host:--port); submitting runs and
    registering sites stay on loopback. The SuperLink keeps its state (registered sites, runs)
    in STATE/superlink.db across restarts. Ctrl-C stops the run and the SuperLink.
    """
    from client.flower_env import interrupted_exit_code
    from hmgdm_core.config import load_config
    from server.certs import serving_tls
    from server.flwr_cli import app_fab_hash, submit_run, wait_for_online
    from server.run_config import submission
    from server.summary import check_run, print_run_summary
    from server.superlink import start_superlink

    stop_on_signals()  # a service manager's SIGTERM stops the SuperLink and the run too
    try:
        tls = serving_tls(tls_dir, insecure, host)
        cfg = load_config(config)
        fed = cfg.federation
        downstream = _mode_run_config(finetune, task, classes, survival_clinical)
        home = state / "flwr_home"
        link = start_superlink(
            port=port,
            state_dir=state,
            tls=tls,
            flwr_home=home,
            host=host,
            node_auth=not insecure,
            log_path=state / "superlink.log",
        )
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(
        f"sites connect to {link.site_address}; runs and site keys are managed on "
        f"{link.address} (log: {state / 'superlink.log'})"
    )
    run = None
    try:
        _register_keys(state, sites_dir)
        typer.echo(f"waiting up to {fed.wait_timeout_s:.0f} s for {fed.min_sites} sites ...")
        # Sites run their own installed ClientApp of this version, never this bundle's code;
        # each logs the hash of the runs it serves.
        typer.echo(f"app bundle: FAB sha256 {app_fab_hash(state)}")
        wait_for_online(home, fed.min_sites, fed.wait_timeout_s)
        run_dir = fed.run_dir if fed.run_dir.is_absolute() else (state / fed.run_dir)
        run_config = submission(cfg, run_dir=run_dir.resolve(), resume=resume, **downstream)
        run = submit_run(home, run_config, state)
        for line in run.stdout:
            typer.echo(line, nl=False)
        code = run.wait()
        mode = downstream.get("mode", "pretrain")
        if mode == "pretrain":  # other modes report in their own files, not the round summary
            print_run_summary(run_dir)
        check_run(run_dir, mode, state / "superlink.log")
    except HmgdmError as err:
        raise _fail(err) from None
    except KeyboardInterrupt as err:
        typer.echo("stopping ...")
        code = interrupted_exit_code(err)
    finally:
        if run is not None and run.poll() is None:
            run.terminate()
        link.stop()
    raise typer.Exit(code)


def _register_keys(state: Path, sites_dir: Path | None) -> None:
    """Register every site key SITES/*.pub under its file name (known ones are kept, removed
    ones are not let back in)."""
    from server.sites import add_site, removed_key

    for pub in sorted(sites_dir.glob("*.pub")) if sites_dir else []:
        try:
            typer.echo(f"registered {pub.stem}: node {add_site(state, pub, pub.stem)}")
        except HmgdmError as err:
            if "already in use" not in str(err):
                raise
            if (gone := removed_key(state, pub)) is not None:
                typer.echo(f"not registering {pub}: its site was removed {gone.removed_at}")


def _mode_run_config(
    checkpoint: Path | None, task: str, classes: str, survival_clinical: bool
) -> dict:
    """The run config keys of the chosen mode (empty for pretraining)."""
    if survival_clinical:
        if checkpoint is not None:
            raise HmgdmError("--finetune and --survival-clinical are two different runs")
        return {"mode": "survival-clinical"}
    if checkpoint is None:
        return {}
    if not Path(checkpoint).is_file():
        raise HmgdmError(f"{checkpoint}: checkpoint not found")
    if task not in ("classification", "survival"):
        raise HmgdmError(f"--task must be classification or survival, not '{task}'")
    if task == "classification" and not classes:
        raise HmgdmError("--finetune with classification needs --classes A,B,...")
    return {"mode": "downstream", "checkpoint": str(Path(checkpoint).resolve()), "task": task,
            "classes": classes}  # fmt: skip


def simulate(
    graphs: Path = typer.Option(..., "--graphs", help="One graph cache, split into the sites."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (checkpoints, logs)."),
    sites: int = typer.Option(3, "--sites", min=1, help="Simulated hospitals."),
    config: Path | None = typer.Option(None, "--config", "-c", help="hmgdm TOML config."),
    verbose_run: bool = typer.Option(False, "--stream", help="Print the run's log live."),
    faults: str = typer.Option(
        "", "--faults", help='Sites that send broken updates, e.g. "1:liar,2:nan,3:shape,4:huge".'
    ),
) -> None:
    """Federated pretraining with simulated hospitals on this machine (Flower simulation)."""
    from server.simulation import simulate as run_simulation

    stop_on_signals()  # SIGTERM stops the simulation SuperLink and Ray too

    try:
        run_simulation(graphs, out, sites=sites, config=config, echo=verbose_run, faults=faults)
    except HmgdmError as err:
        raise _fail(err) from None


def _state_option() -> Path:
    return typer.Option(DEFAULT_STATE, "--state", help="SuperLink state and Flower config dir.")


@sites.command("add")
def sites_add(
    public_key: Path = typer.Argument(..., help="A site's site.pub from hmgdm-client keygen."),
    name: str | None = typer.Option(None, "--name", help="A label for the site in logs."),
    state: Path = _state_option(),
) -> None:
    """Allow the SuperNode holding this key to join (the SuperLink must be running)."""
    from server.sites import add_site

    try:
        node_id = add_site(state, public_key, name)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(f"registered {public_key} as node {node_id}")


@sites.command("list")
def sites_list(state: Path = _state_option()) -> None:
    """List registered sites from the SuperLink's database (running or not): node id, status
    (registered = never connected, online, offline, removed), name, when registered, last
    connected and removed."""
    from server.sites import stored_sites, superlink_running

    try:
        found = stored_sites(state)
    except HmgdmError as err:
        raise _fail(err) from None
    if not superlink_running(state):
        typer.echo(f"the SuperLink of {state} is not running: no site is online", err=True)
    for s in found:
        when = "\t".join(t or "-" for t in (s.registered_at, s.last_seen, s.removed_at))
        typer.echo(f"{s.node_id}\t{s.status}\t{s.name or '-'}\t{when}")


@sites.command("remove")
def sites_remove(
    site: str = typer.Argument(..., help="The site's name (or node id) in `sites list`."),
    state: Path = _state_option(),
) -> None:
    """Unregister a site: the SuperLink refuses its key from now on (the SuperLink must be
    running). To let the hospital back in, it makes a new key with `hmgdm-client keygen`."""
    from server.sites import remove_site

    try:
        removed = remove_site(state, site)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(f"removed {removed.name or site} (node {removed.node_id})")


def report(
    run_dir: Path = typer.Argument(..., help="A federated pretraining run directory."),
    out: Path | None = typer.Option(None, "--out", "-o", help="[default: RUN_DIR/report.html]"),
) -> None:
    """Write one self-contained HTML page of a run: curves per round (losses, other metrics,
    participation, epsilon per site, round times) and its tables; opens offline."""
    from server.report import write_report

    try:
        path = write_report(run_dir, out)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(f"wrote {path}")

"""`hmgdm-server certs`, `start` and `sites add|list`: the operator's federation commands."""

from __future__ import annotations

from pathlib import Path

import typer

from hmgdm_core.exceptions import HmgdmError

DEFAULT_STATE = Path("federation")

sites = typer.Typer(help="Manage which sites (SuperNode keys) may join.", no_args_is_help=True)


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def certs(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.pem and keys."),
    host: str = typer.Option("localhost", "--host", help="Name sites use to reach the server."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of the certificates."),
) -> None:
    """Create a private CA and a server certificate; give sites only ca.crt."""
    from server.superlink import make_certificates

    try:
        files = make_certificates(out, host=host, days=days)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(f"CA certificate (send to sites): {files.ca_cert}")
    typer.echo(f"server certificate for {host}, 127.0.0.1: {files.server_cert}")


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
    from hmgdm_core.cli import check_plaintext
    from hmgdm_core.config import load_config
    from server.summary import print_run_summary
    from server.superlink import (
        TlsFiles,
        app_fab_hash,
        register_site,
        start_superlink,
        submit_run,
        wait_for_online,
    )

    if tls_dir is None and not insecure:
        raise _fail(HmgdmError("--tls-dir is required (create it with `hmgdm-server certs`)"))
    try:
        if insecure:
            if tls_dir is not None:
                raise HmgdmError("--insecure and --tls-dir: choose one")
            check_plaintext(host)
        cfg = load_config(config)
        fed = cfg.federation
        downstream = _downstream_run_config(finetune, task, classes)
        if survival_clinical:
            if finetune is not None:
                raise HmgdmError("--finetune and --survival-clinical are two different runs")
            downstream = {"mode": "survival-clinical"}
        tls = None if insecure else TlsFiles.in_dir(tls_dir).check()
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
    # Sites run their own installed ClientApp of this version, never this bundle's code; each
    # logs the hash of the runs it serves.
    typer.echo(f"app bundle: FAB sha256 {app_fab_hash()}")
    run = None
    try:
        for pub in sorted(sites_dir.glob("*.pub")) if sites_dir else []:
            try:
                typer.echo(f"registered {pub.stem}: node {register_site(home, pub, pub.stem)}")
            except HmgdmError as err:
                if "already in use" not in str(err):
                    raise
        typer.echo(f"waiting up to {fed.wait_timeout_s:.0f} s for {fed.min_sites} sites ...")
        wait_for_online(home, fed.min_sites, fed.wait_timeout_s)
        run_dir = fed.run_dir if fed.run_dir.is_absolute() else (state / fed.run_dir)
        run = submit_run(
            home,
            {
                "config-toml": config.read_text() if config else "",
                "run-dir": str(run_dir.resolve()),
                "resume": resume,
                **downstream,
            },
            state,
        )
        for line in run.stdout:
            typer.echo(line, nl=False)
        code = run.wait()
        if not downstream:  # a downstream run reports in its own files, not the round summary
            print_run_summary(run_dir)
    except HmgdmError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        typer.echo("stopping ...")
        code = 130
    finally:
        if run is not None and run.poll() is None:
            run.terminate()
        link.stop()
    raise typer.Exit(code)


def _downstream_run_config(checkpoint: Path | None, task: str, classes: str) -> dict:
    """Run config of a federated fine-tuning run (empty for pretraining)."""
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
        "", "--faults", help='Sites that send broken updates, e.g. "2:nan,3:shape,4:huge".'
    ),
) -> None:
    """Federated pretraining with simulated hospitals on this machine (Flower simulation)."""
    from server.superlink import simulate as run_simulation

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
    from server.superlink import register_site

    try:
        node_id = register_site(state / "flwr_home", public_key, name)
    except HmgdmError as err:
        raise _fail(err) from None
    typer.echo(f"registered {public_key} as node {node_id}")


@sites.command("list")
def sites_list(state: Path = _state_option()) -> None:
    """List registered sites and whether they are online."""
    from server.superlink import list_sites

    try:
        nodes = list_sites(state / "flwr_home")
    except HmgdmError as err:
        raise _fail(err) from None
    for node in nodes:
        typer.echo(f"{node.get('node-id')}\t{node.get('status')}\t{node.get('name') or ''}")

"""`hmgdm-server study run`: a grid of simulated federations, baselines and probes from one
study TOML to `results.csv`, `report.md` and plots (hmgdm_core.studies does the science).
"""

from __future__ import annotations

from pathlib import Path

import typer

from hmgdm_core.exceptions import HmgdmError

study = typer.Typer(help="Benchmark studies on simulated sites.", no_args_is_help=True)


def federate(graphs: Path, work: Path, sites: int, overrides: dict, backend: dict) -> Path:
    """One federated cell on Flower's simulation engine (Ray), the same apps as a deployment."""
    from server.simulation import simulate

    return simulate(graphs, work, sites=sites, overrides=overrides, backend=backend, summary=False)


@study.command("run")
def run(
    config: Path = typer.Argument(..., help="Study TOML (see configs/studies/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Study directory; reruns resume here."),
    data: Path | None = typer.Option(
        None, "--data", help="Real data folder (default: $HMGDM_DATA or ../shared/data)."
    ),
) -> None:
    """Run every unfinished cell of the study, then write results.csv, report.md and plots.

    Federated cells run on Flower's simulation engine; each virtual site gets the study's
    resources from Ray (RAY_ADDRESS joins an existing cluster). Finished cells are never rerun.
    """
    from rich.console import Console

    from hmgdm_core.studies.config import load_study
    from hmgdm_core.studies.report import rich_table, write_report
    from hmgdm_core.studies.runner import run_study

    try:
        cfg = load_study(config)
        done = run_study(cfg, out, federate=federate, data=data)
    except HmgdmError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    summary = write_report(out, done.results, cfg.name)
    console = Console()
    console.print(rich_table(summary, f"study {cfg.name}: {out / 'results.csv'}"))
    console.print(
        f"{len(done.computed)} cells run now, {len(done.skipped)} already done; "
        f"report: {out / 'report.md'}"
    )

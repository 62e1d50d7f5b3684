"""`hmgdm-server finetune`: federated fine-tuning + evaluation with simulated hospitals."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from client.flower_env import stop_on_signals
from hmgdm_core.exceptions import HmgdmError


def finetune(
    graphs: Path = typer.Option(..., "--graphs", help="One graph cache, split into the sites."),
    labels: Path = typer.Option(
        ..., "--labels", help="labels.csv; each site uses its slides' rows."
    ),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="The pretrained (final.pt) model."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (metrics, model, logs)."),
    task: str = typer.Option("classification", "--task", help="classification or survival."),
    sites: int = typer.Option(3, "--sites", min=1, help="Simulated hospitals."),
    config: Path | None = typer.Option(None, "--config", "-c", help="hmgdm TOML config."),
    id_column: str = typer.Option("slide_id", "--id-column", help="Column naming the slide."),
    patient_column: str = typer.Option("patient_id", "--patient-column", help="Patient column."),
    verbose_run: bool = typer.Option(False, "--stream", help="Print the run's log live."),
) -> None:
    """FedAvg fine-tuning of the slide head (+ encoder) on each site's own labels, then each
    site evaluates on its held-out patients; per-site and pooled figures in
    OUT/run/downstream_metrics.json, the fine-tuned model in OUT/run/finetuned.pt."""
    from server.commands_fed import _fail
    from server.simulation import simulate_downstream

    stop_on_signals()  # SIGTERM stops the simulation SuperLink and Ray too

    if task not in ("classification", "survival"):
        raise _fail(HmgdmError(f"--task must be classification or survival, not '{task}'"))
    try:
        path = simulate_downstream(
            graphs, labels, checkpoint, out, task=task, sites=sites, config=config,
            id_column=id_column, patient_column=patient_column, echo=verbose_run,
        )  # fmt: skip
    except HmgdmError as err:
        raise _fail(err) from None
    result = json.loads(path.read_text())
    for name, figures in [*result["sites"].items(), ("pooled", result["pooled"])]:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))
        typer.echo(f"{name}: {shown}")
    typer.echo(f"wrote {path}")


def survival_clinical(
    table: Path = typer.Argument(..., help="TCGA-style survival CSV (one row per slide)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for metrics, sites.csv, KM."),
    min_events: int = typer.Option(
        10, "--min-events", min=1, help="Tissue source sites with fewer events are merged."
    ),
    verbose_run: bool = typer.Option(False, "--stream", help="Print the run's log live."),
) -> None:
    """Federated Cox on clinical covariates (age, sex) with tissue source sites as simulated
    hospitals (Flower simulation engine, `query.cox` messages): Newton steps on summed site
    statistics, pooled pair-count C-index, federated KM plot; files in OUT/run/."""
    from server.commands_fed import _fail
    from server.simulation import simulate_clinical_survival

    stop_on_signals()  # SIGTERM stops the simulation SuperLink and Ray too

    try:
        path, summary = simulate_clinical_survival(
            table, out, min_events=min_events, echo=verbose_run
        )
    except HmgdmError as err:
        raise _fail(err) from None
    m = json.loads(path.read_text())
    coefs = ", ".join(f"{k} {v:+.4f}" for k, v in m["coefficients"].items())
    typer.echo(
        f"{table.name}: {m['patients']} patients ({summary['cases_missing_values']} without "
        f"covariates left out), {m['events']} events, {m['sites']} sites "
        f"(tissue source sites with < {min_events} events merged)"
    )
    typer.echo(
        f"federated Cox ({m['newton_rounds']} Newton rounds): {coefs}; max rel. difference to "
        f"lifelines on pooled rows {m['max_relative_coef_difference']:.1e}"
    )
    km = (
        f"KM high vs low risk ({len(m['km_sites'])} of {m['sites']} sites released life "
        f"tables, {m['km_patients']} patients) log-rank p {m['logrank_p']:.2g}"
        if m["logrank_p"] is not None
        else "no site released life tables (disclosure policies): no KM"
    )
    typer.echo(f"C-index from pooled site pair counts {m['cindex_pooled_pairs']:.3f}; {km}")
    typer.echo(f"wrote {path.parent}/metrics.json, sites.csv, km.json, km.png")

"""`hmgdm-client evaluate classify|survival`: frozen-encoder probes on a site's own labels."""

from __future__ import annotations

from pathlib import Path

import typer

evaluate = typer.Typer(
    help="Evaluate a pretrained encoder on this site's labels (patient-grouped k-fold).",
    no_args_is_help=True,
)

GRAPHS = typer.Option(..., "--graphs", "-g", help="Graph cache from build-graphs.")
CHECKPOINT = typer.Option(..., "--checkpoint", help="A pretrain or federated checkpoint.")
LABELS = typer.Option(
    ..., "--labels", help="CSV: slide_id + label (or time + event), optional patient_id."
)
OUT = typer.Option(..., "--out", "-o", help="Directory for metrics.json, folds.csv and plots.")
CONFIG = typer.Option(
    None, "--config", "-c", help="TOML config; its \\[evaluation] section sets folds etc."
)
ID_COLUMN = typer.Option(
    "slide_id", "--id-column", help="Column naming the slide ('path': file paths, matched by stem)."
)
PATIENT_COLUMN = typer.Option(
    "patient_id", "--patient-column", help="Column naming the patient (folds never split one)."
)
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")


def _embed_and_label(graphs, checkpoint, labels, config, id_column, patient_column, device, task):
    from hmgdm_core.config import load_config
    from hmgdm_core.downstream.labels import read_labels
    from hmgdm_core.graph.cache import load_graph_dir
    from hmgdm_core.pretrain import embed_graphs
    from hmgdm_core.train import check_graph_dims, load_checkpoint, resolve_device

    cfg = load_config(config).evaluation
    data = load_graph_dir(graphs)
    model = load_checkpoint(checkpoint).model
    check_graph_dims(model, data, str(graphs))
    names, emb, _ = embed_graphs(model, data, device=resolve_device(device))
    lab = read_labels(
        labels,
        names,
        n_folds=cfg.folds,
        task=task,
        id_column=id_column,
        patient_column=patient_column,
    )
    row = {name: i for i, name in enumerate(names)}
    x = emb.numpy()[[row[s] for s in lab.table["slide_id"]]]
    return cfg, lab, x


def _run(fn) -> None:
    from hmgdm_core.exceptions import HmgdmError
    from hmgdm_core.log import console

    try:
        fn()
    except HmgdmError as err:
        console.print(f"[red]error[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


@evaluate.command("classify")
def classify(
    graphs: Path = GRAPHS,
    checkpoint: Path = CHECKPOINT,
    labels: Path = LABELS,
    out: Path = OUT,
    config: Path | None = CONFIG,
    id_column: str = ID_COLUMN,
    patient_column: str = PATIENT_COLUMN,
    device: str = DEVICE,
) -> None:
    """Linear probe (logistic regression) on frozen slide embeddings: accuracy, macro-F1,
    balanced accuracy and macro AUC per fold, and a confusion matrix."""

    def go() -> None:
        from hmgdm_core.downstream.classify import ProbeCV
        from hmgdm_core.log import console

        cfg, lab, x = _embed_and_label(
            graphs, checkpoint, labels, config, id_column, patient_column, device, "classification"
        )
        probe = ProbeCV(cfg).fit(x, lab.table["label"].to_numpy(), lab.groups)
        files = probe.write(out)
        m = probe.metrics_
        console.print(
            f"{len(x)} slides, {cfg.folds} folds: accuracy {_pm(m['accuracy'])}, "
            f"macro-F1 {_pm(m['macro_f1'])}, balanced acc {_pm(m['balanced_accuracy'])}"
        )
        console.print("wrote " + ", ".join(str(p) for p in files.values()))

    _run(go)


@evaluate.command("survival")
def survival(
    graphs: Path = GRAPHS,
    checkpoint: Path = CHECKPOINT,
    labels: Path = LABELS,
    out: Path = OUT,
    config: Path | None = CONFIG,
    id_column: str = ID_COLUMN,
    patient_column: str = PATIENT_COLUMN,
    device: str = DEVICE,
) -> None:
    """Cox probe (lifelines, PCA-reduced frozen embeddings): C-index per fold and pooled, and a
    Kaplan-Meier plot of low vs high predicted risk with the log-rank p-value."""

    def go() -> None:
        from hmgdm_core.downstream.survival import SurvivalCV
        from hmgdm_core.log import console

        cfg, lab, x = _embed_and_label(
            graphs, checkpoint, labels, config, id_column, patient_column, device, "survival"
        )
        t = lab.table
        cv = SurvivalCV(cfg).fit(x, t["time"].to_numpy(), t["event"].to_numpy(), lab.groups)
        files = cv.write(out)
        console.print(f"{len(x)} slides: C-index {_pm(cv.metrics_['cindex'])}")
        console.print("wrote " + ", ".join(str(p) for p in files.values()))

    _run(go)


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"

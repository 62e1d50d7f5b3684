"""`hmgdm-client evaluate classify|survival`: frozen-encoder probes or fine-tuning (encoder +
attention pooling + head) on a site's own labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # imported lazily at run time: `--help` stays fast
    import numpy as np

    from hmgdm_core.downstream.config import EvalConfig
    from hmgdm_core.downstream.labels import Labels
    from hmgdm_core.train import Checkpoint

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
TRUST_CHECKPOINT = typer.Option(
    False,
    "--trust-checkpoint",
    help="Load a legacy checkpoint with full Python unpickling, which can run code hidden in "
    "the file: only for a file you wrote yourself with an older hmgdm.",
)
METHOD = typer.Option(
    "probe",
    "--method",
    "-m",
    help="probe: linear/Cox probe on frozen embeddings; finetune: encoder + gated attention "
    "pooling + MLP head trained end to end (writes model.pt for `hmgdm-client explain`).",
)
METHODS = ("probe", "finetune")


def _embed_and_label(graphs, ckpt, labels, config, id_column, patient_column, device, task):
    """(eval config, labels, rows, raw): frozen slide embeddings (slides, hidden) for the
    probes, and the raw-descriptor baselines {name: rows}: entity descriptors mean-pooled, and
    mean + std pooled; rows in the labels' order."""
    from hmgdm_core.pretrain import embed_graphs, raw_slide_features
    from hmgdm_core.train import resolve_device

    cfg, lab, data = _load(graphs, ckpt, labels, config, id_column, patient_column, task)
    names, emb, _ = embed_graphs(ckpt.model, data, device=resolve_device(device))
    rows = [{name: i for i, name in enumerate(names)}[s] for s in lab.table["slide_id"]]
    raw = {
        f"raw_descriptors_{pool}": raw_slide_features(data, std=pool == "mean_std")[1].numpy()[rows]
        for pool in ("mean", "mean_std")
    }
    return cfg, lab, emb.numpy()[rows], raw


def _bags_and_label(graphs, ckpt, labels, config, id_column, patient_column, task):
    """(eval config, labels, rows, None): each row the region graphs of one slide."""
    cfg, lab, data = _load(graphs, ckpt, labels, config, id_column, patient_column, task)
    by_slide: dict[str, list] = {}
    for g in data:
        by_slide.setdefault(str(g.slide_id), []).append(g)
    return cfg, lab, [by_slide[s] for s in lab.table["slide_id"]], None


def _load(graphs, ckpt, labels, config, id_column, patient_column, task):
    from hmgdm_core.config import load_config
    from hmgdm_core.downstream.labels import read_labels
    from hmgdm_core.graph.cache import load_graph_dir
    from hmgdm_core.train import check_graph_dims

    cfg = load_config(config).evaluation
    data = load_graph_dir(graphs)
    check_graph_dims(ckpt.model, data, str(graphs))
    lab = read_labels(
        labels,
        sorted({str(g.slide_id) for g in data}),
        n_folds=cfg.folds,
        task=task,
        id_column=id_column,
        patient_column=patient_column,
    )
    return cfg, lab, data


def _inputs(method, *args):
    if method not in METHODS:
        from hmgdm_core.exceptions import ConfigError

        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not '{method}'")
    if method == "probe":
        return _embed_and_label(*args)
    return _bags_and_label(*args[:-2], args[-1])


def run_reporting_errors(fn) -> None:
    """Run `fn`; a user error becomes one red line and exit code 1."""
    from hmgdm_core.exceptions import HmgdmError
    from hmgdm_core.log import console

    try:
        fn()
    except HmgdmError as err:
        console.print(f"[red]error[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def _evaluation(name: str, task: str):
    """Register `report` as `evaluate NAME`: every evaluation takes the same options and loads
    its inputs the same way; `report(inputs, out)` fits, writes and prints (its docstring is
    the command's help)."""

    def register(report):
        @evaluate.command(name, help=" ".join(report.__doc__.split()))
        def command(
            graphs: Path = GRAPHS,
            checkpoint: Path = CHECKPOINT,
            labels: Path = LABELS,
            out: Path = OUT,
            config: Path | None = CONFIG,
            id_column: str = ID_COLUMN,
            patient_column: str = PATIENT_COLUMN,
            device: str = DEVICE,
            method: str = METHOD,
            trust_checkpoint: bool = TRUST_CHECKPOINT,
        ) -> None:
            def go() -> None:
                from hmgdm_core.train import load_checkpoint

                ckpt = load_checkpoint(checkpoint, trust=trust_checkpoint)
                cfg, lab, x, raw = _inputs(
                    method, graphs, ckpt, labels, config, id_column, patient_column, device, task
                )  # fmt: skip
                report(Inputs(method, ckpt, cfg, lab, x, raw), out)

            run_reporting_errors(go)

        return report

    return register


@dataclass(frozen=True)
class Inputs:
    """What an evaluation reads: the method, the checkpoint, [evaluation], the labels, rows (an
    embedding or a slide's graphs each, in the labels' order) and raw-descriptor baselines."""

    method: str
    ckpt: Checkpoint
    cfg: EvalConfig
    lab: Labels
    x: np.ndarray | list
    raw: dict[str, np.ndarray] | None


@_evaluation("classify", "classification")
def classify(inputs: Inputs, out: Path) -> None:
    """Linear probe (logistic regression) on frozen slide embeddings, or fine-tuning: accuracy,
    macro-F1, balanced accuracy and macro AUC per fold, out-of-fold predictions per slide, a
    confusion matrix and ROC curves."""
    from hmgdm_core.downstream.classify import ProbeCV, label_efficiency, write_label_efficiency
    from hmgdm_core.downstream.finetune_cv import FinetuneCV
    from hmgdm_core.log import console

    i = inputs
    y = i.lab.table["label"].to_numpy()
    probe = ProbeCV(i.cfg) if i.method == "probe" else FinetuneCV(i.ckpt.model, i.ckpt.cfg, i.cfg)
    probe.fit(i.x, y, i.lab.groups)
    for name, rows in (i.raw or {}).items():  # better than its own inputs? same probe, folds
        probe.add_baseline(name, rows)
    files = probe.write(out, i.lab.table["slide_id"])
    if i.method == "probe" and i.cfg.label_shares:  # does pretraining save labels?
        curve = label_efficiency({"encoder": i.x, **(i.raw or {})}, y, i.lab.groups, i.cfg)
        files |= write_label_efficiency(out, curve)
        shares = "/".join(f"{100 * s:g}" for s in i.cfg.label_shares)
        for name, rows in curve.groupby("features", sort=False):
            accs = "/".join(f"{a:.3f}" for a in rows["accuracy_mean"])
            console.print(f"label efficiency, {name}: accuracy {accs} at {shares}% of patients")
    m = probe.metrics_
    console.print(
        f"{len(i.x)} slides, {i.cfg.folds} folds x {probe.config.repeats} assignments: "
        f"accuracy {_pm(m['accuracy'])}, "
        f"macro-F1 {_pm(m['macro_f1'])}, balanced acc {_pm(m['balanced_accuracy'])}"
    )
    for name, base in probe.baselines_.items():
        pooling = name.removeprefix("raw_descriptors_").replace("_", "+")
        console.print(
            f"raw entity descriptors ({pooling}-pooled), same probe and folds: "
            f"accuracy {_pm(base['accuracy'])}"
        )
    console.print("wrote " + ", ".join(str(p) for p in files.values()))


@_evaluation("survival", "survival")
def survival(inputs: Inputs, out: Path) -> None:
    """Cox probe (lifelines, PCA-reduced frozen embeddings) or deep Cox head fine-tuned on the
    encoder: C-index per fold and pooled, and a Kaplan-Meier plot of low vs high predicted risk
    with the log-rank p-value."""
    from hmgdm_core.downstream.finetune_cv import DeepCoxCV
    from hmgdm_core.downstream.survival import SurvivalCV
    from hmgdm_core.log import console

    i, t = inputs, inputs.lab.table
    cv = SurvivalCV(i.cfg) if i.method == "probe" else DeepCoxCV(i.ckpt.model, i.ckpt.cfg, i.cfg)
    cv.fit(i.x, t["time"].to_numpy(), t["event"].to_numpy(), i.lab.groups)
    files = cv.write(out, t["slide_id"])
    m = cv.metrics_
    console.print(
        f"{len(i.x)} slides: C-index {_pm(m['cindex'])} (pooled pairs {m['cindex_pooled']:.3f}), "
        f"log-rank p {cv.km_.p_value_:.3g}"
    )
    console.print("wrote " + ", ".join(str(p) for p in files.values()))


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"

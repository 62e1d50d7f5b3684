"""`hmgdm-client pretrain` and `hmgdm-client embed`: local self-supervised training and export."""

from __future__ import annotations

from pathlib import Path

import typer

from client.commands_eval import TRUST_CHECKPOINT


def _fail(err: Exception) -> typer.Exit:
    from hmgdm_core.log import console

    console.print(f"[red]error[/red] {err}", soft_wrap=True, markup=True, highlight=False)
    return typer.Exit(2)


def pretrain(
    graphs: Path = typer.Option(..., "--graphs", "-g", help="Graph cache from build-graphs."),
    out: Path = typer.Option(..., "--out", "-o", help="Run dir: last.pt, metrics.csv, loss.png."),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        dir_okay=False,
        help="TOML config: model, diffusion and train sections.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Stage-2 epochs (overrides)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN_DIR/last.pt exactly."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="Optional classification labels CSV: a linear probe on the encoder is logged "
        "(probe_acc) against its random-weight twin. Used only for monitoring, never trained on.",
    ),
    id_column: str = typer.Option("slide_id", "--id-column", help="Slide column of --labels."),
    patient_column: str = typer.Option(
        "patient_id", "--patient-column", help="Patient column of --labels (grouped folds)."
    ),
    probe_every: int = typer.Option(1, "--probe-every", min=1, help="Epochs between probes."),
) -> None:
    """Pretrain H-MGDM on this site's graphs: stage-1 autoencoder, then masked graph diffusion."""
    from hmgdm_core.config import load_config
    from hmgdm_core.exceptions import HmgdmError
    from hmgdm_core.graph.cache import load_graph_dir
    from hmgdm_core.log import console
    from hmgdm_core.pretrain import CHECKPOINT_NAME
    from hmgdm_core.pretrain import pretrain as run
    from hmgdm_core.train import resolve_device

    try:
        cfg = load_config(config, {"train.epochs": epochs} if epochs else None)
        dev = resolve_device(device)
        data = load_graph_dir(graphs)
        console.print(f"{len(data)} region graphs from {graphs}; training on {dev}", soft_wrap=True)
        monitor = None
        if labels is not None:
            from hmgdm_core.downstream.labels import read_labels
            from hmgdm_core.pretrain import probe_monitor

            lab = read_labels(
                labels, sorted({str(g.slide_id) for g in data}), n_folds=cfg.evaluation.folds,
                task="classification", id_column=id_column, patient_column=patient_column,
            )  # fmt: skip
            monitor = probe_monitor(data, lab, cfg.evaluation, device=dev)
        run(
            data, cfg, out, device=dev, resume=resume, progress=progress, source=str(graphs),
            monitor=monitor, probe_every=probe_every,
        )  # fmt: skip
    except HmgdmError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun with --resume to continue")
        raise typer.Exit(130) from None
    console.print(f"checkpoint: {out / CHECKPOINT_NAME}; metrics: {out / 'metrics.csv'}")
    _print_diagnostics(out / "metrics.csv", console)


def _print_diagnostics(metrics_csv: Path, console) -> None:
    """The run's last held-out diagnostic, with what it means (the full series is in the CSV)."""
    import pandas as pd

    rows = pd.read_csv(metrics_csv)
    probes = rows.dropna(subset=["probe_acc"])
    if not probes.empty:
        console.print(
            f"probe accuracy {probes['probe_acc'].iloc[-1]:.3f} (random-weight twin "
            f"{probes['probe_random_twin'].iloc[-1]:.3f})"
        )
    shares = rows["context_share"].dropna()
    if shares.empty:
        return
    console.print(
        f"held-out context share {shares.iloc[-1]:.3f}: the share of the masked entities' "
        "variance that the encoder's view of the rest of the graph explains (near 0: the "
        "diffusion decoder does not use the encoder)",
        soft_wrap=True,
    )


def embed(
    graphs: Path = typer.Option(..., "--graphs", "-g", help="Graph cache from build-graphs."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A pretrain checkpoint (last.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV: one row per slide id."),
    nodes: Path | None = typer.Option(
        None, "--nodes", help="Also save node embeddings per region graph to this .pt file."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    trust_checkpoint: bool = TRUST_CHECKPOINT,
) -> None:
    """Write slide embeddings (mean of the slide's region-graph embeddings) for every slide."""
    import pandas as pd

    from hmgdm_core.atomic import save_torch, write_csv
    from hmgdm_core.data import validate_graphs
    from hmgdm_core.exceptions import HmgdmError
    from hmgdm_core.graph.cache import load_graph_dir
    from hmgdm_core.log import console
    from hmgdm_core.pretrain import embed_graphs
    from hmgdm_core.train import check_graph_dims, load_checkpoint, resolve_device

    try:
        data = load_graph_dir(graphs)
        validate_graphs(data, str(graphs))
        model = load_checkpoint(checkpoint, trust=trust_checkpoint).model
        check_graph_dims(model, data, str(graphs))
        names, slide_emb, node_emb = embed_graphs(model, data, device=resolve_device(device))
    except HmgdmError as err:
        raise _fail(err) from None
    table = pd.DataFrame(slide_emb.numpy(), columns=[f"e{i}" for i in range(slide_emb.shape[1])])
    table.insert(0, "slide_id", names)
    write_csv(out, table)
    if nodes is not None:
        save_torch(
            [
                {"slide_id": str(g.slide_id), "tile_index": int(g.tile_index), "emb": e}
                for g, e in zip(data, node_emb, strict=True)
            ],
            nodes,
        )
    console.print(f"{len(names)} slide embeddings -> {out}")

"""Local pretraining run: stage 1 then stage 2 epochs, a checkpoint + metrics every epoch,
exact resume; and slide embeddings from a trained checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch_geometric.data import Batch, Data

from hmgdm_core.atomic import save_figure, write_csv
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments, validate_graphs
from hmgdm_core.exceptions import CheckpointError
from hmgdm_core.model.hmgdm import HMGDM, Stage
from hmgdm_core.tracking import add_scalars, summary_writer
from hmgdm_core.train import (
    build_model,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    train_steps,
)

CHECKPOINT_NAME = "last.pt"
METRIC_COLUMNS = (
    "epoch",
    "stage",
    "step",
    "loss",
    "node_recon",
    "node_kl",
    "edge_recon",
    "edge_kl",
    "node_mse",
    "edge_mse",
    "lr",
    "graphs_per_s",
)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """RUN_DIR/metrics.csv (one row per epoch) and RUN_DIR/loss.png, both written atomically."""
    write_csv(
        run_dir / "metrics.csv", pd.DataFrame(rows).reindex(columns=METRIC_COLUMNS), private=False
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in ("autoencoder", "diffusion"):
        pts = [(r["epoch"], r["loss"]) for r in rows if r["stage"] == stage]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=stage)
    ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax.legend()
    save_figure(run_dir / "loss.png", fig, dpi=100, private=False)
    plt.close(fig)


def _stage_of(epoch: int, cfg: HmgdmConfig) -> Stage:
    return "autoencoder" if epoch < cfg.train.autoencoder_epochs else "diffusion"


def pretrain(
    graphs: Sequence[Data],
    cfg: HmgdmConfig,
    run_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = False,
    source: str = "graphs",
) -> HMGDM:
    """Train both stages on `graphs`, checkpointing to RUN_DIR/last.pt after every epoch."""
    validate_graphs(graphs, source)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME
    tc = cfg.train
    steps_per_epoch = max(1, math.ceil(len(graphs) / tc.batch_size))
    generator = torch.Generator().manual_seed(tc.seed)
    if resume:
        ckpt = load_checkpoint(ckpt_path, cfg=cfg)
        model, start, rows = ckpt.model, ckpt.epoch + 1, ckpt.extra.get("metrics", [])
        if graph_dims(graphs) != model.dims:
            raise CheckpointError(f"{ckpt_path}: graphs in {source} have different feature sizes")
        torch.set_rng_state(ckpt.rng["torch"])
        generator.set_state(ckpt.rng["generator"])
    else:
        if ckpt_path.exists():
            raise CheckpointError(f"{ckpt_path} exists; pass --resume or choose another --out")
        torch.manual_seed(tc.seed)
        model = build_model(cfg, graph_dims(graphs))
        model.stats.set(stats_from_moments(feature_moments(graphs)))
        start, rows, ckpt = 0, [], None
    run_dir.mkdir(parents=True, exist_ok=True)
    total = tc.autoencoder_epochs + tc.epochs
    optimizer = scheduler = None
    writer = summary_writer(run_dir)
    for epoch in range(start, total):
        stage = _stage_of(epoch, cfg)
        if optimizer is None or (epoch > 0 and _stage_of(epoch - 1, cfg) != stage):
            stage_epochs = tc.autoencoder_epochs if stage == "autoencoder" else tc.epochs
            optimizer = make_optimizer(model.to(device), tc, stage)
            scheduler = make_scheduler(optimizer, tc, stage_epochs * steps_per_epoch)
            if ckpt is not None and epoch == start and _stage_of(ckpt.epoch, cfg) == stage:
                optimizer.load_state_dict(ckpt.optimizer)
                scheduler.load_state_dict(ckpt.scheduler)
        out = train_steps(
            model,
            optimizer,
            graphs,
            tc,
            stage=stage,
            steps=steps_per_epoch,
            device=device,
            generator=generator,
            progress=progress,
            scheduler=scheduler,
        )
        rows.append(
            {
                **out,
                "epoch": epoch,
                "stage": stage,
                "step": (len(rows) + 1) * steps_per_epoch,
                "graphs_per_s": out["num_graphs"] / max(out["seconds"], 1e-9),
            }
        )
        save_checkpoint(
            ckpt_path,
            model=model,
            cfg=cfg,
            epoch=epoch,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=generator,
            extra={"metrics": rows},
        )
        write_metrics(run_dir, rows)
        add_scalars(writer, {f"{stage}/{k}": v for k, v in rows[-1].items() if k != "epoch"}, epoch)
    writer.close()
    return model.cpu()


@torch.no_grad()
def embed_graphs(
    model: HMGDM, graphs: Sequence[Data], *, device: torch.device, batch_size: int = 16
) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
    """Slide ids (sorted), slide embeddings (slides, hidden) = mean of region embeddings, and
    node embeddings per region graph (in input order)."""
    model.to(device).eval()
    graph_embs, node_embs = [], []
    for i in range(0, len(graphs), batch_size):
        batch = Batch.from_data_list(list(graphs[i : i + batch_size])).to(device)
        nodes, pooled = model.encode(batch)
        graph_embs.append(pooled.cpu())
        node_embs.extend(nodes.cpu().split(batch.ptr.diff().tolist()))
    per_graph = torch.cat(graph_embs)  # (graphs, hidden)
    slide_ids = [str(g.slide_id) for g in graphs]
    names = sorted(set(slide_ids))
    position = {name: i for i, name in enumerate(names)}
    index = torch.tensor([position[s] for s in slide_ids])
    sums = torch.zeros(len(names), per_graph.shape[1]).index_add_(0, index, per_graph)
    counts = torch.bincount(index, minlength=len(names)).clamp(min=1)
    return names, sums / counts[:, None], node_embs

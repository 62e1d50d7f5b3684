"""Local pretraining run: stage 1 then stage 2 epochs, a checkpoint + metrics every epoch,
exact resume; and slide embeddings from a trained checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch_geometric.data import Batch, Data

from hmgdm_core.atomic import save_figure, write_csv
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.data import (
    feature_moments,
    graph_dims,
    holdout_split,
    stats_from_moments,
    validate_graphs,
)
from hmgdm_core.exceptions import CheckpointError
from hmgdm_core.model.hmgdm import HMGDM, Stage
from hmgdm_core.tracking import add_scalars, summary_writer
from hmgdm_core.train import (
    build_model,
    eval_loss,
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
    "eval_loss",
    "eval_node_mse",
    "context_share",
    "probe_acc",
    "probe_random_twin",
    "lr",
    "graphs_per_s",
)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """RUN_DIR/metrics.csv (one row per epoch) and RUN_DIR/loss.png, both written atomically:
    training and held-out loss per stage, and the stage-2 context share on held-out graphs."""
    write_csv(
        run_dir / "metrics.csv", pd.DataFrame(rows).reindex(columns=METRIC_COLUMNS), private=False
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = [(r["epoch"], r["probe_acc"]) for r in rows if "probe_acc" in r]
    fig, axes = plt.subplots(1, 3 if probed else 2, figsize=(15 if probed else 10, 3.5))
    ax, share_ax = axes[:2]
    for stage, colour in (("autoencoder", "C0"), ("diffusion", "C1")):
        for key, style, what in (("loss", "-o", "train"), ("eval_loss", "--s", "held-out")):
            pts = [(r["epoch"], r[key]) for r in rows if r["stage"] == stage and key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=colour, label=f"{stage} {what}")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax.legend(fontsize="small")
    pts = [(r["epoch"], r["context_share"]) for r in rows if "context_share" in r]
    if pts:
        share_ax.plot(*zip(*pts, strict=True), "-o", color="C1")
    share_ax.axhline(0.0, color="grey", lw=0.8)
    share_ax.set(
        xlabel="epoch",
        ylabel="context share (held-out)",
        title="masked-target variance the encoder's context explains",
    )
    share_ax.title.set_fontsize("small")
    if probed:
        probe_ax = axes[2]
        probe_ax.plot(*zip(*probed, strict=True), "-o", color="C2", label="this encoder")
        probe_ax.axhline(
            rows[-1]["probe_random_twin"], color="grey", ls="--", label="random-weight twin"
        )
        probe_ax.set(xlabel="epoch", ylabel="probe accuracy (grouped CV)")
        probe_ax.legend(fontsize="small")
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
    monitor: Callable[[HMGDM], float] | None = None,
    probe_every: int = 1,
) -> HMGDM:
    """Train both stages on `graphs`, checkpointing to RUN_DIR/last.pt after every epoch.

    `train.eval_fraction` of the slides is held out: after every epoch the stage's loss on
    them (and, in stage 2, the context share) goes into the metrics. `monitor` (a probe on the
    site's labels, `probe_monitor`) scores the encoder every `probe_every` epochs and the last,
    next to its value at random init (the random-weight twin).
    """
    validate_graphs(graphs, source)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME
    tc = cfg.train
    graphs, held_out = holdout_split(graphs, tc.eval_fraction, tc.seed)
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
    reference = None
    if monitor is not None:
        # Resumed runs keep the reference measured at the start of the run.
        done = [r["probe_random_twin"] for r in rows if "probe_random_twin" in r]
        reference = done[0] if done else monitor(model)
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
        row = {
            **out,
            "epoch": epoch,
            "stage": stage,
            "step": (len(rows) + 1) * steps_per_epoch,
            "graphs_per_s": out["num_graphs"] / max(out["seconds"], 1e-9),
        }
        if held_out:
            # A fixed generator: every epoch is scored on the same masks, noise and timesteps.
            ev = eval_loss(
                model, held_out, tc, stage=stage, device=device,
                generator=torch.Generator().manual_seed(tc.seed + 1),
            )  # fmt: skip
            row |= {f"eval_{k}": v for k, v in ev.items() if k in ("loss", "node_mse")}
            if "context_share" in ev:
                row["context_share"] = ev["context_share"]
        if monitor is not None and ((epoch + 1) % probe_every == 0 or epoch == total - 1):
            row |= {"probe_acc": monitor(model), "probe_random_twin": reference}
        rows.append(row)
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


def raw_slide_features(graphs: Sequence[Data], *, std: bool) -> tuple[list[str], torch.Tensor]:
    """Slide ids (sorted, as `embed_graphs`) and the no-learning baseline: the mean (and, with
    `std`, the standard deviation) of the entity descriptors over each slide's entities."""
    names = sorted({str(g.slide_id) for g in graphs})
    position = {name: i for i, name in enumerate(names)}
    x = torch.cat([g.x.double() for g in graphs])
    index = torch.cat(
        [torch.full((g.num_nodes,), position[str(g.slide_id)]) for g in graphs]
    )  # (entities,)
    count = torch.bincount(index, minlength=len(names)).clamp(min=1)[:, None]
    mean = torch.zeros(len(names), x.shape[1], dtype=x.dtype).index_add_(0, index, x) / count
    if not std:
        return names, mean.float()
    sq = torch.zeros_like(mean).index_add_(0, index, x.pow(2)) / count
    return names, torch.cat([mean, (sq - mean.pow(2)).clamp(min=0).sqrt()], dim=1).float()


def probe_monitor(
    graphs: Sequence[Data], labels, config, *, device: torch.device
) -> Callable[[HMGDM], float]:
    """A DINO-style monitor: mean accuracy of the linear probe (`ProbeCV`, patient-grouped
    folds of `config`) on the frozen slide embeddings of `graphs` with `labels` (a `Labels`)."""
    from hmgdm_core.downstream.classify import ProbeCV

    def score(model: HMGDM) -> float:
        names, emb, _ = embed_graphs(model, graphs, device=device)
        row = {name: i for i, name in enumerate(names)}
        x = emb.numpy()[[row[s] for s in labels.table["slide_id"]]]
        probe = ProbeCV(config).fit(x, labels.table["label"].to_numpy(), labels.groups)
        return probe.metrics_["accuracy"]["mean"]

    return score

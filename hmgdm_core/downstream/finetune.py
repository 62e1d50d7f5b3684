"""Fine-tuning the pretrained encoder end to end: entity embeddings -> gated attention pooling
over every entity of a slide -> MLP head, trained with class-weighted cross-entropy or the
deep Cox loss, with early stopping on a patient-grouped validation split.

A slide is a bag of region graphs; one softmax over all of its entities pools it, so the
attention weights say which entities drove the slide's output (what `explain` paints).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from hmgdm_core.atomic import save_torch
from hmgdm_core.config import HmgdmConfig, stored_config
from hmgdm_core.data import GraphDims, sample_region
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.downstream.deepcox import cox_partial_nll
from hmgdm_core.downstream.mil import GatedAttentionPool
from hmgdm_core.downstream.splits import patient_folds
from hmgdm_core.exceptions import LabelError
from hmgdm_core.model.hmgdm import HMGDM

Bag = Sequence[Data]  # the region graphs of one slide (one graph for a region dataset)
Kind = Literal["classification", "survival"]
FORMAT = "hmgdm-finetune/1"
log = logging.getLogger(__name__)
TRAINED_PREFIX = "encoder."  # backbone parameters fine-tuning may train (stage-1 stays frozen)


class SlideNet(nn.Module):
    """Pretrained backbone + gated-attention pooling over a slide's entities + MLP head.

    `forward(batch, slide_of_graph)` returns (outputs (slides, out), attention (entities,),
    entity embeddings (entities, hidden)); outputs are class logits or one Cox log-risk.
    """

    def __init__(
        self,
        backbone: HMGDM,
        embed_dim: int,
        out_channels: int,
        *,
        hidden: int = 64,
        dropout: float = 0.1,
        train_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GatedAttentionPool(embed_dim, hidden, dropout=dropout)
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_channels),
        )
        # Entity embeddings enter the head standardised per dimension (set from training
        # entities by `set_input_stats`; identity until then): unscaled, their slide-level
        # differences are small next to their offsets and the head learns slowly.
        self.register_buffer("input_mean", torch.zeros(embed_dim))
        self.register_buffer("input_std", torch.ones(embed_dim))
        self.train_encoder = train_encoder
        self.freeze_encoder(not train_encoder)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Train the head only (frozen) or the encoder too; stage-1 weights always stay fixed."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not frozen and name.startswith(TRAINED_PREFIX))

    @torch.no_grad()
    def entity_moments(
        self, bags: Sequence[Bag], batch_slides: int = 32
    ) -> tuple[int, Tensor, Tensor]:
        """Count, sum and sum of squares per dimension of the entity embeddings of `bags`:
        what a site sends so that every site standardises with the pooled statistics."""
        self.eval()
        total = torch.zeros(self.input_mean.numel(), dtype=torch.float64)
        total_sq, n = total.clone(), 0
        for start in range(0, len(bags), batch_slides):
            batch, _ = collate(bags[start : start + batch_slides])
            e = self.backbone.node_embeddings(batch).double()
            total, total_sq, n = total + e.sum(0), total_sq + (e**2).sum(0), n + len(e)
        return n, total, total_sq

    @torch.no_grad()
    def set_input_stats(self, n: int, total: Tensor, total_sq: Tensor) -> None:
        """Standardise the head's input with the mean and std (ddof 1) of these moments."""
        mean = total / n
        std = ((total_sq - n * mean**2) / max(n - 1, 1)).clamp(min=0).sqrt()
        self.input_mean.copy_(mean.float())
        self.input_std.copy_(std.clamp(min=1e-6).float())

    def forward(self, batch: Batch, slide_of_graph: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        entities = self.backbone.node_embeddings(batch)  # (N, embed_dim)
        outputs, attention = self.pool_and_head(entities, slide_of_graph[batch.batch])
        return outputs, attention, entities

    def pool_and_head(self, entities: Tensor, slide: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (slides, out) and attention (N,) from entity embeddings and their slide."""
        pooled, attention = self.pool((entities - self.input_mean) / self.input_std, batch=slide)
        return self.head(pooled), attention


@dataclass(frozen=True)
class Task:
    """What the head predicts: `classes` (classification) or a Cox risk (survival)."""

    kind: Kind
    classes: tuple[str, ...] = ()

    @property
    def out_channels(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1


def collate(
    bags: Sequence[Bag],
    *,
    max_tiles: int | None = None,
    max_nodes: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Batch, Tensor]:
    """One PyG batch of the bags' graphs and the slide index of each graph.

    Training samples up to `max_tiles` graphs per bag and a compact patch of `max_nodes`
    entities per graph (both drawn with `generator`); prediction passes None and sees all.
    """
    graphs, owner = [], []
    for i, bag in enumerate(bags):
        chosen = list(bag)
        if max_tiles is not None and len(chosen) > max_tiles:
            pick = torch.randperm(len(chosen), generator=generator)[:max_tiles].sort().values
            chosen = [chosen[j] for j in pick.tolist()]
        if max_nodes is not None:
            chosen = [sample_region(g, max_nodes, generator) for g in chosen]
        graphs += chosen
        owner += [i] * len(chosen)
    return Batch.from_data_list(graphs), torch.tensor(owner, dtype=torch.long)


def class_weights(y: np.ndarray, n_classes: int) -> Tensor:
    """n / (classes * count) per class ("balanced"); a class absent from `y` gets weight 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def task_loss(outputs: Tensor, target: Tensor, task: Task, weight: Tensor | None = None) -> Tensor:
    """Class-weighted cross-entropy, or the Cox partial NLL (Breslow) of target (time, event)."""
    if task.kind == "classification":
        return F.cross_entropy(outputs, target, weight=weight)
    return cox_partial_nll(outputs[:, 0], target[:, 0], target[:, 1])


def targets_tensor(task: Task, y: np.ndarray) -> Tensor:
    """Class indices (n,) for classification, (n, 2) float (time, event) for survival."""
    if task.kind == "classification":
        return torch.as_tensor(np.asarray(y), dtype=torch.long)
    return torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=torch.float32)


def train_epochs(
    net: SlideNet,
    optimizer: torch.optim.Optimizer,
    bags: Sequence[Bag],
    target: Tensor,
    task: Task,
    cfg: EvalConfig,
    *,
    epochs: int,
    generator: torch.Generator,
    weight: Tensor | None = None,
) -> float:
    """`epochs` passes over the bags in shuffled slide batches; mean training loss of the last.

    The Cox loss compares each event with the risk set inside its batch only, so survival
    wants `finetune.batch_slides` as large as memory allows.
    """
    total = 0.0
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(bags), generator=generator).tolist()
        total, seen = 0.0, 0
        for start in range(0, len(order), cfg.finetune.batch_slides):
            rows = order[start : start + cfg.finetune.batch_slides]
            batch, owner = collate(
                [bags[i] for i in rows],
                max_tiles=cfg.finetune.max_tiles,
                max_nodes=cfg.finetune.max_nodes,
                generator=generator,
            )
            outputs, _, _ = net(batch, owner)
            loss = task_loss(outputs, target[rows], task, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(rows), seen + len(rows)
        total /= max(seen, 1)
    return total


@torch.no_grad()
def predict(net: SlideNet, bags: Sequence[Bag], batch_slides: int = 8) -> Tensor:
    """Outputs (slides, out) of every bag, all tiles and entities, eval mode."""
    net.eval()
    outs = []
    for start in range(0, len(bags), batch_slides):
        batch, owner = collate(bags[start : start + batch_slides])
        outs.append(net(batch, owner)[0])
    return torch.cat(outs) if outs else torch.zeros(0, 1)


def make_net(backbone: HMGDM, task: Task, cfg: EvalConfig, seed: int) -> SlideNet:
    """A fresh head on a private copy of the backbone, seeded."""
    torch.manual_seed(seed)
    return SlideNet(
        copy.deepcopy(backbone),
        backbone.encoder.hidden,
        task.out_channels,
        hidden=cfg.finetune.hidden,
        dropout=cfg.finetune.dropout,
        train_encoder=cfg.finetune.train_encoder,
    )


def slide_net_for(cfg: HmgdmConfig, dims: GraphDims, task: Task) -> SlideNet:
    """The SlideNet every federation party builds identically from the run's config."""
    from hmgdm_core.train import build_model

    return make_net(build_model(cfg, dims), task, cfg.evaluation, cfg.evaluation.seed)


def make_optimizer(net: SlideNet, cfg: EvalConfig) -> torch.optim.Optimizer:
    """AdamW over the head (`finetune.lr`) and, when it trains, the encoder at its own lower
    `finetune.encoder_lr`; a frozen encoder has no gradients and is left untouched."""
    encoder = [p for n, p in net.backbone.named_parameters() if n.startswith(TRAINED_PREFIX)]
    head = [p for n, p in net.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": head, "lr": cfg.finetune.lr}]
    if net.train_encoder:
        groups.append({"params": encoder, "lr": cfg.finetune.encoder_lr})
    return torch.optim.AdamW(groups)


def inner_split(
    strata: np.ndarray, groups: np.ndarray, cfg: EvalConfig, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, validation) rows by patient, stratified; None when too few patients to hold out."""
    n_splits = max(2, round(1 / cfg.val_fraction))
    try:
        return patient_folds(strata, groups, n_splits, seed)[0]
    except (LabelError, ValueError) as err:  # ValueError: every class smaller than n_splits
        log.warning(
            "no early-stopping split (%s): training all %d epochs", err, cfg.finetune.epochs
        )
        return None


def fit_early_stopping(
    backbone: HMGDM,
    bags: Sequence[Bag],
    y: np.ndarray,
    groups: np.ndarray,
    task: Task,
    cfg: EvalConfig,
    seed: int = 0,
) -> tuple[SlideNet, dict]:
    """Train a SlideNet on `bags`, keeping the epoch with the lowest validation loss.

    Entity embeddings are standardised with the training rows' statistics; with
    `finetune.train_encoder`, the first `finetune.head_epochs` epochs train the head only (LP-FT).

    The validation patients come out of `bags` (grouped by `groups`, stratified on the class or
    event); training stops after `finetune.patience` epochs without improvement. With too few
    patients for a validation split, it trains `finetune.epochs` epochs and says so in the log.
    """
    generator = torch.Generator().manual_seed(seed)
    strata = y if task.kind == "classification" else np.asarray(y)[:, 1]
    split = inner_split(strata, groups, cfg, seed)
    train, val = split if split is not None else (np.arange(len(bags)), np.array([], int))
    net = make_net(backbone, task, cfg, seed)
    target = targets_tensor(task, y)
    weight = None
    if task.kind == "classification":
        weight = class_weights(np.asarray(y)[train], task.out_channels)
    train_bags, val_bags = [bags[i] for i in train], [bags[i] for i in val]
    net.set_input_stats(*net.entity_moments(train_bags))
    optimizer = make_optimizer(net, cfg)
    best, best_loss, best_epoch, history = None, float("inf"), 0, []
    for epoch in range(cfg.finetune.epochs):
        # LP-FT: the head first learns on the frozen encoder, so the encoder's first gradients
        # come from a useful head rather than a random one (which can collapse it).
        net.freeze_encoder(not net.train_encoder or epoch < cfg.finetune.head_epochs)
        loss = train_epochs(
            net, optimizer, train_bags, target[train], task, cfg,
            epochs=1, generator=generator, weight=weight,
        )  # fmt: skip
        val_loss = float("nan")
        if len(val):
            val_loss = float(task_loss(predict(net, val_bags), target[val], task, weight))
        history.append({"epoch": epoch, "train_loss": loss, "val_loss": val_loss})
        if not len(val) or val_loss < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(net.state_dict()), val_loss, epoch
        elif epoch - best_epoch >= cfg.finetune.patience:
            break
    net.load_state_dict(best)
    return net, {"best_epoch": best_epoch, "epochs_run": len(history), "history": history}


def save_slide_net(
    path: Path | str, net: SlideNet, backbone_cfg: HmgdmConfig, task: Task, cfg: EvalConfig
) -> Path:
    """A self-describing fine-tuned model: configs, graph dims, task and all weights."""
    return save_torch(
        {
            "format": FORMAT,
            "config": backbone_cfg.model_dump(mode="json"),
            "evaluation": cfg.model_dump(mode="json"),
            "dims": dataclasses.asdict(net.backbone.dims),
            "task": {"kind": task.kind, "classes": list(task.classes)},
            "model": net.state_dict(),
        },
        Path(path),
    )


def load_slide_net(path: Path | str, *, trust: bool = False) -> tuple[SlideNet, Task, HmgdmConfig]:
    """Rebuild a model written by `save_slide_net`; a clear error for any other file."""
    from hmgdm_core.train import build_model, read_checkpoint

    path = Path(path)
    blob = read_checkpoint(
        path, FORMAT, f"not a fine-tuned model ({FORMAT}); write one with "
        "`hmgdm-client evaluate classify|survival --method finetune`", trust=trust,
    )  # fmt: skip
    backbone_cfg = HmgdmConfig.model_validate(stored_config(blob["config"]))
    cfg = EvalConfig.model_validate(stored_config(blob["evaluation"], "evaluation"))
    task = Task(blob["task"]["kind"], tuple(blob["task"]["classes"]))
    net = make_net(build_model(backbone_cfg, GraphDims(**blob["dims"])), task, cfg, 0)
    net.load_state_dict(blob["model"])
    return net.eval(), task, backbone_cfg

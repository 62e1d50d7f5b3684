"""The encoders a study compares, trained in-process on a list of graphs, and their features:
H-MGDM (stage 1 then 2), random-init encoder (stage 1 only), GraphMAE-style (same encoder, masked
latent reconstruction), raw node descriptors mean-pooled. Shared by studies and benchmarks/probe.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from hmgdm_core.config import HmgdmConfig
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments
from hmgdm_core.model.graphmae import GraphMAE
from hmgdm_core.model.hmgdm import HMGDM, Stage
from hmgdm_core.train import build_model, make_optimizer, make_scheduler, train_steps

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def fit_stage(
    model: torch.nn.Module,
    graphs: Sequence[Data],
    cfg: HmgdmConfig,
    stage: Stage,
    steps: int,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """`steps` optimiser steps of `stage` with a warm-up/cosine schedule; the loss terms."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = optimizer or make_optimizer(model, cfg.train, stage)
    out = train_steps(
        model, optimizer, graphs, cfg.train, stage=stage, steps=steps, device=CPU,
        generator=gen, scheduler=make_scheduler(optimizer, cfg.train, steps),
    )  # fmt: skip
    log.info("%s %s: %d steps, loss %.4f", type(model).__name__, stage, steps, out["loss"])
    return out


def stage1_model(graphs: Sequence[Data], cfg: HmgdmConfig, steps: int, seed: int) -> HMGDM:
    """A seeded model standardised on `graphs` with its entity autoencoder trained: as an
    encoder, the random-init baseline (stage 2 untouched)."""
    torch.manual_seed(seed)
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    fit_stage(model, graphs, cfg, "autoencoder", steps, seed)
    return model


def hmgdm_from(
    base: HMGDM, graphs: Sequence[Data], cfg: HmgdmConfig, steps: int, seed: int
) -> HMGDM:
    """A copy of `base` pretrained by latent graph diffusion (H-MGDM stage 2)."""
    model = copy.deepcopy(base)
    fit_stage(model, graphs, cfg, "diffusion", steps, seed)
    return model


def graphmae_from(
    base: HMGDM, graphs: Sequence[Data], cfg: HmgdmConfig, steps: int, seed: int
) -> GraphMAE:
    """The GraphMAE-style baseline: `base`'s encoder trained by masked latent reconstruction."""
    mae = GraphMAE(backbone=copy.deepcopy(base))
    tc = cfg.train
    opt = torch.optim.AdamW(
        mae.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    fit_stage(mae, graphs, cfg, "diffusion", steps, seed, optimizer=opt)
    return mae


@torch.no_grad()
def embeddings(model: HMGDM | GraphMAE, graphs: Sequence[Data], chunk: int = 64) -> np.ndarray:
    """(graphs, hidden) pooled encoder embeddings."""
    model.eval()
    out = [
        model.encode(Batch.from_data_list(list(graphs[i : i + chunk])))[1]
        for i in range(0, len(graphs), chunk)
    ]
    return torch.cat(out).numpy()


def raw_features(graphs: Sequence[Data]) -> np.ndarray:
    """(graphs, node features) raw node descriptors mean-pooled: the no-learning baseline."""
    return torch.stack([g.x.mean(0) for g in graphs]).numpy()

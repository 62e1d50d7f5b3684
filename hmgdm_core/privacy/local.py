"""Local DP-SGD for H-MGDM graphs: one training round under the site's privacy ledger.

The client calls `private_round` instead of `train_steps` when [privacy] mode is local_dp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from hmgdm_core.data import make_batch
from hmgdm_core.model.config import TrainConfig
from hmgdm_core.privacy.config import PrivacyConfig
from hmgdm_core.privacy.dpsgd import (
    check_model,
    dp_train_steps,
    group_by_patient,
    private_generator,
)
from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.privacy.ledger import PrivacyLedger, spend


def steps_for(
    privacy: PrivacyConfig, num_patients: int, *, steps: int | None, epochs: float | None
) -> int:
    """`steps`, or the steps of `epochs` passes (a pass = 1 / sample_rate steps in expectation)."""
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps= or epochs=")
    if steps is not None:
        return steps
    return max(1, math.ceil(epochs / privacy.rate_for(num_patients)))


def patient_loss(
    model: nn.Module,
    train_cfg: TrainConfig,
    privacy: PrivacyConfig,
    *,
    stage: str,
    device: torch.device,
    generator: torch.Generator,
) -> Callable[[Sequence[Data]], Tensor]:
    """Loss of one patient: up to `graphs_per_patient` of their graphs batched together.

    Which of a sampled patient's graphs are drawn does not affect the guarantee (the patient's
    whole contribution is clipped), so that draw may use the reproducible `generator`.
    """
    k = privacy.graphs_per_patient

    def loss(graphs: Sequence[Data]) -> Tensor:
        if len(graphs) > k:
            graphs = [graphs[i] for i in torch.randperm(len(graphs), generator=generator)[:k]]
        batch = make_batch(graphs, train_cfg.max_nodes, generator).to(device)
        return model.loss(batch, stage=stage, generator=generator)["loss"]

    return loss


def private_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    graphs: Sequence[Data],
    train_cfg: TrainConfig,
    privacy: PrivacyConfig,
    *,
    ledger_path: Path,
    server_round: int,
    stage: str,
    steps: int | None = None,
    epochs: float | None = None,
    device: torch.device,
    generator: torch.Generator,
    patients: Mapping[str, str] | None = None,
) -> tuple[dict[str, float], PrivacyLedger]:
    """Check the budget, train one round with patient-level DP-SGD, record it in the ledger.

    Raises PrivacyBudgetExhausted before touching the model when the round would exceed
    `max_epsilon`. `patients` maps slide_id -> patient_id (unmapped slides are their own patient).
    """
    if privacy.mode != "local_dp":
        raise PrivacyError(f"private_round needs [privacy] mode = 'local_dp', not {privacy.mode!r}")
    groups = group_by_patient(graphs, patients)
    if not groups:
        raise PrivacyError("DP-SGD needs at least one patient at this site; found none")
    n_steps = steps_for(privacy, len(groups), steps=steps, epochs=epochs)
    check_model(model)
    # The round is in the ledger before the first noisy step; refused there if over budget.
    with spend(
        ledger_path, privacy, num_patients=len(groups), server_round=server_round, steps=n_steps
    ) as ledger:
        model.to(device).train()
        metrics = dp_train_steps(
            optimizer,
            groups,
            patient_loss(
                model, train_cfg, privacy, stage=stage, device=device, generator=generator
            ),
            steps=n_steps,
            sample_rate=ledger.sample_rate,
            clip_norm=privacy.clip_norm,
            noise_multiplier=privacy.noise_multiplier,
            # A test seed still differs per round so rounds never repeat their noise.
            generator=private_generator(
                None if privacy.noise_seed is None else privacy.noise_seed + server_round, device
            ),
        )
    return metrics | {"epsilon": ledger.epsilon, "num_patients": float(len(groups))}, ledger

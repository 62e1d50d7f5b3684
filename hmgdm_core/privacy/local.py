"""Local DP-SGD for H-MGDM graphs: one training round under the site's privacy ledger.

`private_round` runs the one training loop (`train.train_steps`) with the patient-level DP-SGD
step, under the site's ledger and its own [local_dp] settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch_geometric.data import Batch, Data

from hmgdm_core.data import make_batch
from hmgdm_core.model.config import TrainConfig
from hmgdm_core.privacy.accountant import Mechanism
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.dpsgd import (
    PatientDPStep,
    check_model,
    group_by_patient,
    private_generator,
)
from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.privacy.ledger import PrivacyLedger, spend
from hmgdm_core.train import Objective, train_steps


def steps_for(mechanism: Mechanism, *, steps: int | None, epochs: float | None) -> int:
    """`steps`, or the steps of `epochs` passes (a pass = 1 / sample_rate steps in expectation)."""
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps= or epochs=")
    return mechanism.steps_for(epochs) if steps is None else steps


def patient_batch(
    train_cfg: TrainConfig,
    privacy: LocalDP,
    *,
    device: torch.device,
    generator: torch.Generator,
) -> Callable[[Sequence[Data]], Batch]:
    """One patient's batch: up to `graphs_per_patient` of their graphs.

    Which of a sampled patient's graphs are drawn does not affect the guarantee (the patient's
    whole contribution is clipped), so that draw may use the reproducible `generator`.
    """
    k = privacy.graphs_per_patient

    def batch(graphs: Sequence[Data]) -> Batch:
        if len(graphs) > k:
            graphs = [graphs[i] for i in torch.randperm(len(graphs), generator=generator)[:k]]
        return make_batch(
            graphs, train_cfg.max_nodes, generator, stain_jitter=train_cfg.stain_jitter
        ).to(device)

    return batch


def private_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    graphs: Sequence[Data],
    train_cfg: TrainConfig,
    privacy: LocalDP,
    *,
    ledger_path: Path,
    server_round: int,
    stage: str,
    steps: int | None = None,
    epochs: float | None = None,
    device: torch.device,
    generator: torch.Generator,
    patients: Mapping[str, str] | None = None,
    objective: Objective | None = None,
) -> tuple[dict[str, float], PrivacyLedger]:
    """Record one round in the site's ledger (locked), train it with patient-level DP-SGD.

    Raises PrivacyBudgetExhausted before touching the model when the round would exceed
    `max_epsilon`. `patients` maps slide_id -> patient_id (unmapped slides are their own patient).
    The noise, clipping and sampling rate are the ledger's mechanism, nothing else.
    """
    groups = group_by_patient(graphs, patients)
    if not groups:
        raise PrivacyError("DP-SGD needs at least one patient at this site; found none")
    # Read without the lock only for the mechanism (settings, checked against the stored ones).
    mechanism = PrivacyLedger.open(ledger_path, privacy, num_patients=len(groups)).dp_sgd
    n_steps = steps_for(mechanism, steps=steps, epochs=epochs)
    check_model(model)
    # A test seed still differs per round so rounds never repeat their noise.
    seed = None if privacy.noise_seed is None else privacy.noise_seed + server_round
    # The round is in the ledger before the first noisy step; refused there if over budget.
    with spend(
        ledger_path, privacy, num_patients=len(groups), server_round=server_round, steps=n_steps
    ) as ledger:
        step = PatientDPStep(
            groups,
            ledger.dp_sgd,
            patient_batch(train_cfg, privacy, device=device, generator=generator),
            generator=private_generator(seed, device),
        )
        metrics = train_steps(
            model, optimizer, graphs, train_cfg, stage=stage, steps=n_steps, device=device,
            generator=generator, step=step, objective=objective,
        )  # fmt: skip
    return metrics | {"epsilon": ledger.epsilon, "num_patients": float(len(groups))}, ledger

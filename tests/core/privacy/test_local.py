"""A local-DP round of the real H-MGDM model: ledger written, budget refused before training."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL
from opacus.accountants import RDPAccountant
from region_graphs import random_region_graph

from hmgdm_core.config import load_config
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments
from hmgdm_core.privacy.accountant import Mechanism
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted
from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger
from hmgdm_core.privacy.local import private_round, steps_for
from hmgdm_core.train import build_model, make_optimizer

TINY = TINY_MODEL
CPU = torch.device("cpu")


def _setup(**overrides):
    # 8 graphs from 4 slides; slides s0 and s1 belong to one patient -> 3 patients.
    graphs = [random_region_graph(20 + 2 * i, seed=i, slide_id=f"s{i % 4}") for i in range(8)]
    cfg = load_config(overrides={**TINY, **overrides})
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    return graphs, cfg, model, {"s0": "A", "s1": "A"}


@pytest.mark.parametrize("teacher", [0.0, 1.0])
def test_private_round_trains_the_model_and_records_opacus_epsilon(tmp_path, teacher):
    graphs, cfg, model, patients = _setup(**{"diffusion.teacher_weight": teacher})
    privacy = LocalDP(patients_per_step=1.5, noise_seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, cfg.train, "diffusion")
    metrics, ledger = private_round(
        model,
        opt,
        graphs,
        cfg.train,
        privacy,
        ledger_path=tmp_path / LEDGER_NAME,
        server_round=1,
        stage="diffusion",
        steps=3,
        device=CPU,
        generator=torch.Generator().manual_seed(0),
        patients=patients,
    )
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("autoencoder."))
    # The EMA teacher (switch) follows the DP-trained encoder without a gradient of its own.
    moved = [not torch.equal(before[k], after[k]) for k in before if k.startswith("teacher.")]
    if teacher:
        assert moved and any(moved)
    else:
        assert not moved
    reference = RDPAccountant()
    reference.history = [(1.0, 0.5, 3)]  # 1.5 expected patients of 3
    assert metrics["num_patients"] == 3 and metrics["num_steps"] == 3
    assert PrivacyLedger.load(tmp_path / LEDGER_NAME).epsilon == pytest.approx(
        reference.get_epsilon(delta=1e-5), abs=1e-6
    )
    assert ledger.epsilon == metrics["epsilon"]


def test_exhausted_budget_refuses_before_touching_the_model(tmp_path):
    graphs, cfg, model, patients = _setup()
    privacy = LocalDP(patients_per_step=1.5, noise_seed=0, max_epsilon=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyBudgetExhausted):
        private_round(
            model,
            make_optimizer(model, cfg.train, "diffusion"),
            graphs,
            cfg.train,
            privacy,
            ledger_path=tmp_path / LEDGER_NAME,
            server_round=1,
            stage="diffusion",
            steps=3,
            device=CPU,
            generator=torch.Generator().manual_seed(0),
            patients=patients,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / LEDGER_NAME).exists()


def test_epochs_convert_to_steps():
    privacy = LocalDP(patients_per_step=4)
    mechanism = Mechanism(privacy.noise_multiplier, privacy.clip_norm, privacy.rate_for(40))
    assert steps_for(mechanism, steps=None, epochs=2.0) == 20
    assert steps_for(mechanism, steps=7, epochs=None) == 7

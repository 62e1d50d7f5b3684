"""Tests of the torch deep Cox loss against lifelines and the numpy partial likelihood."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from hmgdm_core.downstream.deepcox import cox_partial_nll
from hmgdm_core.downstream.fedcox import cox_stats


def test_loss_equals_lifelines_log_likelihood_without_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    time = rng.exponential(np.exp(-x @ np.array([0.7, -0.4])))  # continuous: no ties
    event = (rng.random(120) < 0.7).astype(int)
    frame = pd.DataFrame(x, columns=["a", "b"]).assign(time=time, event=event)
    cph = CoxPHFitter().fit(frame, "time", "event")
    risk = torch.tensor(x @ cph.params_.to_numpy())
    nll = cox_partial_nll(risk, torch.tensor(time), torch.tensor(event), reduction="sum")
    assert nll.item() == pytest.approx(-cph.log_likelihood_, rel=1e-9)
    mean = cox_partial_nll(risk, torch.tensor(time), torch.tensor(event))
    assert mean.item() == pytest.approx(nll.item() / event.sum(), rel=1e-12)


def test_breslow_ties_value_and_gradient_match_numpy_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    time = rng.integers(1, 8, 60).astype(float)  # heavy ties
    event = rng.random(60) < 0.6
    beta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    nll = cox_partial_nll(
        torch.tensor(x) @ beta, torch.tensor(time), torch.tensor(event), reduction="sum"
    )
    nll.backward()
    stats = cox_stats(x, time, event, beta.detach().numpy(), "breslow")
    assert nll.item() == pytest.approx(-stats.loglik, rel=1e-10)
    np.testing.assert_allclose(beta.grad.numpy(), -stats.gradient, rtol=1e-8, atol=1e-10)


def test_loss_is_invariant_to_row_order_and_zero_without_events():
    rng = np.random.default_rng(2)
    risk, time = torch.tensor(rng.normal(size=30)), torch.tensor(rng.integers(1, 5, 30) * 1.0)
    event = torch.tensor(rng.random(30) < 0.5)
    perm = torch.tensor(rng.permutation(30))
    assert cox_partial_nll(risk, time, event).item() == pytest.approx(
        cox_partial_nll(risk[perm], time[perm], event[perm]).item(), rel=1e-12
    )
    assert cox_partial_nll(risk, time, torch.zeros(30)).item() == 0.0

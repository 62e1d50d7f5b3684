"""Tests of federated Newton Cox: equals lifelines' site-stratified fit, pooled moments,
step halving."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from hmgdm_core.downstream.concordance import pooled_cindex
from hmgdm_core.downstream.fedcox import (
    CoxStats,
    FederatedCox,
    NewtonState,
    newton_update,
    site_moments,
)


def sites_data(seed: int, tied: bool):
    rng = np.random.default_rng(seed)
    n = 240
    site = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 3)) + site[:, None] * 0.5  # non-IID covariates
    x[:, 2] = 10 + 5 * x[:, 2]  # a covariate on another scale, like age
    time = rng.exponential(np.exp(-(x @ np.array([0.6, -0.4, 0.02])) - site))
    if tied:
        time = np.round(time, 1) + 0.1
    event = (rng.random(n) < 0.7).astype(int)
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(time=time, event=event, site=site)
    sites = [(x[site == s], time[site == s], event[site == s]) for s in range(3)]
    return frame, sites


@pytest.mark.parametrize("penalizer", [0.0, 0.1])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_lifelines_site_stratified_fit(penalizer, tied):
    frame, sites = sites_data(0, tied)
    fed = FederatedCox(penalizer=penalizer, ties="efron").fit(sites)
    ref = CoxPHFitter(penalizer=penalizer).fit(frame, "time", "event", strata=["site"])
    assert fed.converged_
    np.testing.assert_allclose(fed.params_, ref.params_.to_numpy(), rtol=1e-4)
    assert fed.log_likelihood_ == pytest.approx(ref.log_likelihood_, rel=1e-8)


def test_breslow_equals_efron_without_ties_and_differs_with_ties():
    for tied in (False, True):
        _, sites = sites_data(1, tied)
        breslow = FederatedCox(ties="breslow").fit(sites).params_
        efron = FederatedCox(ties="efron").fit(sites).params_
        assert np.allclose(breslow, efron, rtol=1e-9) is (not tied)


def test_pooled_pair_count_cindex_is_within_sites():
    _, sites = sites_data(2, tied=True)
    fed = FederatedCox().fit(sites)
    counts = fed.pair_counts(sites)
    assert len(counts) == 3
    assert 0.6 < pooled_cindex(counts) <= 1.0  # the model uses the covariates that drive hazard


def test_summed_moments_give_pooled_mean_and_sample_std():
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(n, 2)) * 3 + 1 for n in (5, 17, 9)]
    moments = site_moments(parts[0]) + site_moments(parts[1]) + site_moments(parts[2])
    union = np.concatenate(parts)
    np.testing.assert_allclose(moments.mean, union.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.std, union.std(0, ddof=1), rtol=1e-10)


def test_newton_halves_the_step_when_the_objective_falls():
    direction = np.array([1.0, -2.0])
    state = NewtonState(
        beta=np.array([1.0, -2.0]), anchor=np.zeros(2), direction=direction, objective=-5.0
    )
    worse = CoxStats(n=10, loglik=-9.0, gradient=np.zeros(2), hessian=-np.eye(2))
    halved = newton_update(state, worse)
    np.testing.assert_allclose(halved.beta, 0.5 * direction)
    assert halved.step == 0.5 and not halved.converged and halved.rounds == 1
    better = CoxStats(n=10, loglik=-4.0, gradient=np.array([0.5, 0.0]), hessian=-2 * np.eye(2))
    stepped = newton_update(halved, better)
    np.testing.assert_allclose(stepped.beta, 0.5 * direction + np.array([0.25, 0.0]))
    assert stepped.objective == -4.0 and stepped.step == 1.0

"""Federated Cox regression by exact Newton steps on summed per-site sufficient statistics.

Each site computes the log partial likelihood, gradient and Hessian over its *own* risk sets;
the server sums them and takes a Newton step. The result is the **site-stratified** Cox model
(one baseline hazard per site), i.e. lifelines' `CoxPHFitter(...).fit(df, strata=["site"])`,
not the unstratified pooled fit, which would need risk sets spanning sites. Covariates are
standardised with the pooled mean and std (from summed moments) and the L2 penalty is
lifelines': `n * penalizer / 2 * ||beta_std||²`, so the two fits share one optimum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from hmgdm_core.downstream.concordance import PairCounts, linear_risk, pair_counts

Ties = Literal["breslow", "efron"]


@dataclass(frozen=True)
class Moments:
    """Row count, sum and sum of squares of a site's covariates; sums to pooled mean and std."""

    n: int
    total: np.ndarray  # (d,)
    total_sq: np.ndarray  # (d,)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.n

    @property
    def std(self) -> np.ndarray:
        """Sample std (ddof=1), as pandas and hence lifelines use for standardising."""
        var = (self.total_sq - self.n * self.mean**2) / (self.n - 1)
        return np.sqrt(np.maximum(var, 0.0))


def site_moments(x: ArrayLike) -> Moments:
    """Moments of one site's covariates (n, d)."""
    x = np.asarray(x, dtype=np.float64)
    return Moments(len(x), x.sum(axis=0), (x**2).sum(axis=0))


@dataclass(frozen=True)
class CoxStats:
    """Log partial likelihood, its gradient and Hessian at one beta, summed over sites."""

    n: int
    loglik: float
    gradient: np.ndarray  # (d,)
    hessian: np.ndarray  # (d, d)

    def __add__(self, other: CoxStats) -> CoxStats:
        return CoxStats(
            self.n + other.n,
            self.loglik + other.loglik,
            self.gradient + other.gradient,
            self.hessian + other.hessian,
        )


def cox_stats(
    z: ArrayLike, time: ArrayLike, event: ArrayLike, beta: ArrayLike, ties: Ties
) -> CoxStats:
    """Partial-likelihood statistics of one stratum with covariates `z` (n, d) at `beta` (d,).

    Efron's tie correction subtracts the share l/d of the tied deaths from the l-th of the d
    denominators at a death time; Breslow keeps the full risk set (share 0).
    """
    z = np.asarray(z, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    dead = np.asarray(event).astype(bool)
    beta = np.asarray(beta, dtype=np.float64)
    order = np.argsort(time, kind="stable")
    z, time, dead = z[order], time[order], dead[order]
    eta = z @ beta  # (n,)
    shift = eta.max() if len(eta) else 0.0  # exp overflow guard; cancels in every ratio
    w = np.exp(eta - shift)
    times, first, group = np.unique(time, return_index=True, return_inverse=True)
    zz = z[:, :, None] * z[:, None, :]  # (n, d, d)

    def at_risk(values: np.ndarray) -> np.ndarray:  # sums over {j: T_j >= t} per distinct t
        return np.cumsum(values[::-1], axis=0)[::-1][first]

    def of_deaths(values: np.ndarray) -> np.ndarray:  # sums over the deaths at each distinct t
        out = np.zeros((len(times), *values.shape[1:]))
        np.add.at(out, group[dead], values[dead])
        return out

    wz, wzz = w[:, None] * z, w[:, None, None] * zz
    s0, s1, s2 = at_risk(w), at_risk(wz), at_risk(wzz)
    d0, d1, d2 = of_deaths(w), of_deaths(wz), of_deaths(wzz)
    n_dead = np.bincount(group[dead], minlength=len(times))
    k = np.repeat(np.arange(len(times)), n_dead)  # one entry per death: its time index
    rank = np.arange(len(k)) - np.repeat(np.cumsum(n_dead) - n_dead, n_dead)
    share = rank / n_dead[k] if ties == "efron" else np.zeros(len(k))
    denom = s0[k] - share * d0[k]  # (deaths,)
    mean = (s1[k] - share[:, None] * d1[k]) / denom[:, None]  # (deaths, d)
    second = (s2[k] - share[:, None, None] * d2[k]) / denom[:, None, None]  # (deaths, d, d)
    loglik = float(eta[dead].sum() - np.sum(np.log(denom) + shift))
    gradient = z[dead].sum(axis=0) - mean.sum(axis=0)
    hessian = mean.T @ mean - second.sum(axis=0)
    return CoxStats(len(z), loglik, gradient, hessian)


def site_cox_stats(
    x: ArrayLike,
    time: ArrayLike,
    event: ArrayLike,
    beta: ArrayLike,
    *,
    mean: ArrayLike,
    std: ArrayLike,
    ties: Ties = "efron",
) -> CoxStats:
    """What a site sends each round: its statistics at `beta` on pooled-standardised covariates."""
    z = (np.asarray(x, dtype=np.float64) - np.asarray(mean)) / np.asarray(std)
    return cox_stats(z, time, event, beta, ties)


@dataclass(frozen=True)
class NewtonState:
    """Server-side state of damped Newton: where to evaluate next and the last accepted point."""

    beta: np.ndarray  # (d,) where the sites evaluate next
    anchor: np.ndarray  # (d,) last accepted point
    direction: np.ndarray  # (d,) Newton direction from the anchor
    step: float = 1.0
    objective: float = -np.inf  # penalised log-likelihood at the anchor
    converged: bool = False
    rounds: int = 0

    @classmethod
    def start(cls, dim: int) -> NewtonState:
        zero = np.zeros(dim)
        return cls(beta=zero, anchor=zero, direction=zero)


def newton_update(
    state: NewtonState, stats: CoxStats, *, penalizer: float = 0.0, tol: float = 1e-10
) -> NewtonState:
    """One server round: accept `state.beta` and step, or halve the step if the objective fell.

    `stats` are the site statistics summed at `state.beta`. Converged when the Newton
    decrement g·H⁻¹g/2 falls below `tol`.
    """
    beta = state.beta
    ridge = penalizer * stats.n  # lifelines scales its penalty by the row count
    objective = stats.loglik - 0.5 * ridge * float(beta @ beta)
    if objective < state.objective and state.step > 1e-8:
        step = state.step / 2
        trial = state.anchor + step * state.direction
        return replace(state, beta=trial, step=step, rounds=state.rounds + 1)
    gradient = stats.gradient - ridge * beta
    neg_hessian = -stats.hessian + ridge * np.eye(len(beta))
    direction = np.linalg.solve(neg_hessian, gradient)
    converged = float(gradient @ direction) / 2 < tol
    return NewtonState(
        beta=beta + direction,
        anchor=beta,
        direction=direction,
        step=1.0,
        objective=objective,
        converged=converged,
        rounds=state.rounds + 1,
    )


SiteRows = tuple[ArrayLike, ArrayLike, ArrayLike]  # one site's x (n, d), time (n,), event (n,)


class FederatedCox:
    """Site-stratified Cox fitted by federated Newton: `fit(sites)` runs the rounds in-process,
    `fit_stats` from statistics the sites sent (server/cox.py).

    Fitted: `mean_`, `std_` (pooled standardisation), `params_` (coefficients on the original
    covariate scale, comparable to lifelines' `params_`), `log_likelihood_` (penalised, at the
    optimum), `rounds_`, `converged_`.
    """

    def __init__(
        self,
        *,
        penalizer: float = 0.0,
        ties: Ties = "efron",
        tol: float = 1e-10,
        max_rounds: int = 100,
    ) -> None:
        self.penalizer = penalizer
        self.ties = ties
        self.tol = tol
        self.max_rounds = max_rounds

    def fit(self, sites: Sequence[SiteRows]) -> FederatedCox:
        """Every round computed here from the sites' rows: the exchange a federation runs."""
        moments = sum((site_moments(x) for x, _, _ in sites[1:]), site_moments(sites[0][0]))

        def summed_stats(beta: np.ndarray) -> CoxStats:
            each = [
                site_cox_stats(x, t, e, beta, mean=self.mean_, std=self.std_, ties=self.ties)
                for x, t, e in sites
            ]
            return sum(each[1:], each[0])

        return self.fit_stats(moments, summed_stats)

    def fit_stats(
        self, moments: Moments, summed_stats: Callable[[np.ndarray], CoxStats]
    ) -> FederatedCox:
        """Newton rounds from summed site statistics: `moments` of all sites' covariates, and
        `summed_stats(beta)`, the sites' `site_cox_stats` at `beta` (standardised with this
        model's `mean_` and `std_`) summed, e.g. gathered by Flower messages."""
        self.mean_, self.std_ = moments.mean, moments.std
        if np.any(self.std_ == 0):
            raise ValueError(f"covariates {np.flatnonzero(self.std_ == 0).tolist()} are constant")
        state = NewtonState.start(len(self.mean_))
        while not state.converged and state.rounds < self.max_rounds:
            state = newton_update(
                state, summed_stats(state.beta), penalizer=self.penalizer, tol=self.tol
            )
        self.beta_ = state.beta
        self.params_ = state.beta / self.std_
        self.log_likelihood_ = state.objective
        self.rounds_, self.converged_ = state.rounds, state.converged
        return self

    def predict_risk(self, x: ArrayLike) -> np.ndarray:
        """Log partial hazard relative to the pooled mean covariate (higher = worse)."""
        return linear_risk(x, self.params_, self.mean_)

    def pair_counts(self, sites: Sequence[SiteRows]) -> list[PairCounts]:
        """Per-site concordance pair counts of this model's risks (what each site reports)."""
        return [pair_counts(t, self.predict_risk(x), e) for x, t, e in sites]

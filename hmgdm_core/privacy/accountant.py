"""Epsilon from a composition history, computed by opacus' accountants (RDP or PRV): the DP
`Mechanism` of a step and the one `PrivacyAccountant` of site and central DP.

A history is a sequence of (noise_multiplier, sample_rate, steps): `steps` Poisson-subsampled
Gaussian mechanisms with that noise and rate, as opacus' accountants store it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

import hmgdm_core.privacy._opacus  # noqa: F401  (drops the log handler opacus adds)
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted

Step = tuple[float, float, int]
Accountant = Literal["rdp", "prv"]


@dataclass(frozen=True)
class Mechanism:
    """The subsampled Gaussian mechanism of one DP step: each unit (a patient, or a site) is
    sampled with `sample_rate`, its contribution clipped to `clip_norm`, and the sum gets
    Gaussian noise of std `noise_multiplier * clip_norm`. What a DP step reads, and what an
    accountant composes."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float

    def steps_for(self, epochs: float) -> int:
        """Steps of `epochs` passes: a pass is 1 / sample_rate steps in expectation."""
        return max(1, math.ceil(epochs / self.sample_rate))

    def composed(self, steps: int) -> Step:
        """`steps` of this mechanism as an entry of an opacus accountant's history."""
        return (self.noise_multiplier, self.sample_rate, steps)


@dataclass(kw_only=True)
class PrivacyAccountant:
    """The one accountant of site (ledger) and central DP: the (epsilon, delta) a history of
    subsampled Gaussian mechanisms spent, by opacus' accountant, against `max_epsilon`.

    Before a release `check_budget(mechanism, steps)` refuses one that would pass the budget;
    after it `record(mechanism, steps)` adds it; `epsilon(delta)` is what was spent.
    """

    delta: float
    max_epsilon: float | None = None
    accountant: Accountant = "rdp"
    history: list[Step] = field(default_factory=list)
    setting: str = "[privacy] max_epsilon"  # where the budget is set, for the refusal

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the accountant's own)."""
        delta = self.delta if delta is None else delta
        return epsilon(self.history, delta=delta, accountant=self.accountant)

    def projected_epsilon(self, mechanism: Mechanism, steps: int = 1) -> float:
        """Epsilon after `steps` more of `mechanism`."""
        composition = [*self.history, mechanism.composed(steps)]
        return epsilon(composition, delta=self.delta, accountant=self.accountant)

    def check_budget(self, mechanism: Mechanism, steps: int = 1) -> None:
        """Raise PrivacyBudgetExhausted when `steps` more of `mechanism` would pass max_epsilon."""
        if self.max_epsilon is None:
            return
        projected = self.projected_epsilon(mechanism, steps)
        if projected > self.max_epsilon:
            raise PrivacyBudgetExhausted(
                spent=self.epsilon(),
                projected=projected,
                max_epsilon=self.max_epsilon,
                delta=self.delta,
                setting=self.setting,
            )

    def record(self, mechanism: Mechanism, steps: int = 1) -> float:
        """Account `steps` released steps of `mechanism`; the epsilon spent after them."""
        self.history.append(mechanism.composed(steps))
        return self.epsilon()


def compose(history: Sequence[Step]) -> list[Step]:
    """Merge neighbouring entries with equal noise and rate (fewer PRV convolutions, same value)."""
    merged: list[Step] = []
    for sigma, rate, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][:2] == (sigma, rate):
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


def epsilon(history: Sequence[Step], *, delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at `delta` after every mechanism in `history` (0 when nothing was released)."""
    merged = compose(history)
    if not merged:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = merged
    return float(acc.get_epsilon(delta=delta))


def noise_for_budget(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """The smallest noise multiplier (opacus' 0.01 tolerance) that keeps `steps` within budget."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )

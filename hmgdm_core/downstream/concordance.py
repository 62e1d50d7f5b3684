"""Harrell's C-index (lifelines) and per-site concordance pair counts that pool without data.

Risk convention everywhere in this package: higher risk = shorter survival. lifelines'
`concordance_index` expects scores where higher = longer survival, so it receives `-risk`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from lifelines.utils import concordance_index
from numpy.typing import ArrayLike


def cindex(time: ArrayLike, risk: ArrayLike, event: ArrayLike) -> float:
    """Harrell's C-index of risk scores (higher = worse) via lifelines."""
    return float(concordance_index(time, -np.asarray(risk, dtype=np.float64), event))


@dataclass(frozen=True)
class PairCounts:
    """Comparable pairs of one site and how its risks order them; sums pool across sites.

    Pooling sums the counts of each site's *own* pairs: patients of different sites are never
    compared, so the pooled ratio is the C-index of the union with cross-site pairs removed.
    """

    concordant: int = 0
    discordant: int = 0
    tied_risk: int = 0
    comparable: int = 0

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(
            self.concordant + other.concordant,
            self.discordant + other.discordant,
            self.tied_risk + other.tied_risk,
            self.comparable + other.comparable,
        )

    @property
    def cindex(self) -> float:
        """(concordant + tied / 2) / comparable; NaN when no pair is comparable."""
        if self.comparable == 0:
            return float("nan")
        return (self.concordant + 0.5 * self.tied_risk) / self.comparable


def linear_risk(x: ArrayLike, coef: ArrayLike, center: ArrayLike | float = 0.0) -> np.ndarray:
    """Risk (x - center) · coef per row, identical rows giving bit-identical risks.

    A BLAS product may round rows differently depending on where they fall in a block, which
    turns equal risks into spurious ulp-level orderings and shifts the C-index's tied pairs;
    an element-wise product summed along each row has one rounding path for every row.
    """
    x = np.asarray(x, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    return (x * np.asarray(coef, dtype=np.float64)).sum(axis=1)


def pair_counts(time: ArrayLike, risk: ArrayLike, event: ArrayLike) -> PairCounts:
    """Count comparable pairs exactly as lifelines' `concordance_index` does.

    Pair (i, j) is comparable when i had the event and left first: T_i < T_j, or T_i == T_j
    with j censored. It is concordant when risk_i > risk_j, tied when the risks are equal.
    O(n²) memory, meant for one site's patients.
    """
    time = np.asarray(time, dtype=np.float64)
    risk = np.asarray(risk, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    earlier = time[:, None] < time[None, :]  # (n, n)
    tie_vs_censored = (time[:, None] == time[None, :]) & ~event[None, :]
    comparable = event[:, None] & (earlier | tie_vs_censored)
    higher = risk[:, None] > risk[None, :]
    equal = risk[:, None] == risk[None, :]
    n_comparable = int(comparable.sum())
    concordant = int((comparable & higher).sum())
    tied = int((comparable & equal).sum())
    return PairCounts(concordant, n_comparable - concordant - tied, tied, n_comparable)


def pooled_cindex(counts: Iterable[PairCounts]) -> float:
    """C-index from summed per-site pair counts (cross-site pairs are not compared)."""
    return sum(counts, PairCounts()).cindex

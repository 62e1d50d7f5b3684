"""Tests of C-index and per-site pair counts against lifelines and a brute-force definition."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index

from hmgdm_core.downstream.concordance import PairCounts, cindex, pair_counts, pooled_cindex


def data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    # coarse values so times and risks both have ties
    time = rng.integers(1, 15, n).astype(float)
    event = rng.random(n) < 0.6
    risk = rng.integers(0, 6, n).astype(float)
    return time, risk, event


def brute_force(time, risk, event, site):
    """Harrell's pairs within sites, from the definition, one pair at a time."""
    conc = tied = comp = 0
    for i in range(len(time)):
        for j in range(len(time)):
            if i == j or site[i] != site[j] or not event[i]:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                comp += 1
                conc += risk[i] > risk[j]
                tied += risk[i] == risk[j]
    return conc, tied, comp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_counts_match_lifelines(seed):
    time, risk, event = data(80, seed)
    counts = pair_counts(time, risk, event)
    assert counts.cindex == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)
    assert counts.cindex == pytest.approx(cindex(time, risk, event), abs=1e-12)
    assert counts.concordant + counts.discordant + counts.tied_risk == counts.comparable


def test_pooled_counts_equal_union_without_cross_site_pairs():
    time, risk, event = data(90, 5)
    site = np.random.default_rng(6).integers(0, 3, 90)
    per_site = [pair_counts(time[site == s], risk[site == s], event[site == s]) for s in range(3)]
    conc, tied, comp = brute_force(time, risk, event, site)
    total = sum(per_site, PairCounts())
    assert (total.concordant, total.tied_risk, total.comparable) == (conc, tied, comp)
    assert pooled_cindex(per_site) == (conc + tied / 2) / comp
    # and this differs from the union C-index, which also compares patients across sites
    assert pooled_cindex(per_site) != pytest.approx(cindex(time, risk, event), abs=1e-9)


def test_no_comparable_pair_gives_nan():
    assert np.isnan(pair_counts([1.0, 2.0], [0.1, 0.2], [0, 0]).cindex)

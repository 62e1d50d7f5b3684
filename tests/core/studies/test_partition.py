"""Partitioners: sizes, label skew, quantity skew, per-site stain shift."""

from __future__ import annotations

import numpy as np
import pytest

from hmgdm_core.studies.partition import (
    dirichlet_partition,
    iid_partition,
    quantity_partition,
    stain_shift,
)
from hmgdm_core.studies.synthetic import synthetic_image

LABELS = np.repeat(np.arange(3), 100)


def _label_shares(site: np.ndarray, sites: int) -> np.ndarray:
    """(sites, classes) share of each class within each site."""
    counts = np.zeros((sites, 3))
    np.add.at(counts, (site, LABELS), 1)
    return counts / counts.sum(1, keepdims=True)


def test_iid_sizes_differ_by_at_most_one_and_seed_decides():
    site = iid_partition(300, 7, seed=0)
    sizes = np.bincount(site, minlength=7)
    assert sizes.max() - sizes.min() <= 1
    assert np.array_equal(site, iid_partition(300, 7, seed=0))
    assert not np.array_equal(site, iid_partition(300, 7, seed=1))


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    skewed = dirichlet_partition(LABELS, 5, alpha=0.1, seed=0)
    even = dirichlet_partition(LABELS, 5, alpha=100.0, seed=0)
    # Most items of a skewed site come from one class; an alpha=100 site is near 1/3 each.
    assert _label_shares(skewed, 5).max(1).mean() > 0.8
    assert np.abs(_label_shares(even, 5) - 1 / 3).max() < 0.15
    assert set(np.unique(skewed)) == set(range(5))  # no hospital is left empty


def test_quantity_skew_sizes_follow_alpha_and_cover_every_item():
    small = np.bincount(quantity_partition(300, 5, alpha=0.3, seed=0), minlength=5)
    large = np.bincount(quantity_partition(300, 5, alpha=1000.0, seed=0), minlength=5)
    assert small.sum() == large.sum() == 300 and small.min() >= 1
    assert small.max() / small.min() > 5  # a few big hospitals, some small ones
    assert large.max() - large.min() <= 8  # Dirichlet(1000) shares: +-2 items


def test_partitions_refuse_more_sites_than_items():
    with pytest.raises(ValueError, match="cannot split 3 items into 5"):
        iid_partition(3, 5, seed=0)


def test_stain_shift_is_per_site_and_deterministic():
    image = synthetic_image("ring", seed=3)
    a0, a0_again, a1 = (stain_shift(image, s, 0.3) for s in (0, 0, 1))
    assert a0.dtype == np.uint8 and a0.shape == image.shape
    assert np.array_equal(a0, a0_again)
    # Sites see the same tissue in different colours; strength 0 is the identity.
    mean_colour = [im.reshape(-1, 3).mean(0) for im in (image, a0, a1)]
    assert np.abs(mean_colour[1] - mean_colour[2]).max() > 3
    assert np.abs(mean_colour[0] - mean_colour[1]).max() > 3
    assert stain_shift(image, 0, 0.0) is image

"""Partitioners: sizes, label skew, quantity skew, per-site stain shift (both models)."""

from __future__ import annotations

import numpy as np
import pytest

from hmgdm_core.studies.partition import (
    beer_lambert_matrix,
    beer_lambert_shift,
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


def test_beer_lambert_shift_is_linear_in_od_and_an_oracle_undoes_it(data_dir):
    """The second stain model: OD @ M per site, exactly invertible knowing the site."""
    from PIL import Image

    from hmgdm_core.stain import optical_density

    tile = sorted((data_dir / "kather2016_tiles" / "01_TUMOR").glob("*.tif"))[0]
    image = np.asarray(Image.open(tile).convert("RGB"))
    od = optical_density(image, i0=256.0).reshape(-1, 3)
    for site in range(3):
        m, m_inv = (beer_lambert_matrix(site, 0.3, inverse=inv) for inv in (False, True))
        np.testing.assert_allclose(m @ m_inv, np.eye(3), atol=1e-12)
        shifted = beer_lambert_shift(image, site, 0.3)
        assert np.array_equal(shifted, beer_lambert_shift(image, site, 0.3))  # deterministic
        # Linear: the shifted image is exp(-OD @ M) rounded, wherever it fits in 0..255.
        exact = 256.0 * np.exp(-(od @ m)) - 1.0
        inside = ((exact > 0) & (exact < 255)).all(1)
        assert inside.mean() > 0.99
        assert np.abs(shifted.reshape(-1, 3)[inside] - exact[inside]).max() <= 0.5 + 1e-9
        # A real change of colour, which the oracle undoes up to 8-bit rounding (a dark pixel's
        # rounding is a larger OD error, so a few of them miss by more than one grey level).
        assert np.abs(shifted.astype(int) - image).mean() > 5
        restored = beer_lambert_shift(shifted, site, 0.3, inverse=True)
        error = np.abs(restored.astype(int) - image).max(-1)
        assert (error <= 1).mean() > 0.995 and error.mean() < 0.5
    # Glass stays glass; sites differ; strength 0 is the identity.
    white = np.full((4, 4, 3), 255, np.uint8)
    assert np.array_equal(beer_lambert_shift(white, 1, 0.3), white)
    assert not np.allclose(beer_lambert_matrix(0, 0.3), beer_lambert_matrix(1, 0.3))
    np.testing.assert_allclose(beer_lambert_matrix(2, 0.0), np.eye(3), atol=1e-12)
    assert beer_lambert_shift(image, 0, 0.0) is image


def test_study_partitions_choose_the_stain_model_and_old_names_keep_their_meaning():
    from hmgdm_core.studies.config import PartitionSpec
    from hmgdm_core.studies.partition import shift_site

    old = PartitionSpec(kind="dirichlet", alpha=0.5, stain=0.3, stain_norm="macenko")
    assert old.stain_model == "hed" and old.name == "dirichlet0.5+stain0.3+macenko"
    new = old.model_copy(update={"stain_model": "beer_lambert"})
    assert new.name == "dirichlet0.5+stain0.3-beer_lambert+macenko"
    image = synthetic_image("ring", seed=3)
    assert np.array_equal(shift_site(image, 1, 0.3), stain_shift(image, 1, 0.3))
    assert np.array_equal(
        shift_site(image, 1, 0.3, "beer_lambert"), beer_lambert_shift(image, 1, 0.3)
    )
    with pytest.raises(ValueError, match="unknown stain model"):
        shift_site(image, 1, 0.3, "lab")

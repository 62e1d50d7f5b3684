"""Splitting one cohort into simulated hospitals: IID, label skew (Dirichlet), quantity skew,
and per-site stain shift (an H&E optical-density transform applied to a site's images).

All functions are pure and seeded: the same arguments give the same split or the same colours.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# Each site's hematoxylin / eosin / DAB optical densities are scaled by exp(N(0, strength)),
# i.e. a lab staining more or less intensely than the others; strength 0 leaves images alone.
_STAIN_SEED = 7_919


def iid_partition(n: int, sites: int, seed: int) -> np.ndarray:
    """Site index per item: a seeded shuffle dealt round-robin (sizes differ by at most one)."""
    _check(n, sites)
    site = np.empty(n, dtype=np.int64)
    site[np.random.default_rng(seed).permutation(n)] = np.arange(n) % sites
    return site


def dirichlet_partition(labels: ArrayLike, sites: int, alpha: float, seed: int) -> np.ndarray:
    """Label skew: each class is spread over sites in proportions drawn from Dirichlet(alpha).

    Small alpha concentrates a class on few sites; large alpha approaches IID. Every site is
    guaranteed at least one item (taken from the largest site) so no simulated hospital is empty.
    """
    labels = np.asarray(labels)
    _check(len(labels), sites)
    rng = np.random.default_rng(seed)
    site = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        share = rng.dirichlet(np.full(sites, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            site[part] = k
    return _fill_empty(site, sites, rng)


def quantity_partition(n: int, sites: int, alpha: float, seed: int) -> np.ndarray:
    """Quantity skew: site sizes proportional to Dirichlet(alpha) draws, labels IID within."""
    _check(n, sites)
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(sites, alpha))
    # Every site gets one item first, the rest follow the drawn shares (largest remainders).
    exact = share * (n - sites)
    sizes = 1 + np.floor(exact).astype(int)
    sizes[np.argsort(np.floor(exact) - exact)[: n - sizes.sum()]] += 1
    site = np.repeat(np.arange(sites), sizes)
    return site[np.argsort(rng.permutation(n))]


def _fill_empty(site: np.ndarray, sites: int, rng: np.random.Generator) -> np.ndarray:
    for k in range(sites):
        if not np.any(site == k):
            largest = np.argmax(np.bincount(site, minlength=sites))
            site[rng.choice(np.flatnonzero(site == largest))] = k
    return site


def _check(n: int, sites: int) -> None:
    if sites < 1 or n < sites:
        raise ValueError(f"cannot split {n} items into {sites} non-empty sites")


def stain_scales(site: int, strength: float) -> np.ndarray:
    """(3,) multipliers of site `site`'s H, E and DAB optical densities (seeded by the site)."""
    rng = np.random.default_rng([_STAIN_SEED, site])
    return np.exp(rng.normal(0.0, strength, 3))


def stain_shift(image: np.ndarray, site: int, strength: float) -> np.ndarray:
    """`image` (h, w, 3) uint8 RGB as site `site`'s scanner and lab would have stained it."""
    if strength == 0:
        return image
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image) * stain_scales(site, strength)  # (h, w, 3) optical densities
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)

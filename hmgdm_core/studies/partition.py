"""Splitting one cohort into simulated hospitals: IID, label skew (Dirichlet), quantity skew,
and per-site stain shift (an H&E optical-density transform applied to a site's images, by one
of two models: `hed`, the original, or `beer_lambert`, linear in optical density).

All functions are pure and seeded: the same arguments give the same split or the same colours.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from skimage.color import rgb_from_hed  # Ruifrok & Johnston's stain vectors

from hmgdm_core.stain import optical_density, rgb_from_optical_density

# Each site's hematoxylin / eosin / DAB optical densities are scaled by exp(N(0, strength)),
# i.e. a lab staining more or less intensely than the others; strength 0 leaves images alone.
_STAIN_SEED = 7_919
_BEER_LAMBERT_SEED = 7_927
# Glass for the beer_lambert model: OD = -ln((I + 1) / 256) maps 0..255 one-to-one onto OD >= 0,
# so white stays white and every grey level has an exact inverse.
_WHITE = 256.0
# How far a site's stain vectors turn: each channel of each vector is scaled by
# exp(N(0, strength * _TURN)): 1 to 11 degrees at strength 0.3 (LC25000 images' own Macenko
# vectors spread a median 3 to 5 degrees around their median).
_TURN = 0.5
STAIN_MODELS = ("hed", "beer_lambert")


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


def beer_lambert_matrix(site: int, strength: float, *, inverse: bool = False) -> np.ndarray:
    """(3, 3) M with OD_site = OD @ M, site `site`'s stain change (`inverse`: its undoing).

    Beer-Lambert: a pixel's OD is its stain concentrations times the stains' OD vectors, so a
    lab that stains more or less (concentrations) with other dye lots or scanner filters (stain
    vectors) changes OD by a linear map. OD is split on Ruifrok & Johnston's H, E vectors and
    their cross product (a fixed published basis, not any image's Macenko estimate, which would
    make the shift circular for Macenko); the H and E concentrations are scaled by
    exp(N(0, strength)) and recombined with H and E vectors turned per channel (they stay
    non-negative, as absorbances are). The third component is what a slide's own stains put
    outside the published H-E plane, so it follows the staining's overall strength (the
    geometric mean of the two scales); kept fixed, it turns a paler site's OD negative in the
    blue channel of LC25000 (15% of pixels clipped at one site instead of 6%). No component is
    clipped, unlike `stain_shift`; only the 8-bit rendering saturates. Deterministic in
    (site, strength); strength 0 gives the identity.
    """
    rng = np.random.default_rng([_BEER_LAMBERT_SEED, site])
    scales = np.exp(rng.normal(0.0, strength, (2, 1)))  # H, E concentrations
    turn = np.exp(rng.normal(0.0, strength * _TURN, (2, 3)))  # H, E vectors, per channel
    he = rgb_from_hed[:2] / np.linalg.norm(rgb_from_hed[:2], axis=1, keepdims=True)  # (2, 3)
    residual = np.cross(he[0], he[1])
    residual = residual / np.linalg.norm(residual)
    site_he = he * turn / np.linalg.norm(he * turn, axis=1, keepdims=True)
    basis = np.vstack([he, residual])  # rows: H, E, residual; OD = c @ basis, c concentrations
    site_basis = np.vstack([scales * site_he, np.sqrt(scales.prod()) * residual])  # OD_site
    if inverse:
        return np.linalg.solve(site_basis, basis)
    return np.linalg.solve(basis, site_basis)


def beer_lambert_shift(
    image: np.ndarray, site: int, strength: float, *, inverse: bool = False
) -> np.ndarray:
    """`image` (h, w, 3) uint8 RGB with site `site`'s stain change of `beer_lambert_matrix`
    (`inverse`: undone, as an oracle knowing the site would). Only grey levels pushed past
    0 or 255 are lost."""
    if strength == 0:
        return image
    matrix = beer_lambert_matrix(site, strength, inverse=inverse)
    return rgb_from_optical_density(optical_density(image, i0=_WHITE) @ matrix, i0=_WHITE)


def shift_site(image: np.ndarray, site: int, strength: float, model: str = "hed") -> np.ndarray:
    """`image` stained as site `site` under the stain model `model` (one of STAIN_MODELS)."""
    if model == "hed":
        return stain_shift(image, site, strength)
    if model == "beer_lambert":
        return beer_lambert_shift(image, site, strength)
    raise ValueError(f"unknown stain model {model!r}; choose one of {STAIN_MODELS}")

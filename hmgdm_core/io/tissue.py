"""Tissue detection on a low-resolution thumbnail, and the grid of tissue tiles to read.

Otsu on saturation (or optical density), bounded by absolute limits, minus ink and dark areas.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import median_filter
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from hmgdm_core.config import TissueConfig
from hmgdm_core.exceptions import ConfigError

# The Otsu threshold is clamped into these bounds. The floor keeps near-white glass (saturation
# below ~0.08, mean optical density below ~0.05) out even when Otsu splits pure noise; the
# ceiling stops Otsu on an all-tissue image from cutting the tissue itself in two.
THRESHOLD_BOUNDS = {"otsu_saturation": (0.08, 0.15), "otsu_od": (0.06, 0.10)}
# Ink and debris: very dark pixels (black ink, slide edges, bubbles) and green-to-blue hues,
# which H&E (pink/purple) does not produce: green/cyan at any visible saturation, blue only when
# strongly saturated (haematoxylin can look bluish). Red ink is not separable from eosin by
# colour alone and is kept.
DARK_VALUE = 0.15
INK_BANDS = ((0.18, 0.50, 0.10), (0.50, 0.67, 0.35))  # (hue from, hue to, min saturation)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean over channels of -log10(I / 255): 0 on white glass, ~0.1-0.4 on stained tissue."""
    return -np.log10((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)  # (h, w)


def ink_mask(hsv: np.ndarray) -> np.ndarray:
    """Pixels that are pen ink or dark debris rather than stained tissue, from HSV in [0, 1]."""
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    ink = val < DARK_VALUE
    for lo, hi, min_sat in INK_BANDS:
        ink |= (hue >= lo) & (hue <= hi) & (sat >= min_sat)
    return ink


def tissue_mask(thumb: np.ndarray, *, array_mpp: float, cfg: TissueConfig) -> np.ndarray:
    """(h, w) bool tissue mask of an (h, w, 3) uint8 RGB thumbnail sampled at `array_mpp` µm/px."""
    hsv = rgb2hsv(thumb)  # (h, w, 3) floats in [0, 1]
    signal = hsv[..., 1] if cfg.method == "otsu_saturation" else _optical_density(thumb)
    signal = median_filter(signal, size=3)  # isolated noisy pixels on glass are not tissue
    lo, hi = THRESHOLD_BOUNDS[cfg.method]
    # Otsu needs two distinct values; a flat image is all background or all tissue by the floor.
    otsu = threshold_otsu(signal) if np.ptp(signal) > 0 else lo
    mask = (signal > min(max(otsu, lo), hi)) & ~ink_mask(hsv)
    px_area = array_mpp * array_mpp
    mask = remove_small_objects(mask, max_size=int(cfg.min_object_um2 / px_area))
    return remove_small_holes(mask, max_size=int(cfg.min_hole_um2 / px_area))


def tile_fractions(
    mask: np.ndarray, *, mask_mpp: float, tile_um: float, slide_size_um: tuple[float, float]
) -> np.ndarray:
    """(n_y, n_x) share of each tile of the slide's grid covered by tissue.

    The grid starts at the slide's origin with step `tile_um` and covers the whole slide; a mask
    pixel belongs to the tile containing its centre.
    """
    if tile_um < 2 * mask_mpp:
        raise ConfigError(
            f"tile of {tile_um:g} µm spans fewer than 2 tissue-mask pixels of {mask_mpp:g} µm; "
            "lower tissue.thumbnail_mpp or enlarge the tiles"
        )
    n_x = max(1, math.ceil(slide_size_um[0] / tile_um))
    n_y = max(1, math.ceil(slide_size_um[1] / tile_um))
    rows, cols = np.nonzero(mask)
    tx = np.minimum(((cols + 0.5) * mask_mpp // tile_um).astype(np.int64), n_x - 1)
    ty = np.minimum(((rows + 0.5) * mask_mpp // tile_um).astype(np.int64), n_y - 1)
    counts = np.bincount(ty * n_x + tx, minlength=n_x * n_y)  # (n_y * n_x,)
    return (counts * (mask_mpp / tile_um) ** 2).reshape(n_y, n_x)


def tile_grid(
    mask: np.ndarray,
    *,
    mask_mpp: float,
    tile_um: float,
    slide_size_um: tuple[float, float],
    min_fraction: float,
) -> np.ndarray:
    """(n, 2) float64 top-left (x, y) µm of grid tiles holding tissue, in row-major order.

    A tile of `tile_fractions`' grid is kept when its tissue covers at least `min_fraction` of
    its area and it holds some tissue at all.
    """
    fractions = tile_fractions(
        mask, mask_mpp=mask_mpp, tile_um=tile_um, slide_size_um=slide_size_um
    )  # (n_y, n_x)
    n_x = fractions.shape[1]
    keep = np.flatnonzero((fractions.ravel() > 0) & (fractions.ravel() >= min_fraction))
    return np.stack([keep % n_x, keep // n_x], axis=1).astype(np.float64) * tile_um

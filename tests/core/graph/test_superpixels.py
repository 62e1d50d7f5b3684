"""Superpixels: size from the grid step, connectivity, mask, Lab, metrics, quality vs skimage."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.measure import label as label_components
from skimage.segmentation import slic as skimage_slic

from hmgdm_core.graph.superpixels import (
    boundary_recall,
    enforce_connectivity,
    grid_step,
    rgb_to_lab,
    slic,
    stain_segments,
    undersegmentation_error,
)


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Blurred colour noise: blobs a few pixels wide, like stained tissue without the biology."""
    f = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(h, w, 3)), (4, 4, 0))
    return ((f - f.min()) / (f.max() - f.min()) * 255).astype(np.uint8)


def _n_components(labels: np.ndarray) -> int:
    return int(label_components(labels + 1, background=0, connectivity=1).max())


def test_grid_step_follows_entity_area():
    assert grid_step(0.5, 100.0) == 20  # 10 µm side at 0.5 µm/px
    assert grid_step(0.25, 100.0) == 40


def test_segment_count_matches_grid_and_labels_are_consecutive():
    labels = slic(_smooth(120, 160), step=10)
    assert labels.shape == (120, 160)
    n = labels.max() + 1
    assert 0.7 * 192 <= n <= 1.2 * 192  # 12 x 16 seeds
    assert np.array_equal(np.unique(labels), np.arange(n))


def test_every_superpixel_is_one_connected_component(kather_tile):
    labels = slic(kather_tile, step=12)
    assert _n_components(labels) == labels.max() + 1


def test_masked_pixels_never_join_a_superpixel(kather_tile):
    yy, xx = np.mgrid[:150, :150]
    mask = (yy - 75) ** 2 + (xx - 40) ** 2 < 50**2
    labels = slic(kather_tile, step=12, mask=mask)
    assert (labels[~mask] == -1).all() and (labels[mask] >= 0).all()
    assert _n_components(labels) == labels.max() + 1
    assert slic(kather_tile, step=12, mask=np.zeros((150, 150), bool)).max() == -1


def test_lab_matches_skimage_after_the_same_rescale(kather_tile):
    lo, hi = kather_tile.min(), kather_tile.max()
    rescaled = (kather_tile.astype(np.float64) - lo) / (hi - lo)
    np.testing.assert_allclose(rgb_to_lab(kather_tile).numpy(), rgb2lab(rescaled), atol=2e-3)


def test_small_fragments_merge_into_the_longest_border_neighbour():
    labels = np.zeros((10, 10), np.int64)
    labels[:, 5:] = 1
    labels[0, 0] = 1  # a 1-pixel fragment of label 1, touching only label 0
    labels[9, 9] = 2  # a 1-pixel label touching only label 1
    out = enforce_connectivity(labels, min_size=3)
    assert out.max() == 1 and _n_components(out) == 2
    assert out[0, 0] == out[5, 0] and out[9, 9] == out[5, 9]


def test_metrics_on_known_segmentations():
    halves = np.repeat([[0] * 4 + [1] * 4], 8, axis=0)
    quads = halves + 2 * (np.arange(8)[:, None] >= 4)
    assert boundary_recall(quads, halves) == 1.0
    assert undersegmentation_error(quads, halves) == 0.0
    one = np.zeros_like(halves)
    assert boundary_recall(one, halves) == 0.0
    assert undersegmentation_error(one, halves) == 1.0


@pytest.mark.slow
def test_quality_within_ten_percent_of_skimage_on_real_tiles(data_dir):
    ours, ref = [], []
    tiles = sorted((data_dir / "kather2016_tiles").glob("*/*.tif"))[::3]
    tiles.append(data_dir / "bracs_rois" / "images" / "283_dcis_4.png")
    for path in tiles:
        rgb = np.asarray(Image.open(path).convert("RGB"))[:256, :256]
        truth = stain_segments(rgb)
        step = 12
        n_segments = int(np.ceil(rgb.shape[0] / step) * np.ceil(rgb.shape[1] / step))
        theirs = skimage_slic(rgb, n_segments=n_segments, compactness=10, start_label=0)
        mine = slic(rgb, step=step, compactness=10)
        assert 0.7 < (mine.max() + 1) / (theirs.max() + 1) < 1.4
        ours.append([boundary_recall(mine, truth), undersegmentation_error(mine, truth)])
        ref.append([boundary_recall(theirs, truth), undersegmentation_error(theirs, truth)])
    (br, use), (br_ref, use_ref) = np.mean(ours, 0), np.mean(ref, 0)
    assert br >= 0.9 * br_ref
    assert use <= 1.1 * use_ref

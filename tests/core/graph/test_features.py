"""Node descriptors against scikit-image's regionprops, LBP codes, instance windows."""

from __future__ import annotations

import numpy as np
from skimage.color.colorconv import hed_from_rgb
from skimage.measure import regionprops

from hmgdm_core.graph.features import NODE_NAMES, lbp_uniform, node_descriptors, windows
from hmgdm_core.graph.superpixels import slic

MPP = 0.495


def _column(desc: np.ndarray, name: str) -> np.ndarray:
    return desc[:, NODE_NAMES.index(name)]


def _props(labels: np.ndarray, image: np.ndarray, attr: str) -> np.ndarray:
    return np.array([getattr(p, attr) for p in regionprops(labels + 1, intensity_image=image)])


def test_descriptors_match_regionprops_on_a_real_tile(kather_tile):
    rgb = kather_tile[:96, :96]
    labels = slic(rgb, step=12)
    n = labels.max() + 1
    desc, centroids = node_descriptors(rgb, labels, n, array_mpp=MPP, reference_yx=(10.0, 20.0))
    assert desc.shape == (n, len(NODE_NAMES)) and desc.dtype == np.float32
    assert np.isfinite(desc).all()

    def cols(template: str, channels: str) -> np.ndarray:
        return desc[:, [NODE_NAMES.index(template.format(c)) for c in channels]]

    # Optical density as skimage.color.rgb2hed computes it, and the stains before its clip at 0.
    od = np.log(np.maximum(rgb / 255, 1e-6)) / np.log(1e-6)
    np.testing.assert_allclose(cols("{}_mean", "rgb"), _props(labels, rgb, "intensity_mean"), 1e-5)
    np.testing.assert_allclose(
        cols("{}_std", "rgb"), _props(labels, rgb, "intensity_std"), 1e-3, 1e-3
    )
    hed = _props(labels, od @ hed_from_rgb, "intensity_mean")
    np.testing.assert_allclose(cols("od_{}_mean", "hed"), hed, 1e-4, 1e-6)
    np.testing.assert_allclose(
        cols("od_{}_std", "rgb"), _props(labels, od, "intensity_std"), 1e-4, 1e-6
    )
    np.testing.assert_allclose(centroids, _props(labels, rgb, "centroid"), atol=1e-6)
    area = _props(labels, rgb, "area")
    np.testing.assert_allclose(_column(desc, "area_um2"), area * MPP**2, 1e-5)
    ecc = _props(labels, rgb, "eccentricity")
    np.testing.assert_allclose(_column(desc, "eccentricity"), ecc, 0, 1e-5)
    dx = (_props(labels, rgb, "centroid")[:, 1] - 20.0) * MPP
    np.testing.assert_allclose(_column(desc, "dx_um"), dx, 1e-4, 1e-4)
    # Perimeter and solidity are approximations (crack length, 32-gon hull): close, not equal.
    perimeter = _props(labels, rgb, "perimeter") * MPP
    solidity = _props(labels, rgb, "solidity")
    assert np.median(np.abs(_column(desc, "perimeter_um") / perimeter - 1)) < 0.1
    assert np.median(np.abs(_column(desc, "solidity") / solidity - 1)) < 0.06
    np.testing.assert_allclose(cols("lbp_{}", "0123456789").sum(1), 1.0, atol=1e-5)


def test_tiny_and_background_regions_give_finite_descriptors():
    rgb = np.zeros((6, 6, 3), np.uint8)  # black: zero std, zero gradient, OD at its maximum
    labels = np.full((6, 6), -1)
    labels[0, 0] = 0  # one pixel
    labels[2:5, 2] = 1  # a line: eccentricity 1
    desc, _ = node_descriptors(rgb, labels, 2, array_mpp=1.0, reference_yx=(0.0, 0.0))
    assert np.isfinite(desc).all()
    ecc = _column(desc, "eccentricity")
    assert ecc[0] == 0 and abs(ecc[1] - 1) < 1e-6
    assert (_column(desc, "solidity") <= 1).all() and (_column(desc, "solidity") > 0).all()


def test_lbp_codes_on_flat_and_step_images():
    flat = np.full((5, 6), 80, np.uint8)
    assert (lbp_uniform(flat) == 8).all()  # every neighbour >= centre
    step = np.zeros((5, 8), np.uint8)
    step[:, 4:] = 200
    codes = lbp_uniform(step)
    # Dark side of the edge: all neighbours >= centre. Bright side: the three dark
    # neighbours are not, leaving five contiguous set bits, uniform code 5.
    assert (codes[:, :4] == 8).all() and (codes[:, 5:] == 8).all()
    assert (codes[:, 4] == 5).all()
    spot = np.zeros((3, 3), np.uint8)
    spot[1, 1] = 255
    assert lbp_uniform(spot)[1, 1] == 0


def test_window_is_centred_on_the_entity_and_edge_padded():
    rgb = np.zeros((64, 80, 3), np.uint8)
    rgb[40, 57] = (255, 128, 7)
    win = windows(rgb, np.array([[40.2, 56.7], [2.0, 3.0]]), 16)
    assert win.shape == (2, 3, 16, 16) and win.dtype == np.uint8
    assert np.unravel_index(win[0, 0].argmax(), (16, 16)) == (8, 8)
    assert tuple(win[0, :, 8, 8]) == (255, 128, 7)
    ramp = np.broadcast_to(np.arange(80, dtype=np.uint8)[None, :, None], (64, 80, 3))
    corner = windows(ramp, np.array([[0.0, 0.0]]), 8)[0, 0]
    assert (corner[:, :4] == 0).all() and list(corner[0, 4:]) == [0, 1, 2, 3]

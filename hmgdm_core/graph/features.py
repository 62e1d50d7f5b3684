"""Per-entity descriptors and instance windows, vectorised over all superpixels at once.

Every statistic is an `np.bincount` (histogram or weighted sum) keyed by the label image, or a
torch scatter: no loop per superpixel or pixel.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.color.colorconv import hed_from_rgb

_LBP_BINS = 10  # uniform 8-neighbour LBP: 0..8 set bits for uniform codes, 9 = non-uniform
_HULL_DIRECTIONS = 32
_SQRT_EPS = 1e-12

NODE_NAMES: list[str] = [
    *(f"{c}_mean" for c in "rgb"),
    *(f"{c}_std" for c in "rgb"),
    *(f"od_{c}_mean" for c in ("h", "e", "d")),  # stain (colour-deconvolved) optical density
    *(f"od_{c}_std" for c in "rgb"),  # per-channel optical density spread
    *(f"lbp_{i}" for i in range(_LBP_BINS)),
    "gradient_mean",
    "area_um2",
    "perimeter_um",
    "eccentricity",
    "solidity",
    "dx_um",
    "dy_um",
]


def _od_lut() -> np.ndarray:
    """(256,) optical density per 8-bit level, exactly as `skimage.color.rgb2hed` computes it."""
    v = np.maximum(np.arange(256) / 255.0, 1e-6)
    return np.log(v) / np.log(1e-6)


_OD = _od_lut()


def _uniform_lut() -> np.ndarray:
    """(256,) rotation-invariant uniform LBP code: popcount if <= 2 bit transitions, else 9."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1  # (256, 8)
    transitions = (bits != np.roll(bits, 1, axis=1)).sum(1)
    return np.where(transitions <= 2, bits.sum(1), _LBP_BINS - 1).astype(np.uint8)


_UNIFORM = _uniform_lut()
_LEVEL_TABLE = torch.from_numpy(
    np.stack([np.arange(256.0), np.arange(256.0) ** 2, _OD, _OD**2], 1)
)  # (256, 4) float64


def lbp_uniform(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W) uint8 uniform LBP codes 0..9 on the square 8-neighbourhood.

    Bit i is set when neighbour i >= the centre (scikit-image's convention); borders replicate
    the edge pixel. scikit-image interpolates the diagonal neighbours on a circle instead.
    """
    g = np.pad(gray, 1, mode="edge")
    h, w = gray.shape
    centre = g[1:-1, 1:-1]
    code = np.zeros((h, w), np.uint8)
    offsets = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))
    for bit, (dy, dx) in enumerate(offsets):
        code |= (g[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] >= centre).astype(np.uint8) << bit
    return _UNIFORM[code]


def _level_moments(channel: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """Per-label sums (n, 4) of v, v², OD(v), OD(v)² for uint8 values `channel` (M,).

    One integer bincount gives each label's exact 256-level histogram; the sums of any
    per-level transform are then a single small matmul (n, 256) @ (256, 4), done in torch
    because numpy's threaded BLAS is slower than the arithmetic on small shared machines.
    """
    hist = np.bincount(idx * 256 + channel, minlength=n * 256).reshape(n, 256)
    return (torch.from_numpy(hist.astype(np.float64)) @ _LEVEL_TABLE).numpy()


def _boundary_mask(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour of another label or on the array border."""
    edge = np.ones(labels.shape, bool)
    inner = edge[1:-1, 1:-1]
    c = labels[1:-1, 1:-1]
    inner[:] = (
        (c != labels[:-2, 1:-1])
        | (c != labels[2:, 1:-1])
        | (c != labels[1:-1, :-2])
        | (c != labels[1:-1, 2:])
    )
    return edge


def _crack_length(labels: np.ndarray, n: int) -> np.ndarray:
    """(n,) pixel edges separating each label from another label or from the array border."""
    out = np.zeros(n)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        for side in (a[diff], b[diff]):
            out += np.bincount(side[side >= 0], minlength=n)
    for border in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        out += np.bincount(border[border >= 0], minlength=n)
    return out


def _hull_pixels(ys: np.ndarray, xs: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """(n,) approximate pixel count of each label's convex hull (regionprops' `area_convex`).

    The hull of the boundary pixel centres is approximated by the 32-gon of its support lines:
    support values h_k = max of u_k . (x, y) per label (one torch scatter-max); adjacent
    support lines meet at the polygon's vertices. Pick's theorem turns the polygon's area A
    and perimeter P into a pixel count, A + P/2 + 1.
    """
    theta = torch.arange(_HULL_DIRECTIONS, dtype=torch.float64) * (2 * np.pi / _HULL_DIRECTIONS)
    u = torch.stack([theta.cos(), theta.sin()]).float()  # (2, K) rows: x, y
    pts = torch.from_numpy(np.stack([xs, ys], 1).astype(np.float32))  # (M, 2)
    proj = pts @ u  # (M, K)
    index = torch.from_numpy(idx)[:, None].expand(-1, _HULL_DIRECTIONS)
    support = (
        torch.zeros(n, _HULL_DIRECTIONS)
        .scatter_reduce_(0, index, proj, "amax", include_self=False)
        .double()
        .numpy()
    )
    cos, sin = np.cos(theta.numpy()), np.sin(theta.numpy())
    h1 = np.roll(support, -1, axis=1)
    denom = np.sin(2 * np.pi / _HULL_DIRECTIONS)
    vx = (support * np.roll(sin, -1) - h1 * sin) / denom  # (n, K) vertex of lines k, k+1
    vy = (h1 * cos - support * np.roll(cos, -1)) / denom
    nx, ny = np.roll(vx, -1, axis=1), np.roll(vy, -1, axis=1)
    area = 0.5 * np.abs((vx * ny - nx * vy).sum(1))
    perimeter = np.hypot(nx - vx, ny - vy).sum(1)
    return area + perimeter / 2 + 1


def _colour(rgb: np.ndarray, pick, idx: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(n, 12): RGB mean and std, stain (H, E, D) optical-density means, per-channel OD std.

    One integer bincount per channel gives exact per-label histograms; every statistic is a
    per-level transform of them. Stain means are linear in the mean OD (colour deconvolution,
    before rgb2hed's clip at 0).
    """
    n = count.size
    sums = np.stack([_level_moments(pick(rgb[..., c]), idx, n) for c in range(3)], 1)
    sums /= count[:, None, None]  # (n, 3 channels, 4 moments)
    rgb_mean, od_mean = sums[:, :, 0], sums[:, :, 2]
    rgb_std = np.sqrt(np.maximum(sums[:, :, 1] - rgb_mean**2, 0))
    od_std = np.sqrt(np.maximum(sums[:, :, 3] - od_mean**2, 0))
    stain_mean = np.einsum("nc,cs->ns", od_mean, hed_from_rgb)  # (n, 3) H, E, D
    return np.concatenate([rgb_mean, rgb_std, stain_mean, od_std], 1)


def _texture(rgb: np.ndarray, pick, idx: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(n, 11): normalised uniform-LBP histogram and mean gradient magnitude of the grey image."""
    n = count.size
    weights = np.array([0.2125, 0.7154, 0.0721], np.float32)  # skimage.color.rgb2gray
    gray = rgb[..., 0] * weights[0] + rgb[..., 1] * weights[1] + rgb[..., 2] * weights[2]
    gray = np.rint(gray).astype(np.uint8)
    codes = pick(lbp_uniform(gray))
    lbp = np.bincount(idx * _LBP_BINS + codes, minlength=n * _LBP_BINS).reshape(n, _LBP_BINS)
    g = gray.astype(np.float32)
    grad = np.zeros_like(g)
    grad[:, :-1] += np.abs(np.diff(g, axis=1))
    grad[:-1, :] += np.abs(np.diff(g, axis=0))
    gradient = np.bincount(idx, pick(grad), n) / count
    return np.concatenate([lbp / count[:, None], gradient[:, None]], 1)


def _eccentricity(yy, xx, idx, count, cy, cx) -> np.ndarray:
    """(n,) from the central second moments, as regionprops' eccentricity."""
    n = count.size
    myy = np.bincount(idx, yy * yy, n) / count - cy**2
    mxx = np.bincount(idx, xx * xx, n) / count - cx**2
    mxy = np.bincount(idx, yy * xx, n) / count - cy * cx
    half_trace, root = (myy + mxx) / 2, np.sqrt(((myy - mxx) / 2) ** 2 + mxy**2)
    l1, l2 = half_trace + root, np.maximum(half_trace - root, 0)
    return np.sqrt(np.clip(1 - l2 / np.maximum(l1, _SQRT_EPS), 0, 1)) * (l1 > _SQRT_EPS)


def node_descriptors(
    rgb: np.ndarray,
    labels: np.ndarray,
    n: int,
    *,
    array_mpp: float,
    reference_yx: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors (n, len(NODE_NAMES)) float32 and centroids (n, 2) (y, x) px of labels 0..n-1.

    `labels` (H, W) int, -1 = not an entity. Position columns are the centroid minus
    `reference_yx` (px), in µm. Every label 0..n-1 must own at least one pixel.
    """
    h, w = labels.shape
    flat = labels.reshape(-1)
    valid = flat >= 0
    everywhere = bool(valid.all())

    def pick(a: np.ndarray) -> np.ndarray:
        """The entity pixels of a per-pixel (H, W) array, flattened like `idx`."""
        return a.reshape(-1) if everywhere else a.reshape(-1)[valid]

    idx = pick(labels).astype(np.int64)  # (M,)
    count = np.bincount(idx, minlength=n).astype(np.float64)  # (n,)
    pixel = np.arange(h * w) if everywhere else np.flatnonzero(valid)
    yy = (pixel // w).astype(np.float64)  # (M,)
    xx = pixel - yy * w
    cy = np.bincount(idx, yy, n) / count
    cx = np.bincount(idx, xx, n) / count

    edge = pick(_boundary_mask(labels))
    solidity = np.clip(count / _hull_pixels(yy[edge], xx[edge], idx[edge], n), 0, 1)
    # Crack length overestimates a curved border; π/4 is exact on average over orientations.
    perimeter = _crack_length(labels, n) * (np.pi / 4) * array_mpp
    eccentricity = _eccentricity(yy, xx, idx, count, cy, cx)

    shape = np.stack([count * array_mpp**2, perimeter, eccentricity, solidity], 1)
    position = np.stack([(cx - reference_yx[1]) * array_mpp, (cy - reference_yx[0]) * array_mpp], 1)
    desc = np.concatenate(
        [_colour(rgb, pick, idx, count), _texture(rgb, pick, idx, count), shape, position], 1
    )
    return desc.astype(np.float32), np.stack([cy, cx], 1)


def windows(rgb: np.ndarray, centres_yx: np.ndarray, size: int) -> np.ndarray:
    """(N, 3, size, size) uint8 crops of `rgb` centred on `centres_yx` (N, 2) px.

    The centre pixel lands at index size // 2; crops past the border repeat the edge pixel.
    One fancy index into a strided window view copies exactly the N crops.
    """
    pad = size
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    view = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(0, 1))
    corner = np.rint(centres_yx).astype(np.int64) - size // 2 + pad  # (N, 2) in `padded`
    h, w = rgb.shape[:2]
    corner[:, 0] = corner[:, 0].clip(0, h + pad)
    corner[:, 1] = corner[:, 1].clip(0, w + pad)
    return view[corner[:, 0], corner[:, 1]]  # (N, 3, size, size)

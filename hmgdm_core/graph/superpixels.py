"""SLIC superpixels sized in µm², as batched torch tensor ops; connectivity enforcement.

Also owns the superpixel quality metrics used to compare against scikit-image's SLIC.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components

# sRGB -> XYZ (D65), rows already divided by the reference white so Lab needs no further scaling.
_RGB_TO_XYZN = torch.tensor(
    [
        [0.412453 / 0.95047, 0.357580 / 0.95047, 0.180423 / 0.95047],
        [0.212671, 0.715160, 0.072169],
        [0.019334 / 1.08883, 0.119193 / 1.08883, 0.950227 / 1.08883],
    ],
    dtype=torch.float32,
)
# Pixels per assignment chunk: bounds the (pixels, candidates) distance buffer to <= 72 MB.
_CHUNK_PIXELS = 1 << 21
# Merging passes on the component graph; each pass resolves one link of a fragment chain.
_MAX_MERGE_PASSES = 32


def grid_step(mpp: float, entity_area_um2: float) -> int:
    """Side in pixels of the square seeding grid that gives entities of `entity_area_um2`."""
    return max(2, round(float(np.sqrt(entity_area_um2)) / mpp))


def rgb_to_lab(rgb: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (H, W, 3) float32 CIE Lab, after scikit-image's min/max rescale.

    Like skimage's SLIC, the rescale uses only the pixels where `mask` is True.
    """
    values = rgb if mask is None else rgb[mask]
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 255)
    levels = np.clip((np.arange(256, dtype=np.float32) - lo) / max(hi - lo, 1), 0, 1)
    # Gamma expansion is a per-level lookup: 256 evaluations instead of one per pixel.
    linear = np.where(levels > 0.04045, ((levels + 0.055) / 1.055) ** 2.4, levels / 12.92)
    # torch matmul: numpy's threaded BLAS is slow for (pixels, 3) @ (3, 3) on shared machines.
    xyz = (torch.from_numpy(np.maximum(linear, 0)[rgb]) @ _RGB_TO_XYZN.T).numpy()  # (H, W, 3)
    f = np.cbrt(xyz)
    dark = xyz <= 0.008856  # the linear toe of Lab; rare in tissue, so indexed not computed fully
    if dark.any():
        f[dark] = 7.787 * xyz[dark] + 16 / 116
    lab = xyz  # reuse the buffer
    np.multiply(f[..., 1], 116, out=lab[..., 0])
    lab[..., 0] -= 16
    np.subtract(f[..., 0], f[..., 1], out=lab[..., 1])
    lab[..., 1] *= 500
    np.subtract(f[..., 1], f[..., 2], out=lab[..., 2])
    lab[..., 2] *= 200
    return torch.from_numpy(lab)


def _layout(step: int) -> tuple[int, int]:
    """(q, side): each seeding cell is split into q x q pixel groups of side x side pixels.

    With an even step every cell splits into 2x2 quadrants, and a quadrant's pixels only need
    the 4 seeds on its side (own cell and the 3 towards that corner) instead of all 9 around.
    """
    return (2, step // 2) if step % 2 == 0 and step >= 4 else (1, step)


def _to_groups(t: torch.Tensor, ny: int, nx: int, q: int, side: int) -> torch.Tensor:
    """(Hp, Wp, C) image order -> (ny*nx*q*q, side*side, C) group order."""
    c = t.shape[-1]
    t = t.reshape(ny, q, side, nx, q, side, c).permute(0, 3, 1, 4, 2, 5, 6)
    return t.reshape(-1, side * side, c)


def _from_groups(t: torch.Tensor, ny: int, nx: int, q: int, side: int) -> torch.Tensor:
    """(groups, side*side) -> (Hp, Wp), inverse of `_to_groups`."""
    t = t.reshape(ny, nx, q, q, side, side).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(ny * q * side, nx * q * side)


def _candidates(ny: int, nx: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed cells each pixel group compares with (groups, C) and which exist (groups, C):
    the 3x3 around its cell (q = 1, C = 9), or the 2x2 towards its quadrant (q = 2, C = 4)."""
    d = torch.tensor([[-1, 0, 1]]) if q == 1 else torch.tensor([[-1, 0], [0, 1]])  # (q, k)
    k = d.shape[1]
    cy = torch.arange(ny).view(ny, 1, 1, 1, 1, 1) + d.view(1, 1, q, 1, k, 1)
    cx = torch.arange(nx).view(1, nx, 1, 1, 1, 1) + d.view(1, 1, 1, q, 1, k)
    valid = (cy >= 0) & (cy < ny) & (cx >= 0) & (cx < nx)  # (ny, nx, q, q, k, k)
    ids = cy.clamp(0, ny - 1) * nx + cx.clamp(0, nx - 1)
    return ids.reshape(-1, k * k), valid.reshape(-1, k * k)


def _assign(
    feats: torch.Tensor, centres: torch.Tensor, usable: torch.Tensor, cand_ids: torch.Tensor
) -> torch.Tensor:
    """Nearest candidate centre per pixel: feats (G, P, 5) -> seed-cell ids (G, P)."""
    groups, p, _ = feats.shape
    cand = centres[cand_ids]  # (G, C, 5)
    # |f - c|² = |f|² - 2 f·c + |c|²; |f|² is the same for every candidate so it is dropped.
    sq = (cand * cand).sum(-1).masked_fill(~usable, float("inf"))  # (G, C)
    labels = torch.empty(groups, p, dtype=torch.long)
    per_chunk = max(1, _CHUNK_PIXELS // p)
    for s in range(0, groups, per_chunk):
        e = min(s + per_chunk, groups)
        score = torch.baddbmm(sq[s:e, None, :], feats[s:e], cand[s:e].transpose(1, 2), alpha=-2)
        labels[s:e] = cand_ids[s:e].gather(1, score.argmin(-1))
    return labels


def _kmeans(
    feats: torch.Tensor,
    tissue: torch.Tensor,
    cell: torch.Tensor,
    candidates: tuple[torch.Tensor, torch.Tensor],
    n_cells: int,
    n_iter: int,
) -> torch.Tensor:
    """Local k-means: each pixel only compares with the centres seeded in nearby cells.

    feats (G, P, 5) group-ordered Lab + scaled xy; tissue (G, P) bool; cell (G,) the seeding
    cell of each group. The iterations fit the centres on every other row and column of each
    group (4x less work; a centre is still a mean of ~step²/4 pixels), then one pass assigns
    every pixel. Returns seed-cell ids (G, P), -1 outside tissue.
    """
    _, p, c = feats.shape
    side = round(p**0.5)
    stride = 2 if side >= 4 else 1
    sub = torch.arange(p).reshape(side, side)[::stride, ::stride].reshape(-1)
    sub_feats, sub_tissue = feats[:, sub].contiguous(), tissue[:, sub]  # (G, P', 5), (G, P')
    weight = sub_tissue.reshape(-1, 1).to(feats.dtype)
    counts = torch.zeros(n_cells).index_add_(0, cell, tissue.sum(1).to(feats.dtype))
    sums = torch.zeros(n_cells, c).index_add_(0, cell, (feats * tissue[..., None]).sum(1))
    centres = sums / counts.clamp_min(1)[:, None]  # (cells, 5) tissue centroid of each cell
    alive = counts > 0
    ids, exists = candidates
    for _ in range(n_iter):
        lab = _assign(sub_feats, centres, exists & alive[ids], ids).reshape(-1)
        counts = torch.zeros(n_cells, 1).index_add_(0, lab, weight)
        sums = torch.zeros(n_cells, c).index_add_(0, lab, sub_feats.reshape(-1, c) * weight)
        # A centre that lost all its pixels keeps its last position and may win some back.
        alive = counts[:, 0] > 0
        centres = torch.where(alive[:, None], sums / counts.clamp_min(1), centres)
    return _assign(feats, centres, exists & alive[ids], ids).masked_fill(~tissue, -1)


def enforce_connectivity(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Make every label one 4-connected component, merging the others into a neighbour.

    A label keeps its largest component if it has at least `min_size` pixels; every other
    component (a stray fragment, or too small) joins the neighbour it shares the longest
    border with. The merging runs on the component adjacency graph (a few vectorised passes)
    and touches the image once at the end. -1 (background) is kept.
    Returns consecutive labels 0..K-1 and -1.
    """
    comp = label_components(labels + 1, background=0, connectivity=1).astype(np.int32) - 1
    n = int(comp.max()) + 1
    if n <= 1:
        return comp
    everywhere = bool((labels >= 0).all())
    inside = slice(None) if everywhere else comp >= 0
    sizes = np.bincount(comp[inside].reshape(-1), minlength=n).astype(np.int64)
    source = np.zeros(n, np.int64)
    source[comp[inside]] = labels[inside]  # the SLIC label each component came from
    order = np.lexsort((sizes, source))
    largest = order[np.r_[source[order][1:] != source[order][:-1], True]]
    stray = np.ones(n, bool)
    stray[largest] = False
    # Merging only ever shrinks the set of merging ids, so borders between two staying
    # components never matter: drop them before the (sorting) pair aggregation.
    a, b = adjacent_pairs(comp)
    merge = ((sizes < min_size) | stray) & (sizes > 0)
    involved = merge[a] | merge[b]
    u, v, border = _pair_borders(a[involved], b[involved], n)
    final = np.arange(n)
    for _ in range(_MAX_MERGE_PASSES):
        merge = ((sizes < min_size) | stray) & (sizes > 0)
        src = np.concatenate([u, v])
        pick = merge[src]
        if not pick.any():
            break
        src = src[pick]
        dst = np.concatenate([v, u])[pick]
        bb = np.concatenate([border, border])[pick]
        # Per merging component: a neighbour that stays if there is one, then the longest
        # border, then the larger id; sort by those keys and take each src's last row. With
        # that strict order the only cycles are mutual pairs, which merge into the smaller id.
        order = np.lexsort((dst, bb, ~merge[dst], src))
        last = np.r_[src[order][1:] != src[order][:-1], True]
        target = np.arange(n)
        target[src[order][last]] = dst[order][last]
        ids = np.arange(n)
        mutual = target[target] == ids
        target[mutual] = np.minimum(ids, target)[mutual]
        # Follow chains (a -> b -> c) to their root so every merged piece joins a neighbour
        # that keeps its id this pass (pointer jumping: log2(chain length) steps).
        while (target[target] != target).any():
            target = target[target]
        final = target[final]
        sizes = np.bincount(target, weights=sizes, minlength=n).astype(np.int64)
        u, v, border = _pair_borders(target[u], target[v], n, border)
    _, compact = np.unique(final, return_inverse=True)
    lut = np.append(compact.reshape(-1).astype(np.int32), -1)  # index -1 -> background
    return lut[comp]


def _pair_borders(
    a: np.ndarray, b: np.ndarray, n: int, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected pairs (u < v) with their summed border weight (default: 1 per pixel edge)."""
    keep = a != b
    a, b = a[keep].astype(np.int64), b[keep].astype(np.int64)
    w = np.ones(a.size, np.int64) if weight is None else weight[keep]
    key, inverse = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_inverse=True)
    return key // n, key % n, np.bincount(inverse.reshape(-1), weights=w).astype(np.int64)


def adjacent_pairs(labels: np.ndarray, *, positions: bool = False) -> tuple[np.ndarray, ...]:
    """Label pairs (a, b) across every horizontal/vertical pixel edge where a != b, both >= 0.

    With `positions`, also the (y, x) of each pixel edge's midpoint (half-pixel coordinates).
    """
    out: list[list[np.ndarray]] = [[], [], [], []]
    for dy, dx in ((0, 1), (1, 0)):
        h, w = labels.shape[0] - dy, labels.shape[1] - dx
        a, b = labels[:h, :w], labels[dy:, dx:]
        keep = a != b
        if positions:
            r, c = np.nonzero(keep)
            a, b = a[r, c], b[r, c]
        else:
            a, b = a[keep], b[keep]
        both = (a >= 0) & (b >= 0)
        out[0].append(a[both])
        out[1].append(b[both])
        if positions:
            out[2].append(r[both] + dy / 2)
            out[3].append(c[both] + dx / 2)
    return tuple(np.concatenate(o) for o in out[: 4 if positions else 2])


def slic(
    rgb: np.ndarray,
    *,
    step: int,
    compactness: float = 10.0,
    mask: np.ndarray | None = None,
    n_iter: int = 4,
) -> np.ndarray:
    """SLIC superpixels: (H, W, 3) uint8 -> (H, W) int32 labels 0..K-1, -1 where `mask` is False.

    `step` is the seeding-grid side in pixels (see `grid_step`); distances follow
    scikit-image's SLIC (Lab colour / compactness, space / step) so the same compactness means
    the same shapes. Seeds are the tissue centroids of grid cells; each pixel considers only
    the seeds of nearby cells (see `_layout`), so one iteration is a batched matmul.
    """
    h, w = rgb.shape[:2]
    ny, nx = -(-h // step), -(-w // step)
    hp, wp = ny * step, nx * step
    tissue = np.ones((h, w), bool) if mask is None else np.asarray(mask, bool)
    if (hp, wp) != (h, w):
        # Padding pixels are outside the tissue, so they only complete the block grid.
        rgb = np.pad(rgb, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
        tissue = np.pad(tissue, ((0, hp - h), (0, wp - w)))
    lab = rgb_to_lab(rgb, None if mask is None else tissue)  # (Hp, Wp, 3)
    q, side = _layout(step)
    feats = torch.empty(ny, nx, q, q, side, side, 5)
    grid = feats.permute(0, 2, 4, 1, 3, 5, 6)  # (ny, q, side, nx, q, side, 5) image-order view
    grid[..., :3] = lab.reshape(ny, q, side, nx, q, side, 3)
    # Scale so plain Euclidean distance equals skimage's colour²/m² + space²/S² (times m²).
    scale = compactness / step
    grid[..., 3] = (torch.arange(hp, dtype=torch.float32) * scale).reshape(ny, q, side, 1, 1, 1)
    grid[..., 4] = (torch.arange(wp, dtype=torch.float32) * scale).reshape(1, 1, 1, nx, q, side)
    tissue_g = _to_groups(torch.from_numpy(tissue)[..., None], ny, nx, q, side)[..., 0]
    cell = torch.arange(ny * nx).repeat_interleave(q * q)  # (G,) groups are cell-major
    labels = _kmeans(
        feats.reshape(-1, side * side, 5), tissue_g, cell, _candidates(ny, nx, q), ny * nx, n_iter
    )
    labels = _from_groups(labels, ny, nx, q, side)[:h, :w].numpy()
    n_seeds = max(
        int(torch.zeros(ny * nx).index_add_(0, cell, tissue_g.sum(1).float()).gt(0).sum()), 1
    )
    return enforce_connectivity(labels, min_size=int(0.5 * tissue.sum() / n_seeds))


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has a different label."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def boundary_recall(labels: np.ndarray, reference: np.ndarray, tolerance: int = 2) -> float:
    """Share of `reference` boundary pixels within `tolerance` px of a `labels` boundary."""
    ref = boundaries(reference)
    if not ref.any():
        return 1.0
    near = boundaries(labels)
    if tolerance:
        near = ndimage.binary_dilation(near, iterations=tolerance)  # city-block distance
    return float(near[ref].mean())


def undersegmentation_error(labels: np.ndarray, reference: np.ndarray) -> float:
    """Corrected undersegmentation error of `labels` against `reference` segments (lower is better).

    Per (superpixel, reference segment) overlap, the smaller of the overlap and the leak outside
    the reference segment, summed over pairs and divided by the pixel count (Neubert & Protzel).
    """
    _, sp = np.unique(labels, return_inverse=True)
    _, ref = np.unique(reference, return_inverse=True)
    sp, ref = sp.ravel(), ref.ravel()
    n_ref = int(ref.max()) + 1
    overlap = np.bincount(sp * n_ref + ref)
    nz = np.flatnonzero(overlap)
    inter = overlap[nz]
    sp_size = np.bincount(sp)[nz // n_ref]
    return float(np.minimum(inter, sp_size - inter).sum() / sp.size)


def stain_segments(rgb: np.ndarray) -> np.ndarray:
    """Reference segmentation for the quality metrics: 4-connected regions of the
    hematoxylin-optical-density image split at its Otsu threshold (nuclei vs the rest).

    Real tiles have no ground-truth superpixels; this one follows real tissue structure, so
    two superpixel methods can be compared on how well they respect it.
    """
    h = rgb2hed(rgb)[..., 0]
    return label_components(h > threshold_otsu(h), background=-1, connectivity=1)

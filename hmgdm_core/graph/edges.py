"""Entity-graph edges: region adjacency plus optional k-nearest centroids, their descriptors, cap.

Pairs are handled undirected (u < v) and expanded to both directions only at the end.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from hmgdm_core.graph.features import NODE_NAMES
from hmgdm_core.graph.superpixels import adjacent_pairs

EDGE_NAMES: list[str] = [
    "boundary_um",
    "distance_um",
    "colour_diff",
    "od_h_diff",
    "od_e_diff",
    "od_d_diff",
    "texture_diff",
    "log_area_ratio",
]

_RGB = [NODE_NAMES.index(f"{c}_mean") for c in "rgb"]
_OD = [NODE_NAMES.index(f"od_{c}_mean") for c in "hed"]
_LBP = [i for i, name in enumerate(NODE_NAMES) if name.startswith("lbp_")]
_AREA = NODE_NAMES.index("area_um2")


def region_adjacency(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Touching labels as sorted unique pairs (E, 2) with u < v, shared border in pixel edges
    (E,), and the mean (y, x) of the shared border's pixel edges (E, 2)."""
    a, b, ry, rx = adjacent_pairs(labels, positions=True)
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    key, inverse, border = np.unique(lo * n + hi, return_inverse=True, return_counts=True)
    mid = np.stack([np.bincount(inverse, ry), np.bincount(inverse, rx)], 1) / border[:, None]
    return np.stack([key // n, key % n], 1), border, mid


def knn_pairs(centroids: np.ndarray, k: int) -> np.ndarray:
    """Each point's `k` nearest other points as sorted unique undirected pairs (E, 2), u < v."""
    n = len(centroids)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((0, 2), np.int64)
    _, nb = cKDTree(centroids).query(centroids, k=k + 1)  # column 0 is the point itself
    u = np.repeat(np.arange(n), k)
    v = nb[:, 1:].ravel()
    pairs = np.unique(np.stack([np.minimum(u, v), np.maximum(u, v)], 1), axis=0)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def edge_descriptors(
    pairs: np.ndarray,
    border_px: np.ndarray,
    desc: np.ndarray,
    centroids: np.ndarray,
    array_mpp: float,
) -> np.ndarray:
    """(E, len(EDGE_NAMES)) float32 for undirected `pairs` (E, 2); symmetric in u and v."""
    du, dv = desc[pairs[:, 0]], desc[pairs[:, 1]]
    dist = np.linalg.norm(centroids[pairs[:, 0]] - centroids[pairs[:, 1]], axis=1) * array_mpp
    colour = np.linalg.norm(du[:, _RGB] - dv[:, _RGB], axis=1) / 255
    od = np.abs(du[:, _OD] - dv[:, _OD])
    texture = 0.5 * np.abs(du[:, _LBP] - dv[:, _LBP]).sum(1)
    area_ratio = np.abs(np.log(np.maximum(du[:, _AREA], 1e-6) / np.maximum(dv[:, _AREA], 1e-6)))
    cols = [border_px * array_mpp, dist, colour, *od.T, texture, area_ratio]
    return np.stack(cols, 1).astype(np.float32)


def cap_edges(pairs: np.ndarray, priority: np.ndarray, n: int, max_edges: int) -> np.ndarray:
    """Indices of at most `max_edges` pairs, highest `priority` first, sorted ascending.

    Each node's best edge is kept before any second edge, so capping never isolates a node
    while the budget allows one edge per node.
    """
    if len(pairs) <= max_edges:
        return np.arange(len(pairs))
    order = np.argsort(-priority, kind="stable")
    rank = np.empty(len(pairs), np.int64)
    rank[order] = np.arange(len(pairs))
    best = np.full(n, len(pairs))
    np.minimum.at(best, pairs[:, 0], rank)
    np.minimum.at(best, pairs[:, 1], rank)
    first = np.zeros(len(pairs), bool)
    first[order[best[best < len(pairs)]]] = True  # best holds ranks; order maps to edges
    # Essential edges come first (in rank order), then the rest by rank.
    chosen = np.lexsort((rank, ~first))[:max_edges]
    return np.sort(chosen)


def to_directed(pairs: np.ndarray, attr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected (E, 2) -> edge_index (2, 2E) sorted by (source, target), attributes (2E, D),
    and for each directed edge the index of its undirected pair (2E,)."""
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    which = np.concatenate([np.arange(len(pairs))] * 2)
    order = np.lexsort((dst, src))
    return np.stack([src[order], dst[order]]), attr[which[order]], which[order]

"""One region (a slide tile with its context margin, or a whole plain image) -> one entity graph.

Superpixels -> node descriptors and windows -> edges, assembled into the PyG `Data` contract
documented in `hmgdm_core.graph`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import Data

from hmgdm_core.config import GraphConfig
from hmgdm_core.exceptions import MissingDependencyError
from hmgdm_core.graph.edges import (
    EDGE_NAMES,
    cap_edges,
    edge_descriptors,
    knn_pairs,
    region_adjacency,
    to_directed,
)
from hmgdm_core.graph.features import NODE_NAMES, node_descriptors, windows
from hmgdm_core.graph.superpixels import grid_step, slic
from hmgdm_core.stain import SlideStains, estimate, normalize


def x_names(cfg: GraphConfig) -> list[str]:
    """Column names of `Data.x` for graphs built with `cfg`."""
    return list(NODE_NAMES)


def edge_attr_names(cfg: GraphConfig) -> list[str]:
    """Column names of `Data.edge_attr` for graphs built with `cfg`."""
    return list(EDGE_NAMES)


def _check_inputs(
    rgb: np.ndarray, mask: np.ndarray | None, core: tuple[int, int, int, int] | None
) -> tuple[int, int, int, int]:
    """Validate shapes (caller contract, not user input) and return the core box."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if mask is not None and mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {rgb.shape[:2]}")
    h, w = rgb.shape[:2]
    y0, x0, y1, x1 = core if core is not None else (0, 0, h, w)
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"core {core} is not a box inside the {h}x{w} image")
    return y0, x0, y1, x1


def _select_entities(
    centroids: np.ndarray, box: tuple[int, int, int, int], max_entities: int
) -> np.ndarray:
    """Ids of the entities whose centroid lies in `box`, capped to the `max_entities` nearest
    the box centre (a compact disc of tissue rather than a scattered subset)."""
    y0, x0, y1, x1 = box
    cy, cx = centroids[:, 0], centroids[:, 1]
    inside = np.flatnonzero((cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1))
    if len(inside) > max_entities:
        d2 = (cy[inside] - (y0 + y1) / 2) ** 2 + (cx[inside] - (x0 + x1) / 2) ** 2
        inside = np.sort(inside[np.argsort(d2, kind="stable")[:max_entities]])
    return inside


def region_graph(
    rgb: np.ndarray,
    *,
    array_mpp: float,
    cfg: GraphConfig,
    mask: np.ndarray | None = None,
    core: tuple[int, int, int, int] | None = None,
    origin_um: tuple[float, float] = (0.0, 0.0),
    keep_labels: bool = False,
    stain: SlideStains | None = None,
) -> Data | None:
    """Entity graph of the tile `core` = (y0, x0, y1, x1) of `rgb` (None: the whole array).

    SLIC runs on all of `rgb` (the margin keeps border entities whole); entities whose
    centroid falls outside `core` belong to the neighbouring tile and are dropped, pixels where
    `mask` is False never join an entity. `origin_um` is the slide (x, y) in µm of rgb's pixel
    (0, 0). More than `cfg.max_entities` entities: the ones nearest the core centre are kept.
    Returns None when fewer than 2 entities remain. `keep_labels` adds `seg`, the (H, W)
    superpixel label image of `rgb` (entity index, -1 = none), for the cache to store beside
    the graph (entity outlines for QuPath export; never batched). With `cfg.stain_norm`,
    `rgb` is first mapped onto the reference with the slide's `stain` estimate (Macenko's basis
    or Reinhard's statistics; default: estimated on this region's tissue; ValueError when it
    has too little).
    """
    if cfg.cnn_weights is not None:
        raise MissingDependencyError("torchvision", "CNN entity features (graph.cnn_weights)")
    box = _check_inputs(rgb, mask, core)
    if cfg.stain_norm != "none":
        stain = stain or estimate(cfg.stain_norm, rgb if mask is None else rgb[mask])
        if stain is None:
            raise ValueError(f"too little stained tissue to estimate stains for {cfg.stain_norm}")
        rgb = normalize(rgb, stain)
    labels = slic(
        rgb, step=grid_step(array_mpp, cfg.entity_area_um2), compactness=cfg.compactness, mask=mask
    )
    n = int(labels.max()) + 1
    if n < 2:
        return None
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    desc, centroids = node_descriptors(rgb, labels, n, array_mpp=array_mpp, reference_yx=centre)
    kept = _select_entities(centroids, box, cfg.max_entities)
    if len(kept) < 2:
        return None
    relabel = np.full(n + 1, -1, np.int64)  # slot n maps background (-1) to -1
    relabel[kept] = np.arange(len(kept))
    labels = relabel[labels]
    desc, centroids = desc[kept], centroids[kept]
    k = len(kept)

    pairs, border, mid = region_adjacency(labels, k)
    if cfg.knn:
        extra = knn_pairs(centroids, cfg.knn)
        extra = extra[~np.isin(extra[:, 0] * k + extra[:, 1], pairs[:, 0] * k + pairs[:, 1])]
        pairs = np.concatenate([pairs, extra])
        border = np.concatenate([border, np.zeros(len(extra), border.dtype)])
        mid = np.concatenate([mid, (centroids[extra[:, 0]] + centroids[extra[:, 1]]) / 2])
    attr = edge_descriptors(pairs, border, desc, centroids, array_mpp)
    # Touching pairs rank by shared border; kNN-only pairs after them, nearest first.
    priority = np.where(border > 0, border, -attr[:, EDGE_NAMES.index("distance_um")])
    chosen = cap_edges(pairs, priority, k, cfg.max_edges)
    pairs, mid = pairs[chosen], mid[chosen]
    edge_index, edge_attr, which = to_directed(pairs, attr[chosen])

    pos = centroids[:, ::-1] * array_mpp + np.asarray(origin_um)  # (N, 2) x, y in slide µm
    data = Data(
        x=torch.from_numpy(desc),
        win=torch.from_numpy(windows(rgb, centroids, cfg.window_size)),
        edge_index=torch.from_numpy(edge_index.astype(np.int64)),
        edge_attr=torch.from_numpy(edge_attr),
        pos=torch.from_numpy(pos.astype(np.float32)),
        tile_origin=torch.tensor([origin_um], dtype=torch.float32),  # rgb's (0, 0), margin included
        num_nodes=k,
    )
    if keep_labels:
        data.seg = torch.from_numpy(labels.astype(np.int16 if k < 2**15 else np.int32))
    if cfg.edge_windows:
        # One window per undirected pair, shared by both directions.
        data.edge_win = torch.from_numpy(windows(rgb, mid, cfg.window_size)[which])
    return data

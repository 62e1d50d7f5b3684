"""Edges: region adjacency, k nearest centroids, descriptors, the edge cap, directed form."""

from __future__ import annotations

import numpy as np

from hmgdm_core.graph.edges import (
    EDGE_NAMES,
    cap_edges,
    edge_descriptors,
    knn_pairs,
    region_adjacency,
    to_directed,
)
from hmgdm_core.graph.features import NODE_NAMES


def _quadrants() -> np.ndarray:
    labels = np.zeros((8, 8), np.int64)
    labels[:, 4:] = 1
    labels[4:] += 2  # 0 1 / 2 3
    return labels


def test_adjacency_of_quadrants():
    labels = _quadrants()
    labels[0, 0] = -1  # background never makes an edge
    pairs, border, mid = region_adjacency(labels, 4)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]  # 0 and 3 touch only diagonally
    assert border.tolist() == [4, 4, 4, 4]
    np.testing.assert_allclose(mid[0], [1.5, 3.5])  # rows 0..3, between columns 3 and 4
    np.testing.assert_allclose(mid[1], [3.5, 1.5])


def test_knn_pairs_are_unique_undirected_and_not_self():
    pts = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 7.0]])
    assert knn_pairs(pts, 1).tolist() == [[0, 1], [1, 2], [2, 3]]
    assert len(knn_pairs(pts, 10)) == 6  # k is capped at n - 1: the complete graph
    assert knn_pairs(pts[:1], 3).shape == (0, 2)


def test_edge_descriptors_are_symmetric_and_finite():
    rng = np.random.default_rng(0)
    desc = rng.uniform(0, 50, (3, len(NODE_NAMES))).astype(np.float32)
    desc[2, NODE_NAMES.index("area_um2")] = 0  # a degenerate area must not give inf
    cents = rng.uniform(0, 10, (3, 2))
    pairs = np.array([[0, 1], [1, 2]])
    fwd = edge_descriptors(pairs, np.array([3, 0]), desc, cents, array_mpp=0.5)
    back = edge_descriptors(pairs[:, ::-1], np.array([3, 0]), desc, cents, array_mpp=0.5)
    assert fwd.shape == (2, len(EDGE_NAMES)) and np.isfinite(fwd).all()
    np.testing.assert_allclose(fwd, back, rtol=1e-6)
    assert fwd[0, EDGE_NAMES.index("boundary_um")] == 1.5
    dist = np.linalg.norm(cents[0] - cents[1]) * 0.5
    np.testing.assert_allclose(fwd[0, EDGE_NAMES.index("distance_um")], dist, rtol=1e-6)


def test_cap_keeps_every_nodes_best_edge_first():
    # A triangle 0-1-2 with strong edges, and node 3 hanging on by a weak edge.
    pairs = np.array([[0, 1], [0, 2], [1, 2], [2, 3]])
    priority = np.array([10.0, 9.0, 8.0, 1.0])
    assert cap_edges(pairs, priority, 4, 10).tolist() == [0, 1, 2, 3]
    kept = cap_edges(pairs, priority, 4, 3)
    assert kept.tolist() == [0, 1, 3]  # the weak edge survives: it is node 3's only one
    assert cap_edges(pairs, priority, 4, 1).tolist() == [0]


def test_directed_form_is_symmetric_sorted_and_carries_attributes():
    pairs = np.array([[0, 2], [1, 2]])
    attr = np.array([[1.0], [2.0]], np.float32)
    ei, ea, which = to_directed(pairs, attr)
    assert ei.tolist() == [[0, 1, 2, 2], [2, 2, 0, 1]]
    assert ea[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert which.tolist() == [0, 1, 0, 1]

"""The synthetic arrangement cohort: same cell counts in every image, one entity per cell, so
only the graph can tell the classes apart."""

from __future__ import annotations

import numpy as np
import pytest

from hmgdm_core.graph.features import NODE_NAMES
from hmgdm_core.graph.region import region_graph
from hmgdm_core.studies.synthetic import (
    CELL_PX,
    CELLS,
    CLASSES,
    GRAPHS,
    TYPE_SHARES,
    cell_types,
    synthetic_image,
)

SHAPE = [NODE_NAMES.index(n) for n in ("area_um2", "perimeter_um", "eccentricity", "solidity")]


@pytest.mark.parametrize("disorder", [0.0, 0.5])
def test_every_image_has_the_same_cell_counts(disorder):
    expected = np.round(np.array(TYPE_SHARES) * CELLS**2)
    expected[-1] = CELLS**2 - expected[:-1].sum()
    for kind in CLASSES:
        types = cell_types(kind, CELLS, np.random.default_rng(7), disorder)
        assert np.array_equal(np.bincount(types.ravel(), minlength=3), expected)


def test_disorder_swaps_that_share_of_cells():
    ordered = cell_types("ring", CELLS, np.random.default_rng(3))
    mixed = cell_types("ring", CELLS, np.random.default_rng(3), disorder=0.5)
    changed = (ordered != mixed).mean()
    # Swapped cells can land on their own type, so fewer than half change, but many do.
    assert 0.2 < changed <= 0.5


def test_each_entity_is_exactly_one_cell_whatever_the_arrangement():
    # Shape descriptors and the grid-graph edges must not depend on neighbours' types:
    # otherwise mean-pooled descriptors leak the arrangement (they did with plain SLIC).
    centres = set((np.arange(CELLS) * CELL_PX + CELL_PX // 2).astype(np.float32))
    shapes = []
    for kind in CLASSES:
        g = region_graph(synthetic_image(kind, seed=11), array_mpp=GRAPHS.target_mpp, cfg=GRAPHS)
        assert g.num_nodes == CELLS**2
        assert g.num_edges == 2 * 2 * CELLS * (CELLS - 1)  # 4-neighbour grid, both directions
        assert set(np.unique(g.pos.numpy())) == centres
        assert np.allclose(g.x[:, NODE_NAMES.index("area_um2")].numpy(), CELL_PX**2)
        shapes.append(g.x[:, SHAPE].numpy())
    assert all(np.allclose(s, shapes[0]) for s in shapes[1:])

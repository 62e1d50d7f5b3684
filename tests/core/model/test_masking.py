"""Dynamic entity masking: exact counts per graph, connected BFS regions, ratio ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from region_graphs import random_region_graph
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch_geometric.data import Batch
from torch_geometric.utils import grid, subgraph

from hmgdm_core.model.masking import bfs_mask, draw_mask, mask_counts, rank_within_graph


def _batch(sizes=(30, 7, 52)):
    return Batch.from_data_list([random_region_graph(n, i) for i, n in enumerate(sizes)])


def test_rank_within_graph_matches_per_graph_argsort():
    gen = torch.Generator().manual_seed(0)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    score = torch.rand(9, generator=gen)
    rank = rank_within_graph(score, batch, 3)
    for g in range(3):
        idx = (batch == g).nonzero().view(-1)
        expected = torch.argsort(torch.argsort(score[idx]))
        assert torch.equal(rank[idx], expected)


def test_mask_counts_respect_range_and_keep_one_visible():
    gen = torch.Generator().manual_seed(1)
    sizes = torch.tensor([2, 3, 10, 100, 1000])
    for _ in range(20):
        counts = mask_counts(sizes, (0.5, 0.7), fixed=False, generator=gen)
        assert bool((counts >= 1).all() and (counts <= sizes - 1).all())
        big = sizes >= 100
        ratio = counts[big].float() / sizes[big]
        assert bool((ratio >= 0.49).all() and (ratio <= 0.71).all())


def test_fixed_ratio_uses_the_midpoint_every_time():
    gen = torch.Generator().manual_seed(2)
    sizes = torch.tensor([100, 200])
    draws = {
        tuple(mask_counts(sizes, (0.4, 0.8), fixed=True, generator=gen).tolist()) for _ in range(5)
    }
    assert draws == {(60, 120)}


@pytest.mark.parametrize("strategy", ["random", "bfs", "mixed"])
def test_draw_mask_masks_exactly_the_drawn_count_per_graph(strategy):
    data = _batch()
    sizes = torch.bincount(data.batch)
    mask = draw_mask(
        sizes,
        data.batch,
        data.edge_index,
        ratio_range=(0.6, 0.6),
        fixed_ratio=False,
        strategy=strategy,
        num_seeds=2,
        generator=torch.Generator().manual_seed(3),
    )
    expected = torch.minimum(torch.round(0.6 * sizes).long().clamp(min=1), sizes - 1)
    assert torch.equal(torch.bincount(data.batch[mask], minlength=3), expected)


def test_bfs_from_one_seed_masks_a_connected_region():
    edge_index, _ = grid(12, 12)
    batch = torch.zeros(144, dtype=torch.long)
    for seed in range(5):
        mask = bfs_mask(
            torch.tensor([50]),
            batch,
            edge_index,
            num_seeds=1,
            generator=torch.Generator().manual_seed(seed),
        )
        sub, _ = subgraph(mask, edge_index, relabel_nodes=True)
        adj = coo_matrix((np.ones(sub.shape[1]), sub.numpy()), shape=(50, 50))
        assert int(mask.sum()) == 50
        assert connected_components(adj, directed=False)[0] == 1


def test_bfs_reseeds_when_a_component_is_exhausted():
    # Two disconnected triangles; masking 5 of 6 nodes needs a second seed.
    edge_index = torch.tensor(
        [[0, 1, 1, 2, 0, 2, 3, 4, 4, 5, 3, 5], [1, 0, 2, 1, 2, 0, 4, 3, 5, 4, 5, 3]]
    )
    mask = bfs_mask(
        torch.tensor([5]),
        torch.zeros(6, dtype=torch.long),
        edge_index,
        num_seeds=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert int(mask.sum()) == 5

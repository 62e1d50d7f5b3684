"""Random region graphs with every field of the graph-cache contract, for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import Delaunay
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, to_undirected


def random_region_graph(
    num_nodes: int,
    seed: int,
    *,
    dx: int = 8,
    de: int = 4,
    window: int = 8,
    edge_windows: bool = True,
    slide_id: str | None = None,
) -> Data:
    """A random region graph with every field of the graph-cache contract (Delaunay edges)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(num_nodes, 2, generator=gen) * 20.0 * num_nodes**0.5  # µm
    if num_nodes >= 3:
        tri = torch.from_numpy(Delaunay(pos.numpy().astype(np.float64)).simplices).long()
        pairs = torch.cat([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [0, 2]]]).t()
    else:
        pairs = torch.tensor([[0], [1]]) if num_nodes == 2 else torch.zeros(2, 0, dtype=torch.long)
    edge_index = coalesce(to_undirected(pairs, num_nodes=num_nodes), num_nodes=num_nodes)
    num_edges = edge_index.shape[1]
    data = Data(
        x=torch.randn(num_nodes, dx, generator=gen),
        win=torch.randint(0, 256, (num_nodes, 3, window, window), generator=gen, dtype=torch.uint8),
        edge_index=edge_index,
        edge_attr=torch.randn(num_edges, de, generator=gen),
        pos=pos,
        tile_origin=torch.zeros(1, 2),
        slide_id=slide_id or f"synthetic-{seed}",
        tile_index=0,
    )
    if edge_windows:
        data.edge_win = torch.randint(
            0, 256, (num_edges, 3, window, window), generator=gen, dtype=torch.uint8
        )
    return data

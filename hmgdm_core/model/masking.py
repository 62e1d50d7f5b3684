"""Dynamic entity masking: a fresh visible/masked node split per graph, random or BFS-connected.

All functions work on a PyG batch vector and are vectorised over nodes; the only Python loop is
over BFS levels (bounded by the graph diameter), never over nodes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def rank_within_graph(score: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Rank (0 = lowest score) of each node among the nodes of its own graph."""
    order = torch.sort(score).indices
    order = order[torch.sort(batch[order], stable=True).indices]  # by graph, then by score
    ptr = torch.zeros(num_graphs + 1, dtype=torch.long, device=batch.device)
    ptr[1:] = torch.bincount(batch, minlength=num_graphs).cumsum(0)
    rank = torch.empty_like(batch)
    rank[order] = torch.arange(batch.numel(), device=batch.device) - ptr[batch[order]]
    return rank


def mask_counts(
    sizes: Tensor, ratio_range: tuple[float, float], *, fixed: bool, generator: torch.Generator
) -> Tensor:
    """Masked-node count per graph: a ratio drawn per graph, at least 1 masked and 1 visible."""
    lo, hi = ratio_range
    if fixed:
        ratio = torch.full(sizes.shape, (lo + hi) / 2)
    else:
        ratio = lo + (hi - lo) * torch.rand(sizes.shape, generator=generator)
    counts = torch.round(ratio.to(sizes.device) * sizes).long()
    return torch.minimum(counts.clamp(min=1), sizes - 1)


def random_mask(counts: Tensor, batch: Tensor, *, generator: torch.Generator) -> Tensor:
    """Mask `counts[g]` uniformly chosen nodes of every graph g. Returns bool (num_nodes,)."""
    score = torch.rand(batch.shape, generator=generator).to(batch.device)
    return rank_within_graph(score, batch, counts.numel()) < counts[batch]


def bfs_mask(
    counts: Tensor,
    batch: Tensor,
    edge_index: Tensor,
    *,
    num_seeds: int,
    generator: torch.Generator,
) -> Tensor:
    """Grow connected masked regions by BFS from random seeds until `counts[g]` are masked.

    Each level adds a random subset of the frontier (so the last level does not overshoot);
    a graph whose regions cannot grow (component exhausted) gets a fresh seed.
    """
    num_graphs = counts.numel()
    masked = random_mask(counts.clamp(max=num_seeds), batch, generator=generator)
    src, dst = edge_index
    while True:
        have = torch.bincount(batch[masked], minlength=num_graphs)
        need = counts - have
        if not bool((need > 0).any()):
            return masked
        frontier = torch.zeros_like(masked)
        frontier[dst[masked[src]]] = True
        frontier &= ~masked
        stuck = torch.bincount(batch[frontier], minlength=num_graphs) == 0
        candidates = frontier | (~masked & stuck[batch])
        take = torch.where(stuck, need.clamp(max=1), need)
        score = torch.rand(batch.shape, generator=generator).to(batch.device)
        score[~candidates] = 2.0  # non-candidates rank after every candidate
        rank = rank_within_graph(score, batch, num_graphs)
        masked |= candidates & (rank < take[batch])


def draw_mask(
    sizes: Tensor,
    batch: Tensor,
    edge_index: Tensor,
    *,
    ratio_range: tuple[float, float],
    fixed_ratio: bool,
    strategy: Literal["random", "bfs", "mixed"],
    num_seeds: int,
    generator: torch.Generator,
) -> Tensor:
    """The masked-node indicator (num_nodes,) for one training step; `mixed` picks per graph."""
    counts = mask_counts(sizes, ratio_range, fixed=fixed_ratio, generator=generator)
    if strategy == "random":
        return random_mask(counts, batch, generator=generator)
    connected = bfs_mask(counts, batch, edge_index, num_seeds=num_seeds, generator=generator)
    if strategy == "bfs":
        return connected
    uniform = random_mask(counts, batch, generator=generator)
    use_bfs = (torch.rand(sizes.shape, generator=generator) < 0.5).to(batch.device)
    return torch.where(use_bfs[batch], connected, uniform)

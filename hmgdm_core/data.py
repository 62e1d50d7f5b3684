"""Graph inputs for training: validation, shared standardisation moments, bounded batching.

Sites exchange only per-column moments (count, sum, sum of squares), never rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from hmgdm_core.exceptions import GraphDataError


@dataclass(frozen=True)
class GraphDims:
    """What a model's input layers depend on; read from graphs or from a checkpoint."""

    x_dim: int
    edge_dim: int
    window: int  # instance-window side in pixels, 0 when graphs carry no windows
    edge_windows: bool


@dataclass(frozen=True)
class FeatureStats:
    """Per-column mean/std of node descriptors (x) and edge descriptors (e)."""

    x_mean: Tensor
    x_std: Tensor
    e_mean: Tensor
    e_std: Tensor


def _name(g: Data, i: int) -> str:
    return (
        f"graph {i} (slide '{getattr(g, 'slide_id', '?')}', tile {getattr(g, 'tile_index', '?')})"
    )


def validate_graphs(graphs: Sequence[Data], source: str = "graphs") -> None:
    """Raise a one-line GraphDataError for anything a model cannot train on."""
    if not graphs:
        raise GraphDataError(f"{source}: no graphs found; run `hmgdm-client build-graphs` first")
    dims = graph_dims(graphs[:1])
    for i, g in enumerate(graphs):
        if g.num_nodes is None or g.num_nodes < 2:
            raise GraphDataError(f"{source}: {_name(g, i)} has {g.num_nodes or 0} node(s), need 2")
        for key in ("x", "edge_attr"):
            value = getattr(g, key, None)
            if value is not None and not bool(torch.isfinite(value).all()):
                raise GraphDataError(f"{source}: {_name(g, i)} has NaN/inf in '{key}'")
        if graph_dims([g]) != dims:
            raise GraphDataError(
                f"{source}: {_name(g, i)} has feature sizes {graph_dims([g])}, "
                f"the first graph has {dims}"
            )


def graph_dims(graphs: Sequence[Data]) -> GraphDims:
    """Input sizes of the first graph (all graphs of a cache share them)."""
    g = graphs[0]
    edge_attr = getattr(g, "edge_attr", None)
    win = getattr(g, "win", None)
    return GraphDims(
        x_dim=int(g.x.shape[1]),
        edge_dim=int(edge_attr.shape[1]) if edge_attr is not None else 0,
        window=int(win.shape[-1]) if win is not None else 0,
        edge_windows=getattr(g, "edge_win", None) is not None,
    )


def feature_moments(graphs: Sequence[Data]) -> dict[str, Tensor]:
    """Count, sum and sum of squares per descriptor column (float64), for nodes and edges."""
    x = torch.cat([g.x.double() for g in graphs])
    out = {
        "x_count": torch.tensor(float(x.shape[0]), dtype=torch.float64),
        "x_sum": x.sum(0),
        "x_sumsq": x.pow(2).sum(0),
    }
    if getattr(graphs[0], "edge_attr", None) is not None:
        e = torch.cat([g.edge_attr.double() for g in graphs])
        out |= {
            "e_count": torch.tensor(float(e.shape[0]), dtype=torch.float64),
            "e_sum": e.sum(0),
            "e_sumsq": e.pow(2).sum(0),
        }
    return out


def stats_from_moments(moments: dict[str, Tensor]) -> FeatureStats:
    """Mean/std from (possibly site-summed) moments; near-constant columns get std 1."""

    def mean_std(prefix: str) -> tuple[Tensor, Tensor]:
        if f"{prefix}_count" not in moments:
            return torch.zeros(0), torch.ones(0)
        n = moments[f"{prefix}_count"].clamp(min=1)
        mean = moments[f"{prefix}_sum"] / n
        var = (moments[f"{prefix}_sumsq"] / n - mean**2).clamp(min=0)
        std = var.sqrt()
        return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()

    x_mean, x_std = mean_std("x")
    e_mean, e_std = mean_std("e")
    return FeatureStats(x_mean=x_mean, x_std=x_std, e_mean=e_mean, e_std=e_std)


def batch_vector(data: Data) -> tuple[Tensor, int]:
    """Graph index of every node and the number of graphs; one graph when `data` is no Batch."""
    batch = getattr(data, "batch", None)
    if batch is None:
        return torch.zeros(data.num_nodes, dtype=torch.long, device=data.x.device), 1
    return batch, int(data.num_graphs)


def sample_region(g: Data, max_nodes: int, generator: torch.Generator) -> Data:
    """The `max_nodes` entities nearest (by centroid) to a random seed entity: a compact,
    spatially contiguous patch of tissue, found with one sort instead of a BFS."""
    if g.num_nodes <= max_nodes:
        return g
    seed = int(torch.randint(g.num_nodes, (1,), generator=generator))
    dist = (g.pos - g.pos[seed]).pow(2).sum(-1)
    keep = torch.topk(dist, max_nodes, largest=False).indices.sort().values
    return g.subgraph(keep)


def make_batch(
    graphs: Sequence[Data],
    max_nodes: int,
    generator: torch.Generator,
    *,
    stain_jitter: float = 0.0,
) -> Batch:
    """One PyG batch, each graph bounded to `max_nodes` so memory stays fixed.

    `stain_jitter` > 0 perturbs the instance windows' H&E stains (`stain.hed_jitter`, scale and
    shift of that size), one draw per graph: a tile is one staining.
    """
    batch = Batch.from_data_list([sample_region(g, max_nodes, generator) for g in graphs])
    if stain_jitter > 0 and getattr(batch, "win", None) is not None:
        # Imported here: a round without jitter never pays for scikit-image's import.
        from hmgdm_core.stain import hed_jitter

        batch.win = hed_jitter(
            batch.win,
            scale=stain_jitter,
            shift=stain_jitter,
            groups=batch.batch,
            generator=generator,
        )
    return batch


def holdout_split(
    graphs: Sequence[Data], fraction: float, seed: int
) -> tuple[list[Data], list[Data]]:
    """(train, held-out), seeded: whole slides are held out when there are several, so no
    region of a held-out slide is trained on; single-slide sets hold out region graphs."""
    gen = torch.Generator().manual_seed(seed)
    slides = sorted({str(g.slide_id) for g in graphs})
    if len(slides) >= 2:
        n_eval = max(1, round(fraction * len(slides))) if fraction > 0 else 0
        held = {slides[i] for i in torch.randperm(len(slides), generator=gen)[:n_eval].tolist()}
        return (
            [g for g in graphs if str(g.slide_id) not in held],
            [g for g in graphs if str(g.slide_id) in held],
        )
    n_eval = max(1, int(fraction * len(graphs))) if fraction > 0 and len(graphs) > 1 else 0
    held_idx = set(torch.randperm(len(graphs), generator=gen)[:n_eval].tolist())
    return (
        [g for i, g in enumerate(graphs) if i not in held_idx],
        [g for i, g in enumerate(graphs) if i in held_idx],
    )

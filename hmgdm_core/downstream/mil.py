"""Slide-level pooling of tile embeddings: gated-attention multiple-instance learning (AMIL),
optionally with message passing over a k-nearest-tile graph first (Patch-GCN style).

Tiles of many slides travel in one tensor with a PyG-style `batch` vector; attention is a
softmax within each slide, so its weights show which tiles drove the slide's prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from torch_geometric.utils import scatter, softmax, to_dense_batch, to_undirected


def tile_knn_graph(pos: Tensor, batch: Tensor, k: int) -> Tensor:
    """Undirected edges from each tile to its `k` nearest tiles of the same slide, (2, E).

    Dense per slide (padded to the largest slide), so memory is slides x max_tiles².
    """
    dense, mask = to_dense_batch(pos, batch)  # (slides, max_tiles, 2), (slides, max_tiles)
    dist = torch.cdist(dense, dense)  # (slides, max_tiles, max_tiles)
    invalid = ~(mask[:, :, None] & mask[:, None, :])
    invalid |= torch.eye(dense.shape[1], dtype=torch.bool, device=pos.device)
    dist = dist.masked_fill(invalid, float("inf"))
    k = min(k, max(dense.shape[1] - 1, 0))
    near, neighbour = dist.topk(k, dim=-1, largest=False)  # (slides, max_tiles, k)
    offsets = torch.cumsum(mask.sum(1), 0) - mask.sum(1)  # first node index of each slide
    source = (neighbour + offsets[:, None, None])[mask]  # (tiles, k)
    target = torch.arange(len(pos), device=pos.device)[:, None].expand(-1, k)
    keep = torch.isfinite(near[mask])  # slides with fewer than k + 1 tiles
    edge_index = torch.stack([source[keep], target[keep]])
    return to_undirected(edge_index, num_nodes=len(pos))


class GatedAttentionPool(nn.Module):
    """Tile embeddings (num_tiles, in_channels) -> slide embeddings (num_slides, hidden).

    Score per tile: w · (tanh(V h) ⊙ sigmoid(U h)), softmax over the tiles of each slide,
    slide embedding = attention-weighted sum of the projected tiles h. With `knn > 0`, h first
    gets one residual SAGE layer over the k-nearest-tile graph built from `pos`.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 128,
        *,
        attention_channels: int | None = None,
        dropout: float = 0.0,
        knn: int = 0,
    ) -> None:
        super().__init__()
        attention_channels = attention_channels or hidden_channels
        self.knn = knn
        self.project = nn.Sequential(
            nn.Linear(in_channels, hidden_channels), nn.ReLU(), nn.Dropout(dropout)
        )
        self.graph = SAGEConv(hidden_channels, hidden_channels) if knn > 0 else None
        self.attention_v = nn.Linear(hidden_channels, attention_channels)
        self.attention_u = nn.Linear(hidden_channels, attention_channels)
        self.attention_w = nn.Linear(attention_channels, 1)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self, x: Tensor, *, batch: Tensor | None = None, pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (slide embeddings (num_slides, hidden), attention (num_tiles,))."""
        if batch is None:
            batch = torch.zeros(len(x), dtype=torch.long, device=x.device)
        h = self.project(x)  # (num_tiles, hidden)
        if self.graph is not None:
            if pos is None:
                raise ValueError("GatedAttentionPool(knn>0) needs tile positions `pos`")
            h = h + F.relu(self.graph(h, tile_knn_graph(pos, batch, self.knn)))
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        score = self.attention_w(gate).squeeze(-1)  # (num_tiles,)
        attention = softmax(score, batch)
        num_slides = int(batch.max()) + 1 if len(batch) else 0
        slides = scatter(attention[:, None] * h, batch, dim=0, dim_size=num_slides, reduce="sum")
        return slides, attention

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.project[0].in_features}, "
            f"{self.project[0].out_features}, knn={self.knn})"
        )


class AttentionMIL(nn.Module):
    """Gated-attention pooling followed by a linear head: slide logits (or Cox risk, out=1)."""

    def __init__(self, pool: GatedAttentionPool, out_channels: int) -> None:
        super().__init__()
        self.pool = pool
        self.head = nn.Linear(pool.project[0].out_features, out_channels)

    def reset_parameters(self) -> None:
        self.pool.reset_parameters()
        self.head.reset_parameters()

    def forward(
        self, x: Tensor, *, batch: Tensor | None = None, pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (outputs (num_slides, out_channels), attention (num_tiles,))."""
        slides, attention = self.pool(x, batch=batch, pos=pos)
        return self.head(slides), attention

    def loss(
        self,
        x: Tensor,
        target: Tensor,
        *,
        batch: Tensor | None = None,
        pos: Tensor | None = None,
        class_weight: Tensor | None = None,
    ) -> Tensor:
        """Class-weighted cross-entropy of the slide logits against `target` (num_slides,)."""
        logits, _ = self(x, batch=batch, pos=pos)
        return F.cross_entropy(logits, target, weight=class_weight)

"""The GNN encoder of stage 2 (run on the visible subgraph only) and centroid position encoding."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv, GINConv, GINEConv
from torch_geometric.utils import scatter


def graph_conv(
    kind: Literal["gine", "gatv2"], *, hidden: int, edge_dim: int, heads: int
) -> nn.Module:
    """An edge-aware message-passing layer (edge features ignored when `edge_dim` is 0)."""
    if kind == "gatv2":
        return GATv2Conv(
            hidden, hidden // heads, heads=heads, edge_dim=edge_dim or None, add_self_loops=False
        )
    mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
    return GINEConv(mlp, edge_dim=edge_dim) if edge_dim else GINConv(mlp)


def call_conv(conv: nn.Module, h: Tensor, edge_index: Tensor, edge_attr: Tensor | None) -> Tensor:
    return conv(h, edge_index) if isinstance(conv, GINConv) else conv(h, edge_index, edge_attr)


class CentroidEncoding(nn.Module):
    """Sin/cos features of each centroid relative to its graph's mean centroid (translation-free).

    Wavelengths halve from `scale_um` over `frequencies` octaves; output (num_nodes, 4 * F).
    """

    def __init__(self, *, frequencies: int, scale_um: float) -> None:
        super().__init__()
        octaves = torch.arange(frequencies, dtype=torch.float32)
        self.register_buffer("omega", 2 * math.pi * 2.0**octaves / scale_um, persistent=False)
        self.out_dim = 4 * frequencies

    def forward(self, pos: Tensor, batch: Tensor) -> Tensor:
        rel = pos - scatter(pos, batch, dim=0, reduce="mean")[batch]  # (num_nodes, 2)
        angles = (rel[:, :, None] * self.omega).flatten(1)  # (num_nodes, 2F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.out_dim})"


class GraphEncoder(nn.Module):
    """Input projection then `num_layers` residual message-passing layers with LayerNorm.

    `forward` returns every layer's node states so the decoder can read them (U-shaped skip).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        edge_dim: int,
        hidden: int,
        num_layers: int,
        conv: Literal["gine", "gatv2"] = "gine",
        heads: int = 4,
        dropout: float = 0.0,
        mask_token_dims: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.num_layers, self.kind = in_dim, hidden, num_layers, conv
        # Learned stand-ins for a masked entity's latent and its edges' latents (GraphMAE): the
        # encoder then reads the whole graph, as at inference, and must infer masked entities.
        self.mask_token = self.edge_mask_token = None
        if mask_token_dims is not None:
            self.mask_token = nn.Parameter(torch.zeros(mask_token_dims[0]))
            self.edge_mask_token = nn.Parameter(torch.zeros(mask_token_dims[1]))
        self.input = nn.Linear(in_dim, hidden)
        self.edge_input = nn.Linear(edge_dim, hidden) if edge_dim else None
        self.convs = nn.ModuleList(
            graph_conv(conv, hidden=hidden, edge_dim=hidden if edge_dim else 0, heads=heads)
            for _ in range(num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for token in (self.mask_token, self.edge_mask_token):
            if token is not None:
                nn.init.zeros_(token)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        *,
        edge_attr: Tensor | None = None,
        batch: Tensor | None = None,
        with_input: bool = False,
    ) -> list[Tensor]:
        """Node states after each layer, a list of `num_layers` tensors (num_nodes, hidden);
        `with_input` prepends the input projection (what a jumping-knowledge readout reads)."""
        h = self.input(x)
        e = self.edge_input(edge_attr) if self.edge_input is not None else None
        states = [h] if with_input else []
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = norm(h + self.dropout(nn.functional.silu(call_conv(conv, h, edge_index, e))))
            states.append(h)
        return states

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.in_dim}, {self.hidden}, "
            f"num_layers={self.num_layers}, conv={self.kind})"
        )

"""The stage-2 decoder: predicts the clean (or noise) latents of the masked subgraph.

A Transformer stage over all of a graph's tokens (visible encoder states + noisy masked tokens),
then L decode blocks, each: LayerNorm -> cross-attention to one encoder layer's visible states
-> graph conv over the masked subgraph's own edges -> LayerNorm -> FFN (all residual).
Attention never crosses graphs: dense per-graph tensors with key padding masks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch_geometric.utils import to_dense_batch

from hmgdm_core.model.diffusion import TimestepEmbedding
from hmgdm_core.model.encoder import call_conv, graph_conv


def _ffn(hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden)
    )


class DecodeBlock(nn.Module):
    """One decode block; `context` is the dense (graphs, keys, hidden) encoder layer it reads."""

    def __init__(self, *, hidden: int, heads: int, edge_dim: int, conv: str, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.cross = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.conv = graph_conv(conv, hidden=hidden, edge_dim=edge_dim, heads=heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = _ffn(hidden, dropout)

    def forward(
        self,
        h: Tensor,
        t_emb: Tensor,
        batch: Tensor,
        context: Tensor,
        context_pad: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor | None,
    ) -> Tensor:
        h = h + t_emb  # (masked, hidden)
        q, q_mask = to_dense_batch(self.norm1(h), batch, batch_size=context.shape[0])
        attn = self.cross(q, context, context, key_padding_mask=context_pad, need_weights=False)[0]
        h = h + attn[q_mask]
        h = h + call_conv(self.conv, h, edge_index, edge_attr)
        return h + self.ffn(self.norm2(h))


class MaskedGraphDecoder(nn.Module):
    """Denoiser over masked tokens conditioned on encoder states (see module docstring).

    `skip_connections=False` is the paper's ablation: every block reads the last encoder layer.
    """

    def __init__(
        self,
        *,
        latent_dim: int,
        edge_latent_dim: int,
        pos_dim: int,
        hidden: int,
        num_blocks: int,
        heads: int = 4,
        self_attn_layers: int = 2,
        conv: Literal["gine", "gatv2"] = "gine",
        dropout: float = 0.0,
        skip_connections: bool = True,
        own_state: bool = False,
    ) -> None:
        super().__init__()
        self.num_blocks, self.skip_connections = num_blocks, skip_connections
        self.token_in = nn.Linear(latent_dim + pos_dim, hidden)
        # With mask tokens the encoder has a state for each masked entity, inferred from its
        # neighbours only; `own_state` adds it to that entity's token.
        self.own_in = nn.Linear(hidden, hidden) if own_state else None
        self.context_in = nn.Linear(hidden, hidden)
        self.time = TimestepEmbedding(hidden=hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True
        )
        self.self_attn = (
            nn.TransformerEncoder(layer, self_attn_layers, enable_nested_tensor=False)
            if self_attn_layers
            else None
        )
        self.edge_in = nn.Linear(edge_latent_dim, hidden) if edge_latent_dim else None
        edge_hidden = hidden if edge_latent_dim else 0
        self.blocks = nn.ModuleList(
            DecodeBlock(
                hidden=hidden, heads=heads, edge_dim=edge_hidden, conv=conv, dropout=dropout
            )
            for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden)
        self.node_out = nn.Linear(hidden, latent_dim)
        self.edge_out = (
            nn.Sequential(
                nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, edge_latent_dim)
            )
            if edge_latent_dim
            else None
        )

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _joint_self_attention(
        self, tokens: Tensor, batch: Tensor, visible: Tensor, visible_batch: Tensor, num_graphs: int
    ) -> Tensor:
        """Self-attention over each graph's visible states and masked tokens; returns the latter."""
        joint = torch.cat([self.context_in(visible), tokens])
        joint_batch = torch.cat([visible_batch, batch])
        order = torch.sort(joint_batch, stable=True).indices
        dense, mask = to_dense_batch(joint[order], joint_batch[order], batch_size=num_graphs)
        out = torch.empty_like(joint)
        out[order] = self.self_attn(dense, src_key_padding_mask=~mask)[mask]
        return out[visible.shape[0] :]

    def forward(
        self,
        z_t: Tensor,
        pos_enc: Tensor,
        t: Tensor,
        batch: Tensor,
        edge_index: Tensor,
        *,
        edge_z_t: Tensor | None,
        edge_t: Tensor | None,
        states: list[Tensor],
        visible_batch: Tensor,
        num_graphs: int,
        own: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Predictions for masked nodes (masked, latent_dim) and masked edges (E_m, edge_dim).

        z_t: noisy masked latents (masked, latent_dim); t: their graph's timestep (masked,);
        edge_index: masked-subgraph edges relabelled to 0..masked-1; states: encoder layers;
        own: the encoder's last-layer state of each masked entity (masked, hidden), if any.
        """
        h = self.token_in(torch.cat([z_t, pos_enc], dim=-1))  # (masked, hidden)
        if self.own_in is not None:
            h = h + self.own_in(own)
        t_emb = self.time(t)
        if self.self_attn is not None:
            h = self._joint_self_attention(h + t_emb, batch, states[-1], visible_batch, num_graphs)
        e = None
        if self.edge_in is not None:
            e = self.edge_in(edge_z_t) + self.time(edge_t)  # (E_m, hidden)
        num_layers = len(states)
        for i, block in enumerate(self.blocks):
            layer = num_layers - 1 - i if self.skip_connections else num_layers - 1
            ctx, ctx_mask = to_dense_batch(states[layer], visible_batch, batch_size=num_graphs)
            h = block(h, t_emb, batch, ctx, ~ctx_mask, edge_index, e)
        h = self.norm(h)
        edge_pred = None
        if self.edge_out is not None:
            src, dst = edge_index
            edge_pred = self.edge_out(torch.cat([h[src] + h[dst], e], dim=-1))
        return self.node_out(h), edge_pred

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(blocks={self.num_blocks}, "
            f"self_attn={self.self_attn is not None}, skip={self.skip_connections})"
        )

"""H-MGDM: the entity autoencoders (stage 1) plus the masked latent graph diffusion (stage 2).

Parameter names start with "autoencoder.", "encoder." or "decoder." so a federation can
aggregate by prefix; "stats." holds the shared standardisation buffers.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter, subgraph

from hmgdm_core.data import FeatureStats
from hmgdm_core.model.autoencoder import EntityVAE
from hmgdm_core.model.decoder import MaskedGraphDecoder
from hmgdm_core.model.diffusion import NoiseSchedule
from hmgdm_core.model.encoder import CentroidEncoding, GraphEncoder
from hmgdm_core.model.masking import draw_mask

Stage = Literal["autoencoder", "diffusion"]


class Standardiser(nn.Module):
    """Per-column (x - mean) / std for node and edge descriptors, stored as buffers."""

    def __init__(self, *, x_dim: int, edge_dim: int) -> None:
        super().__init__()
        self.register_buffer("x_mean", torch.zeros(x_dim))
        self.register_buffer("x_std", torch.ones(x_dim))
        self.register_buffer("e_mean", torch.zeros(edge_dim))
        self.register_buffer("e_std", torch.ones(edge_dim))

    def set(self, stats: FeatureStats) -> None:
        for name in ("x_mean", "x_std", "e_mean", "e_std"):
            getattr(self, name).copy_(getattr(stats, name))

    def get(self) -> FeatureStats:
        return FeatureStats(
            self.x_mean.clone(), self.x_std.clone(), self.e_mean.clone(), self.e_std.clone()
        )

    def forward(self, x: Tensor, edge_attr: Tensor | None) -> tuple[Tensor, Tensor | None]:
        x = (x - self.x_mean) / self.x_std
        if edge_attr is not None and self.e_mean.numel():
            edge_attr = (edge_attr - self.e_mean) / self.e_std
        return x, edge_attr


def swap_context(states: list[Tensor], visible_batch: Tensor, num_graphs: int) -> dict:
    """Decoder context where graph g reads the visible encoder states of graph (g + 1) % B,
    rows sorted by their new graph; a batch of one graph gets zeroed states instead."""
    if num_graphs == 1:
        return {"states": [torch.zeros_like(s) for s in states], "visible_batch": visible_batch}
    shifted = (visible_batch + 1) % num_graphs
    order = torch.sort(shifted, stable=True).indices
    return {"states": [s[order] for s in states], "visible_batch": shifted[order]}


class HMGDM(nn.Module):
    """The model. Parts are injected; ablations are constructor arguments.

    `edge_autoencoder=None` is the "no edge latents" ablation; `fixed_timestep` and
    `fixed_ratio` the fixed noise / fixed masking ablations; `decoder.skip_connections` the
    no-U-skip ablation.
    """

    def __init__(
        self,
        *,
        autoencoder: EntityVAE,
        edge_autoencoder: EntityVAE | None,
        encoder: GraphEncoder,
        decoder: MaskedGraphDecoder,
        schedule: NoiseSchedule,
        pos_encoding: CentroidEncoding,
        standardiser: Standardiser,
        mask_ratio: tuple[float, float] = (0.5, 0.7),
        fixed_ratio: bool = False,
        masking: Literal["random", "bfs", "mixed"] = "mixed",
        bfs_seeds: int = 4,
        fixed_timestep: int | None = None,
        prediction: Literal["x0", "epsilon"] = "x0",
        edge_loss_weight: float = 1.0,
        readout: Literal["mean", "layers"] = "mean",
    ) -> None:
        super().__init__()
        self.autoencoder = nn.ModuleDict({"node": autoencoder})
        if edge_autoencoder is not None:
            self.autoencoder["edge"] = edge_autoencoder
        self.encoder, self.decoder, self.schedule = encoder, decoder, schedule
        self.pos_encoding, self.stats = pos_encoding, standardiser
        self.mask_ratio, self.fixed_ratio = mask_ratio, fixed_ratio
        self.masking, self.bfs_seeds = masking, bfs_seeds
        self.fixed_timestep, self.prediction = fixed_timestep, prediction
        self.edge_loss_weight, self.readout = edge_loss_weight, readout

    @property
    def uses_edges(self) -> bool:
        return "edge" in self.autoencoder

    def reset_parameters(self) -> None:
        for part in (*self.autoencoder.values(), self.encoder, self.decoder):
            part.reset_parameters()

    def latents(self, data: Data) -> tuple[Tensor, Tensor | None]:
        """Frozen stage-1 latents: nodes (N, latent_dim), edges (E, edge_latent_dim) or None."""
        x, e = self.stats(data.x, getattr(data, "edge_attr", None))
        z = self.autoencoder["node"](x, getattr(data, "win", None))
        ze = (
            self.autoencoder["edge"](e, getattr(data, "edge_win", None))
            if self.uses_edges
            else None
        )
        return z, ze

    def _batch_vec(self, data: Data) -> tuple[Tensor, int]:
        batch = getattr(data, "batch", None)
        if batch is None:
            return torch.zeros(data.num_nodes, dtype=torch.long, device=data.x.device), 1
        return batch, int(data.num_graphs)

    def _encoder_states(self, data: Data, *, with_input: bool = False) -> list[Tensor]:
        batch, _ = self._batch_vec(data)
        z, ze = self.latents(data)
        h_in = torch.cat([z, self.pos_encoding(data.pos, batch)], dim=-1)
        return self.encoder(h_in, data.edge_index, edge_attr=ze, batch=batch, with_input=with_input)

    def node_embeddings(self, data: Data) -> Tensor:
        """Node embeddings (N, hidden) with gradients (what fine-tuning trains through)."""
        return self._encoder_states(data)[-1]

    @torch.no_grad()
    def encode(self, data: Data) -> tuple[Tensor, Tensor]:
        """Node embeddings (N, hidden) and graph embeddings: no masking, no noise.

        Graph embedding: readout "mean" averages the last layer (B, hidden); "layers" concatenates
        the means of the input projection and of every layer, (B, (layers + 1) * hidden).
        """
        batch, num_graphs = self._batch_vec(data)
        states = self._encoder_states(data, with_input=self.readout == "layers")
        read = states if self.readout == "layers" else states[-1:]
        pooled = [scatter(h, batch, dim=0, dim_size=num_graphs, reduce="mean") for h in read]
        return states[-1], torch.cat(pooled, dim=-1)

    def forward(self, data: Data) -> tuple[Tensor, Tensor]:
        return self.encode(data)

    def loss(
        self, data: Batch, *, stage: Stage, generator: torch.Generator, diagnose: bool = False
    ) -> dict[str, Tensor]:
        """The training objective of `stage`; `loss` is the term to minimise.

        `diagnose` (stage 2, evaluation) adds `context_gain`: the masked-node loss when every
        graph's encoder states are swapped for another graph's of the batch, minus the loss
        with its own (same masks, noise and timesteps), and `target_var`, the variance of the
        masked targets; their ratio is the share of that variance the true context explains.
        """
        if stage == "autoencoder":
            return self._autoencoder_loss(data, generator)
        return self._diffusion_loss(data, generator, diagnose)

    def _autoencoder_loss(self, data: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        x, e = self.stats(data.x, getattr(data, "edge_attr", None))
        out = self.autoencoder["node"].loss(x, getattr(data, "win", None), generator=generator)
        terms = {"node_recon": out["recon"], "node_kl": out["kl"], "loss": out["loss"]}
        if self.uses_edges:
            edge = self.autoencoder["edge"].loss(
                e, getattr(data, "edge_win", None), generator=generator
            )
            terms |= {
                "edge_recon": edge["recon"],
                "edge_kl": edge["kl"],
                "loss": out["loss"] + edge["loss"],
            }
        return terms

    def _diffusion_loss(
        self, data: Batch, generator: torch.Generator, diagnose: bool
    ) -> dict[str, Tensor]:
        batch, num_graphs = self._batch_vec(data)
        device = batch.device
        with torch.no_grad():
            z, ze = self.latents(data)  # stage 1 is frozen here
        pos = self.pos_encoding(data.pos, batch)
        sizes = torch.bincount(batch, minlength=num_graphs)
        masked = draw_mask(
            sizes,
            batch,
            data.edge_index,
            ratio_range=self.mask_ratio,
            fixed_ratio=self.fixed_ratio,
            strategy=self.masking,
            num_seeds=self.bfs_seeds,
            generator=generator,
        )
        vis_idx, m_idx = (~masked).nonzero().view(-1), masked.nonzero().view(-1)
        vis_ei, _, vis_emask = subgraph(
            vis_idx,
            data.edge_index,
            relabel_nodes=True,
            num_nodes=data.num_nodes,
            return_edge_mask=True,
        )
        m_ei, _, m_emask = subgraph(
            m_idx,
            data.edge_index,
            relabel_nodes=True,
            num_nodes=data.num_nodes,
            return_edge_mask=True,
        )
        # The encoder only ever receives visible rows and visible-visible edges.
        states = self.encoder(
            torch.cat([z[vis_idx], pos[vis_idx]], dim=-1),
            vis_ei,
            edge_attr=ze[vis_emask] if ze is not None else None,
            batch=batch[vis_idx],
        )
        if self.fixed_timestep is not None:
            t = torch.full((num_graphs,), self.fixed_timestep, dtype=torch.long)
        else:
            t = torch.randint(0, self.schedule.timesteps, (num_graphs,), generator=generator)
        t = t.to(device)
        m_batch = batch[m_idx]
        z0 = z[m_idx]  # (masked, latent_dim)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        z_t = self.schedule.add_noise(z0, t[m_batch], noise)
        ze0 = edge_noise = ze_t = edge_t = None
        if ze is not None:
            ze0 = ze[m_emask]  # (E_m, edge_latent_dim)
            edge_noise = torch.randn(ze0.shape, generator=generator).to(device)
            edge_t = t[batch[data.edge_index[0, m_emask]]]
            ze_t = self.schedule.add_noise(ze0, edge_t, edge_noise)
        decode = functools.partial(
            self.decoder,
            z_t,
            pos[m_idx],
            t[m_batch],
            m_batch,
            m_ei,
            edge_z_t=ze_t,
            edge_t=edge_t,
            num_graphs=num_graphs,
        )
        node_pred, edge_pred = decode(states=states, visible_batch=batch[vis_idx])
        eps = self.prediction == "epsilon"
        target = noise if eps else z0
        node_loss = F.mse_loss(node_pred.float(), target)
        terms = {"node_mse": node_loss, "loss": node_loss}
        if diagnose:
            with torch.no_grad():
                swapped_pred, _ = decode(**swap_context(states, batch[vis_idx], num_graphs))
            terms["context_gain"] = F.mse_loss(swapped_pred.float(), target) - node_loss.detach()
            terms["target_var"] = target.var(0, unbiased=False).mean()
        if edge_pred is not None:
            # A batch without masked-masked edges still reports the term (as 0) for steady metrics.
            edge_loss = (
                F.mse_loss(edge_pred.float(), edge_noise if eps else ze0)
                if edge_pred.shape[0]
                else edge_pred.sum()
            )
            terms |= {"edge_mse": edge_loss, "loss": node_loss + self.edge_loss_weight * edge_loss}
        return terms

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(encoder={self.encoder!r}, decoder={self.decoder!r}, "
            f"edges={self.uses_edges})"
        )

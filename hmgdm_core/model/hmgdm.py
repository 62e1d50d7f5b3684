"""H-MGDM: the entity autoencoders (stage 1) plus the masked latent graph diffusion (stage 2).

Parameter prefixes: "autoencoder.", "encoder.", "decoder." (a federation aggregates by prefix),
"stats." (shared standardisation buffers); the optional objectives' "projector.", "predictor."
and "teacher." stay on the site unless `[federation] aggregate = "all"`.
"""

from __future__ import annotations

import copy
import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter, subgraph

from hmgdm_core.data import FeatureStats, batch_vector
from hmgdm_core.model.autoencoder import EntityVAE, dihedral_views, vicreg
from hmgdm_core.model.decoder import MaskedGraphDecoder
from hmgdm_core.model.diffusion import NoiseSchedule
from hmgdm_core.model.encoder import CentroidEncoding, GraphEncoder
from hmgdm_core.model.masking import draw_mask, mask_counts, random_mask

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


def swap_context(
    states: list[Tensor],
    visible_batch: Tensor,
    num_graphs: int,
    own: Tensor | None = None,
    own_batch: Tensor | None = None,
) -> dict:
    """Decoder context where graph g reads the encoder states of graph (g + 1) % B: its
    visible rows (sorted by their new graph) and, with `own`, the masked entities' own states
    (row r of graph g gets row r mod n of graph g + 1); zeroed states for a batch of one graph.
    """
    if num_graphs == 1:
        zero = None if own is None else torch.zeros_like(own)
        return {"states": [torch.zeros_like(s) for s in states], "visible_batch": visible_batch,
                "own": zero}  # fmt: skip
    shifted = (visible_batch + 1) % num_graphs
    order = torch.sort(shifted, stable=True).indices
    out = {"states": [s[order] for s in states], "visible_batch": shifted[order], "own": own}
    if own is not None:
        counts = torch.bincount(own_batch, minlength=num_graphs)
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        rank = torch.arange(own_batch.numel(), device=own.device) - ptr[own_batch]
        nxt = (own_batch + 1) % num_graphs
        out["own"] = own[ptr[nxt] + rank % counts[nxt].clamp(min=1)]
    return out


def scaled_cosine_error(pred: Tensor, target: Tensor, gamma: float) -> Tensor:
    """GraphMAE's loss: mean over rows of (1 - cos(pred, target)) ** gamma."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).pow(gamma).mean()


def standardise(z: Tensor) -> Tensor:
    """Each latent column to zero mean and unit variance over the batch's rows (no gradient).

    Latent diffusion rescales latents so the schedule's noise levels mean what they say: with
    small-variance latents even the last timestep leaves the masked entity readable.
    """
    return (z - z.mean(0)) / z.std(0, unbiased=False).clamp(min=1e-6)


class HMGDM(nn.Module):
    """The model. Parts are injected; ablations are constructor arguments.

    `edge_autoencoder=None` is the "no edge latents" ablation; `fixed_timestep` and
    `fixed_ratio` the fixed noise / fixed masking ablations; `decoder.skip_connections` the
    no-U-skip ablation. Departures from the paper's stage 2 (model/README.md):
    `standardise_latents` (unit-variance diffusion targets), `timestep_range` (share of T
    drawn from), `encoder_input="mask_token"` (the encoder reads the whole graph with masked
    entities replaced by a learned token; the decoder adds each masked entity's own state),
    `node_loss="sce"` (GraphMAE's scaled cosine error on the masked latents), `teacher_weight`
    (GraphMAE2's latent targets: also predict an EMA teacher encoder's states of the masked
    entities, read from the whole unmasked graph).
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
        readout: Literal["mean", "layers", "layers_std"] = "mean",
        standardise_latents: bool = False,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        encoder_input: Literal["visible", "mask_token"] = "visible",
        node_loss: Literal["mse", "sce"] = "mse",
        sce_gamma: float = 2.0,
        invariance_weight: float = 0.0,
        teacher_weight: float = 0.0,
        teacher_momentum: float = 0.99,
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
        self.standardise_latents, self.timestep_range = standardise_latents, timestep_range
        self.encoder_input, self.node_loss, self.sce_gamma = encoder_input, node_loss, sce_gamma
        self.invariance_weight = invariance_weight
        hidden = encoder.hidden
        # Trained in stage 2 but never shared: it only serves the invariance term.
        self.projector = None
        if invariance_weight > 0:
            self.projector = nn.Sequential(
                nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, 2 * hidden)
            )
        # The teacher follows the encoder (`update_teacher`) instead of training; like the
        # predictor it stays on the site that trains it ("teacher."/"predictor." are not shared).
        self.teacher_weight, self.teacher_momentum = teacher_weight, teacher_momentum
        self.teacher = self.predictor = None
        if teacher_weight > 0:
            if encoder_input != "mask_token":
                raise ValueError("teacher targets need encoder_input='mask_token'")
            self.teacher = copy.deepcopy(encoder).requires_grad_(False)
            self.predictor = nn.Sequential(
                nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden)
            )

    @property
    def uses_edges(self) -> bool:
        return "edge" in self.autoencoder

    def reset_parameters(self) -> None:
        for part in (*self.autoencoder.values(), self.encoder, self.decoder):
            part.reset_parameters()
        for layer in (*(self.projector or ()), *(self.predictor or ())):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if self.teacher is not None:
            self.teacher.load_state_dict(self.encoder.state_dict())

    @torch.no_grad()
    def update_teacher(self) -> None:
        """One EMA step of the teacher towards the encoder (after each stage-2 optimiser step)."""
        if self.teacher is None:
            return
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters(), strict=True):
            t.lerp_(s.detach(), 1 - self.teacher_momentum)

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

    def _encoder_states(self, data: Data, *, with_input: bool = False) -> list[Tensor]:
        batch, _ = batch_vector(data)
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
        the means of the input projection and of every layer, (B, (layers + 1) * hidden);
        "layers_std" also their standard deviations over the graph's entities (B, 2 * that).
        """
        batch, num_graphs = batch_vector(data)
        every = self.readout != "mean"
        states = self._encoder_states(data, with_input=every)
        read = states if every else states[-1:]
        pooled = [scatter(h, batch, dim=0, dim_size=num_graphs, reduce="mean") for h in read]
        if self.readout == "layers_std":
            # Second moments: how mixed a tile's entities are, which a mean cannot say.
            pooled += [
                (scatter(h.pow(2), batch, dim=0, dim_size=num_graphs, reduce="mean") - m.pow(2))
                .clamp(min=0)
                .sqrt()
                for h, m in zip(read, pooled, strict=True)
            ]
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
        if "invariance" in out:
            terms["node_invariance"] = out["invariance"]
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
        batch, num_graphs = batch_vector(data)
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
        states, own = self._context(data, z, ze, pos, masked, vis_idx, vis_ei, vis_emask)
        teacher = None
        if self.teacher is not None:
            teacher = self._teacher_loss(data, z, ze, pos, own, m_idx)
        t = self._timesteps(num_graphs, generator).to(device)
        if self.standardise_latents:
            z = standardise(z)
            ze = standardise(ze) if ze is not None else None
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
        node_pred, edge_pred = decode(states=states, visible_batch=batch[vis_idx], own=own)
        eps = self.prediction == "epsilon"
        target = noise if eps else z0
        node_mse = F.mse_loss(node_pred.float(), target)
        node_loss = node_mse
        if self.node_loss == "sce":
            node_loss = scaled_cosine_error(node_pred, target, self.sce_gamma)
        terms = {"node_mse": node_mse, "loss": node_loss}
        if teacher is not None:
            terms["teacher"] = teacher
            terms["loss"] = terms["loss"] + self.teacher_weight * teacher
        if diagnose:
            with torch.no_grad():
                null = swap_context(states, batch[vis_idx], num_graphs, own, m_batch)
                swapped_pred, _ = decode(**null)
            terms["context_gain"] = F.mse_loss(swapped_pred.float(), target) - node_mse.detach()
            terms["target_var"] = target.var(0, unbiased=False).mean()
        if self.projector is not None:
            terms["invariance"] = self._two_view_invariance(data, generator)
            terms["loss"] = terms["loss"] + self.invariance_weight * terms["invariance"]
        if edge_pred is not None:
            # A batch without masked-masked edges still reports the term (as 0) for steady metrics.
            edge_loss = (
                F.mse_loss(edge_pred.float(), edge_noise if eps else ze0)
                if edge_pred.shape[0]
                else edge_pred.sum()
            )
            terms["edge_mse"] = edge_loss
            terms["loss"] = terms["loss"] + self.edge_loss_weight * edge_loss
        return terms

    def _teacher_loss(
        self, data: Batch, z: Tensor, ze: Tensor | None, pos: Tensor, own: Tensor, m_idx: Tensor
    ) -> Tensor:
        """Scaled cosine error between the predictor's reading of each masked entity's own
        state (inferred from its neighbours) and the teacher's state of that entity in the
        unmasked graph, layer-normalised (data2vec): a target that carries context too."""
        batch, _ = batch_vector(data)
        with torch.no_grad():
            h_in = torch.cat([z, pos], dim=-1)
            target = self.teacher(h_in, data.edge_index, edge_attr=ze, batch=batch)[-1][m_idx]
            target = F.layer_norm(target.float(), target.shape[-1:])
        return scaled_cosine_error(self.predictor(own), target, self.sce_gamma)

    def _view(self, data: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One random view of every graph: its windows and centroids turned by one random
        symmetry of the square per graph, and 30% of its entities hidden (mask token, or left
        out of the encoder's graph). Returns the last-layer states and which entities they are."""
        batch, num_graphs = batch_vector(data)
        code = torch.randint(0, 8, (num_graphs,), generator=generator).to(batch.device)
        view = data.clone()
        if getattr(data, "win", None) is not None:
            view.win = dihedral_views(data.win, generator, codes=code[batch])
        rel = data.pos - scatter(data.pos, batch, dim=0, reduce="mean")[batch]
        x, y = rel[:, 0], rel[:, 1]
        for _ in range(3):  # code % 4 quarter turns, then a mirror for codes >= 4
            turn = (code[batch] % 4) > _
            x, y = torch.where(turn, -y, x), torch.where(turn, x, y)
        x = torch.where(code[batch] >= 4, -x, x)
        view.pos = torch.stack([x, y], dim=-1)
        with torch.no_grad():
            z, ze = self.latents(view)
        sizes = torch.bincount(batch, minlength=num_graphs)
        counts = mask_counts(sizes, (0.3, 0.3), fixed=True, generator=generator)
        hidden = random_mask(counts, batch, generator=generator)
        pos = self.pos_encoding(view.pos, batch)
        keep = (~hidden).nonzero().view(-1)
        ei, _, emask = subgraph(
            keep, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes,
            return_edge_mask=True,
        )  # fmt: skip
        states, _ = self._context(view, z, ze, pos, hidden, keep, ei, emask)
        return states[-1], keep

    def _two_view_invariance(self, data: Batch, generator: torch.Generator) -> Tensor:
        """VICReg between the projected states of entities seen in two random views of their
        graph: states must not depend on the tile's orientation or on which neighbours show."""
        (h_a, keep_a), (h_b, keep_b) = self._view(data, generator), self._view(data, generator)
        rows_a = torch.full((data.num_nodes,), -1, dtype=torch.long, device=h_a.device)
        rows_b = rows_a.clone()
        rows_a[keep_a] = torch.arange(keep_a.numel(), device=h_a.device)
        rows_b[keep_b] = torch.arange(keep_b.numel(), device=h_b.device)
        both = (rows_a >= 0) & (rows_b >= 0)
        return vicreg(self.projector(h_a[rows_a[both]]), self.projector(h_b[rows_b[both]]))

    def _context(
        self,
        data: Batch,
        z: Tensor,
        ze: Tensor | None,
        pos: Tensor,
        masked: Tensor,
        vis_idx: Tensor,
        vis_ei: Tensor,
        vis_emask: Tensor,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Encoder states of the visible entities (per layer) and, with mask tokens, the last
        layer's state of each masked entity. Masked latents never reach the encoder."""
        batch, _ = batch_vector(data)
        if self.encoder_input == "visible":
            # The paper: only visible rows and visible-visible edges.
            states = self.encoder(
                torch.cat([z[vis_idx], pos[vis_idx]], dim=-1),
                vis_ei,
                edge_attr=ze[vis_emask] if ze is not None else None,
                batch=batch[vis_idx],
            )
            return states, None
        z_in = torch.where(masked[:, None], self.encoder.mask_token.to(z.dtype), z)
        ze_in = None
        if ze is not None:  # an edge's latent describes both ends: masked if either end is
            touched = masked[data.edge_index].any(0)
            ze_in = torch.where(touched[:, None], self.encoder.edge_mask_token.to(ze.dtype), ze)
        full = self.encoder(
            torch.cat([z_in, pos], dim=-1), data.edge_index, edge_attr=ze_in, batch=batch
        )
        return [h[vis_idx] for h in full], full[-1][masked]

    def _timesteps(self, num_graphs: int, generator: torch.Generator) -> Tensor:
        """One timestep per graph: fixed, or uniform over `timestep_range` (shares of T)."""
        if self.fixed_timestep is not None:
            return torch.full((num_graphs,), self.fixed_timestep, dtype=torch.long)
        steps = self.schedule.timesteps
        low = min(int(self.timestep_range[0] * steps), steps - 1)
        high = max(low + 1, round(self.timestep_range[1] * steps))
        return torch.randint(low, high, (num_graphs,), generator=generator)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(encoder={self.encoder!r}, decoder={self.decoder!r}, "
            f"edges={self.uses_edges})"
        )

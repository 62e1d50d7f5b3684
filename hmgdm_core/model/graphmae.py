"""GraphMAE-style baseline: masked latent reconstruction with a scaled cosine error, no diffusion.

It trains the *same* encoder object as an H-MGDM backbone (same input latents, positions, edge
latents), so a linear probe compares objectives, not architectures.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from hmgdm_core.data import batch_vector
from hmgdm_core.model.encoder import call_conv, graph_conv
from hmgdm_core.model.hmgdm import HMGDM, Stage
from hmgdm_core.model.masking import mask_counts, random_mask


class GraphMAE(nn.Module):
    """Mask-token input, full-graph encoder, re-mask, one-layer GNN decoder, SCE on masked rows."""

    def __init__(self, *, backbone: HMGDM, mask_rate: float = 0.5, gamma: float = 2.0) -> None:
        super().__init__()
        self._backbone = (backbone,)  # a tuple: not registered, so names keep their prefixes
        self.encoder = backbone.encoder
        hidden, latent = backbone.encoder.hidden, backbone.autoencoder["node"].latent_dim
        edge_dim = backbone.encoder.hidden if backbone.uses_edges else 0
        self.mask_token = nn.Parameter(torch.zeros(latent))
        self.decoder = nn.ModuleDict(
            {
                "conv": graph_conv("gine", hidden=hidden, edge_dim=edge_dim, heads=1),
                "out": nn.Linear(hidden, latent),
            }
        )
        self.mask_rate, self.gamma = mask_rate, gamma

    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        nn.init.zeros_(self.mask_token)
        for module in self.decoder.modules():
            if module is not self.decoder and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def encode(self, data: Data) -> tuple[Tensor, Tensor]:
        return self._backbone[0].encode(data)

    def loss(self, data: Batch, *, stage: Stage, generator: torch.Generator) -> dict[str, Tensor]:
        """Scaled cosine error (1 - cos)^gamma between reconstructed and true masked latents."""
        if stage != "diffusion":
            raise ValueError("GraphMAE trains the encoder only (stage 'diffusion')")
        backbone = self._backbone[0]
        batch, num_graphs = batch_vector(data)
        with torch.no_grad():
            z, ze = backbone.latents(data)
        sizes = torch.bincount(batch, minlength=num_graphs)
        counts = mask_counts(
            sizes, (self.mask_rate, self.mask_rate), fixed=True, generator=generator
        )
        masked = random_mask(counts, batch, generator=generator)
        z_in = torch.where(masked[:, None], self.mask_token.expand_as(z), z)
        h_in = torch.cat([z_in, backbone.pos_encoding(data.pos, batch)], dim=-1)
        h = self.encoder(h_in, data.edge_index, edge_attr=ze, batch=batch)[-1]
        h = h.masked_fill(masked[:, None], 0.0)  # re-mask before decoding, as GraphMAE does
        e = backbone.encoder.edge_input(ze) if ze is not None else None
        rec = self.decoder["out"](call_conv(self.decoder["conv"], h, data.edge_index, e))
        cos = nn.functional.cosine_similarity(rec[masked], z[masked], dim=-1)
        sce = (1 - cos).pow(self.gamma).mean()
        return {"sce": sce, "loss": sce}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_rate={self.mask_rate}, gamma={self.gamma})"

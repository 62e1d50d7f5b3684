"""Stage 1, entity compression: a KL-regularised autoencoder from an entity's (or edge's)
descriptor vector and instance window to a small latent and back.

Windows are reconstructed at a coarse `recon_size` (8x8 average-pooled) because the latent has
to carry colour layout, not pixel detail, and it keeps the decoder cheap on a CPU.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class WindowEncoder(nn.Module):
    """Two strided convs + global average pool: (rows, 3, W, W) uint8 -> (rows, 2 * channels)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 2 * channels

    def forward(self, win: Tensor) -> Tensor:
        return self.net(win.float() / 127.5 - 1.0)


class EntityVAE(nn.Module):
    """Maps descriptors (and windows when `window` > 0) to a Gaussian latent and decodes both."""

    def __init__(
        self,
        *,
        in_dim: int,
        latent_dim: int,
        hidden: int,
        window: int = 0,
        channels: int = 16,
        kl_weight: float = 1e-3,
        recon_size: int = 8,
    ) -> None:
        super().__init__()
        self.in_dim, self.latent_dim, self.kl_weight = in_dim, latent_dim, kl_weight
        self.recon_size = min(recon_size, window) if window else 0
        self.window_encoder = WindowEncoder(channels=channels) if window else None
        win_feat = self.window_encoder.out_dim if self.window_encoder else 0
        self.encoder = _mlp([in_dim + win_feat, hidden, hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, hidden, hidden, in_dim + 3 * self.recon_size**2])

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.reset_parameters()

    def _window_target(self, win: Tensor) -> Tensor:
        small = F.adaptive_avg_pool2d(win.float() / 255.0, self.recon_size)
        return small.flatten(1)  # (rows, 3 * r * r)

    def encode(self, x: Tensor, win: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each (rows, latent_dim)."""
        feats = [x]
        if self.window_encoder is not None:
            feats.append(self.window_encoder(win))
        mu, logvar = self.encoder(torch.cat(feats, dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def forward(self, x: Tensor, win: Tensor | None = None) -> Tensor:
        """The deterministic latent (posterior mean) used as stage-2 input, (rows, latent_dim)."""
        return self.encode(x, win)[0]

    def loss(
        self, x: Tensor, win: Tensor | None = None, *, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Reconstruction MSE (descriptors + coarse window) plus the weighted KL term."""
        mu, logvar = self.encode(x, win)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        recon = self.decoder(mu + eps * (0.5 * logvar).exp())
        target = (
            x if self.window_encoder is None else torch.cat([x, self._window_target(win)], dim=-1)
        )
        rec = F.mse_loss(recon, target)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        return {"recon": rec, "kl": kl, "loss": rec + self.kl_weight * kl}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(in={self.in_dim}, latent={self.latent_dim}, "
            f"windows={self.window_encoder is not None})"
        )

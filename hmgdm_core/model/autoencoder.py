"""Stage 1, entity compression: a KL-regularised autoencoder from an entity's (or edge's)
descriptor vector and instance window to a small latent and back.

Windows are reconstructed either coarsely (`recon="pooled"`: average-pooled to 8x8, cheap, the
latent carries colour layout only) or as pixels (`recon="pixels"`: a transposed-conv decoder at
the window's own resolution, so texture must pass through the latent). `invariance_weight` adds
a VICReg term that makes the window encoder give two random views of the same window
(rotation/flip, and stain jitter) the same features: appearance learned from the tiles.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Stain variation of one invariance view: twice Tellez et al.'s "HED-light" (0.05), so the
# features must ignore more than the staining spread of one site.
VIEW_STAIN = 0.1
INVARIANCE_ROWS = 512


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


def dihedral_views(win: Tensor, generator: torch.Generator, codes: Tensor | None = None) -> Tensor:
    """Each (rows, C, W, W) window turned by `codes` % 4 quarter turns and mirrored when the
    code is >= 4 (the 8 symmetries of the square); random codes when none are given."""
    k = codes
    if k is None:
        k = torch.randint(0, 8, (win.shape[0],), generator=generator).to(win.device)
    out = win.clone()
    for code in range(1, 8):  # 8 symmetries of the square, one masked assignment each
        rows = k == code
        if bool(rows.any()):
            part = win[rows].rot90(code % 4, dims=(-2, -1))
            out[rows] = part.flip(-1) if code >= 4 else part
    return out


def vicreg(a: Tensor, b: Tensor, *, gamma: float = 1.0) -> Tensor:
    """VICReg (Bardes et al. 2022) with its usual weights 25 / 25 / 1: invariance (MSE between
    paired rows), variance (hinge keeping each column's std above `gamma`), covariance
    (off-diagonal covariance pushed to 0), for (rows, dim) embeddings of two views."""
    inv = F.mse_loss(a, b)
    var = cov = a.new_zeros(())
    for x in (a, b):
        x = x - x.mean(0)
        var = var + F.relu(gamma - (x.var(0) + 1e-4).sqrt()).mean()
        c = (x.T @ x) / max(x.shape[0] - 1, 1)
        cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / x.shape[1]
    return 25.0 * inv + 25.0 * var + cov


class PixelDecoder(nn.Module):
    """Latent -> (rows, 3, W, W) window in the encoder's input scale, two transposed convs."""

    def __init__(self, *, latent_dim: int, channels: int, window: int) -> None:
        super().__init__()
        self.side, self.channels = max(1, window // 4), channels
        self.fc = nn.Linear(latent_dim, 2 * channels * self.side**2)
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=1),
        )
        self.window = window

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(-1, 2 * self.channels, self.side, self.side)
        out = self.net(h)
        if out.shape[-1] != self.window:  # windows not divisible by 4
            out = F.interpolate(out, size=self.window, mode="bilinear", align_corners=False)
        return out


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
        recon: Literal["pooled", "pixels"] = "pooled",
        invariance_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim, self.latent_dim, self.kl_weight = in_dim, latent_dim, kl_weight
        self.invariance_weight = invariance_weight if window else 0.0
        pixels = recon == "pixels" and window > 0
        self.recon_size = min(recon_size, window) if window and not pixels else 0
        self.window_encoder = WindowEncoder(channels=channels) if window else None
        win_feat = self.window_encoder.out_dim if self.window_encoder else 0
        self.encoder = _mlp([in_dim + win_feat, hidden, hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, hidden, hidden, in_dim + 3 * self.recon_size**2])
        self.pixel_decoder = None
        if pixels:
            self.pixel_decoder = PixelDecoder(
                latent_dim=latent_dim, channels=channels, window=window
            )
        self.projector = (
            _mlp([win_feat, 4 * win_feat, 4 * win_feat]) if self.invariance_weight > 0 else None
        )

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.reset_parameters()

    def _window_target(self, win: Tensor) -> Tensor:
        small = F.adaptive_avg_pool2d(win.float() / 255.0, self.recon_size)
        return small.flatten(1)  # (rows, 3 * r * r)

    def _invariance(self, win: Tensor, generator: torch.Generator) -> Tensor:
        """VICReg between the projected window features of two random views of each window:
        a random symmetry of the square and a random H&E stain variation each. At most
        `INVARIANCE_ROWS` windows per step: enough rows for VICReg's covariance estimate, and
        the two extra window-encoder passes stay cheap on big batches."""
        if win.shape[0] > INVARIANCE_ROWS:
            rows = torch.randperm(win.shape[0], generator=generator)[:INVARIANCE_ROWS]
            win = win[rows.to(win.device)]
        views = [self.projector(self.window_encoder(self._view(win, generator))) for _ in "ab"]
        return vicreg(*views)

    @staticmethod
    def _view(win: Tensor, generator: torch.Generator) -> Tensor:
        # Imported here: scikit-image's import is paid only when the invariance term is on.
        from hmgdm_core.stain import hed_jitter

        turned = dihedral_views(win, generator)
        return hed_jitter(turned, scale=VIEW_STAIN, shift=VIEW_STAIN, generator=generator)

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
        sample = mu + eps * (0.5 * logvar).exp()
        recon = self.decoder(sample)
        target = x if not self.recon_size else torch.cat([x, self._window_target(win)], dim=-1)
        rec = F.mse_loss(recon, target)
        if self.pixel_decoder is not None:
            # Pixels in the window encoder's input scale [-1, 1]: a term of the descriptors' size.
            pixels = F.mse_loss(self.pixel_decoder(sample), win.float() / 127.5 - 1.0)
            rec = 0.5 * (rec + pixels)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        terms = {"recon": rec, "kl": kl, "loss": rec + self.kl_weight * kl}
        if self.projector is not None:
            terms["invariance"] = self._invariance(win, generator)
            terms["loss"] = terms["loss"] + self.invariance_weight * terms["invariance"]
        return terms

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(in={self.in_dim}, latent={self.latent_dim}, "
            f"windows={self.window_encoder is not None})"
        )

"""DDPM noise schedule (sigmoid or cosine betas) and forward noising of masked latents."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sigmoid_betas(timesteps: int, start: float, end: float) -> Tensor:
    """Betas rising along a sigmoid from `start` to `end` (the official code's schedule)."""
    ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, timesteps, dtype=torch.float64))
    return start + (end - start) * (ramp - ramp[0]) / (ramp[-1] - ramp[0])


def cosine_betas(timesteps: int, offset: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha-bar follows cos², betas capped at 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class NoiseSchedule(nn.Module):
    """Holds sqrt(alpha-bar) tables; `add_noise` is q(z_t | z_0) for a timestep per row."""

    def __init__(self, *, betas: Tensor) -> None:
        super().__init__()
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("sqrt_ab", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_1mab", (1 - alpha_bar).sqrt().float(), persistent=False)

    @classmethod
    def from_config(cls, *, schedule: str, timesteps: int, start: float, end: float):
        betas = (
            sigmoid_betas(timesteps, start, end)
            if schedule == "sigmoid"
            else (cosine_betas(timesteps))
        )
        return cls(betas=betas)

    @property
    def timesteps(self) -> int:
        return self.sqrt_ab.numel()

    def add_noise(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, with `t` (rows,) one timestep per row."""
        return self.sqrt_ab[t, None] * z0 + self.sqrt_1mab[t, None] * noise

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.timesteps}, final_ab={self.sqrt_ab[-1] ** 2:.3g})"


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of integer timesteps followed by a small MLP."""

    def __init__(self, *, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def reset_parameters(self) -> None:
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def forward(self, t: Tensor) -> Tensor:
        half = self.hidden // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # (rows, half)
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
        if emb.shape[-1] < self.hidden:
            emb = nn.functional.pad(emb, (0, 1))
        return self.mlp(emb)  # (rows, hidden)

"""Noise schedules and forward noising."""

from __future__ import annotations

import torch

from hmgdm_core.model.diffusion import NoiseSchedule, TimestepEmbedding, cosine_betas, sigmoid_betas


def test_sigmoid_betas_span_the_configured_range_monotonically():
    betas = sigmoid_betas(1000, 1e-7, 2e-3)
    assert torch.isclose(betas[0], torch.tensor(1e-7, dtype=torch.float64))
    assert torch.isclose(betas[-1], torch.tensor(2e-3, dtype=torch.float64))
    assert bool((betas.diff() >= 0).all())


def test_cosine_schedule_ends_near_pure_noise():
    schedule = NoiseSchedule(betas=cosine_betas(1000))
    assert schedule.sqrt_ab[0] > 0.99
    assert schedule.sqrt_ab[-1] < 0.05
    assert bool((schedule.sqrt_ab.diff() < 0).all())


def test_add_noise_uses_each_rows_timestep():
    schedule = NoiseSchedule(betas=cosine_betas(100))
    z0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    out = schedule.add_noise(z0, torch.tensor([0, 99]), noise)
    assert torch.allclose(out[0], schedule.sqrt_ab[0].expand(3))
    assert torch.allclose(out[1], schedule.sqrt_ab[99].expand(3))
    pure = schedule.add_noise(torch.zeros(1, 3), torch.tensor([50]), torch.ones(1, 3))
    assert torch.allclose(pure, schedule.sqrt_1mab[50].expand(1, 3))


def test_timestep_embedding_distinguishes_timesteps():
    torch.manual_seed(0)
    emb = TimestepEmbedding(hidden=16)(torch.tensor([0, 1, 500]))
    assert emb.shape == (3, 16)
    assert not torch.allclose(emb[0], emb[1])

"""Patient-level DP-SGD: per-patient clipping, noise scale, the privacy unit, Poisson sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric.data import Data

from hmgdm_core.privacy.dpsgd import (
    check_model,
    dp_step,
    group_by_patient,
    poisson_patients,
    private_generator,
)
from hmgdm_core.privacy.errors import PrivacyError


def _item(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=gen), scale * torch.randn(5, 1, generator=gen)


def _loss(model: nn.Module):
    # A patient's loss sums over all of the patient's items (graphs), as one sample.
    def loss(items):
        return sum(((model(x) - y) ** 2).sum() for x, y in items)

    return loss


def _update(patients, *, clip=1.0, sigma=0.0, expected=1.0, seed=0):
    """Parameter change of one SGD(lr=1) DP step from a fixed start: -(clipped sum + noise)/E."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = dp_step(
        opt,
        patients,
        _loss(model),
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=expected,
        generator=torch.Generator().manual_seed(seed),
    )
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return before - after, out


def test_every_patient_gradient_is_clipped_to_c_and_small_ones_are_untouched():
    clip = 5.0
    patients = [[_item(0, 50.0)], [_item(1, 20.0), _item(2, 20.0)], [_item(3, 0.001)]]
    raw = []
    for p in patients:
        torch.manual_seed(0)
        model = nn.Linear(6, 1)
        grads = torch.autograd.grad(_loss(model)(p), list(model.parameters()))
        raw.append(torch.cat([g.reshape(-1) for g in grads]))
    singles = [_update([p], clip=clip)[0] for p in patients]
    for g, u in zip(raw, singles, strict=True):
        assert u.norm() <= clip + 1e-5
        if g.norm() > clip:
            assert u.norm() == pytest.approx(clip, rel=1e-4)
            assert torch.allclose(u / u.norm(), g / g.norm(), atol=1e-5)
        else:
            assert torch.allclose(u, g, atol=1e-6)
    assert raw[0].norm() > clip and raw[2].norm() < clip
    # Clipping happens per patient before summing: the step equals the sum of clipped singles.
    together, out = _update(patients, clip=clip)
    assert torch.allclose(together, sum(singles), atol=1e-5)
    assert out["num_patients"] == 3 and out["clipped_fraction"] == pytest.approx(2 / 3)


def test_privacy_unit_is_the_patient_not_the_graph():
    clip = 1.0
    # Patient "a" has three graphs whose gradients point the same way, each far above C.
    a = [_item(7, 100.0)] * 3
    others = [[_item(8)], [_item(9)]]
    with_a, _ = _update([a, *others], clip=clip)
    without_a, _ = _update(others, clip=clip)
    # Adding or removing a patient moves the summed gradient by at most C...
    assert (with_a - without_a).norm() <= clip + 1e-5
    # ...whereas clipping each graph separately would let the patient move it by 3C.
    per_graph, _ = _update([[g] for g in a] + others, clip=clip)
    assert (per_graph - without_a).norm() == pytest.approx(3 * clip, rel=1e-4)


def test_noise_has_the_configured_std_and_is_divided_by_the_expected_batch_size():
    sigma, clip, expected = 1.5, 2.0, 4.0
    # No patient drawn: the whole update is the noise divided by the expected batch size.
    torch.manual_seed(0)
    model = nn.Linear(200, 100)  # 20,100 parameters
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp_step(
        opt,
        [],
        _loss(model),
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=expected,
        generator=torch.Generator().manual_seed(3),
    )
    noise = torch.cat(
        [(s - p.detach()).reshape(-1) for s, p in zip(start, model.parameters(), strict=True)]
    )
    target = sigma * clip / expected
    # The std estimate of 20,100 normals has a relative standard error of 0.5%.
    assert noise.std().item() == pytest.approx(target, rel=0.03)
    assert abs(noise.mean().item()) < 4 * target / noise.numel() ** 0.5


def test_poisson_sampling_rate_and_variable_batch_size():
    ids = [f"p{i}" for i in range(1000)]
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor(
        [len(poisson_patients(ids, 0.1, gen)) for _ in range(100)], dtype=torch.float
    )
    # 100,000 Bernoulli(0.1) draws: the share has standard error 0.001.
    assert sizes.mean().item() / len(ids) == pytest.approx(0.1, abs=0.005)
    # Poisson, not fixed-size: batch sizes spread with variance n q (1 - q) = 90.
    assert 7.0 < sizes.std().item() < 12.0
    with pytest.raises(PrivacyError, match="rate"):
        poisson_patients(ids, 0.0, gen)


def test_group_by_patient_uses_the_mapping_and_defaults_to_the_slide():
    graphs = [Data(slide_id=s, num_nodes=2) for s in ("s1", "s2", "s3", "s1")]
    groups = group_by_patient(graphs, {"s1": "pat-A", "s2": "pat-A"})
    assert {k: len(v) for k, v in groups.items()} == {"pat-A": 3, "s3": 1}
    assert list(group_by_patient(graphs)) == ["s1", "s2", "s3"]


def test_check_model_rejects_batch_norm_but_accepts_attention_and_layer_norm():
    ok = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    ok.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    check_model(ok)
    with pytest.raises(PrivacyError, match=r"1 \(BatchNorm1d\)"):
        check_model(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
    # Running stats leak even without trainable affine parameters.
    with pytest.raises(PrivacyError, match="InstanceNorm1d"):
        check_model(nn.Sequential(nn.Linear(4, 8), nn.InstanceNorm1d(8, track_running_stats=True)))


def test_private_generator_is_unpredictable_unless_seeded():
    a, b = private_generator(), private_generator()
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    c, d = private_generator(5), private_generator(5)
    assert torch.equal(torch.rand(8, generator=c), torch.rand(8, generator=d))

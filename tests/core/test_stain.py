"""Stain handling on real H&E: Macenko and Reinhard estimation and normalisation (against
torchstain's reference implementations) and HED jitter (against scikit-image's colour
deconvolution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2hed

from hmgdm_core.stain import (
    REFERENCE,
    REFERENCE_LAB,
    LabStats,
    estimate,
    estimate_stains,
    hed_jitter,
    lab_stats,
    normalize,
    normalize_stains,
    optical_density,
    reinhard,
)


@pytest.fixture(scope="module")
def tiles(data_dir) -> list[np.ndarray]:
    """Real H&E tiles of three tissue classes, (150, 150, 3) uint8."""
    root = data_dir / "kather2016_tiles"
    paths = [sorted((root / c).glob("*.tif"))[0] for c in ("01_TUMOR", "02_STROMA", "04_LYMPHO")]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_macenko_finds_haematoxylin_and_eosin(tiles):
    for rgb in tiles:
        basis = estimate_stains(rgb)
        assert basis is not None
        h, e = basis.he.T
        # Haematoxylin absorbs more red than eosin does; both are close to the reference stains.
        assert h[0] > e[0]
        assert h @ REFERENCE.he[:, 0] / np.linalg.norm(REFERENCE.he[:, 0]) > 0.9
        assert e @ REFERENCE.he[:, 1] / np.linalg.norm(REFERENCE.he[:, 1]) > 0.9
    assert estimate_stains(np.full((64, 64, 3), 235, np.uint8)) is None  # glass only


def test_macenko_matches_torchstain(tiles):
    torchstain = pytest.importorskip("torchstain")
    for rgb in tiles:
        ref = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        expected, _, _ = ref.normalize(I=rgb, stains=False)
        ours = normalize_stains(rgb, estimate_stains(rgb))
        diff = np.abs(ours.astype(int) - expected.astype(int))
        assert np.percentile(diff, 99) <= 2, np.percentile(diff, 99)


def test_normalising_removes_a_stain_shift(tiles):
    """The same tissue stained paler and bluer normalises to (nearly) the same image."""
    rgb = tiles[0]
    od = optical_density(rgb)
    shifted_od = od * np.array([1.25, 0.9, 0.7])  # more red absorbed: a bluer, uneven stain
    shifted = np.clip(np.rint(240 * np.exp(-shifted_od)), 0, 255).astype(np.uint8)
    a = normalize_stains(rgb, estimate_stains(rgb))
    b = normalize_stains(shifted, estimate_stains(shifted))
    before = np.abs(rgb.astype(int) - shifted.astype(int)).mean()
    after = np.abs(a.astype(int) - b.astype(int)).mean()
    assert after < 0.35 * before, (before, after)


def test_reinhard_matches_torchstain(tiles):
    """On whole images (every pixel counted), as torchstain's Reinhard computes its statistics."""
    torchstain = pytest.importorskip("torchstain")
    target = tiles[1]
    ref = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    ref.fit(target)
    for rgb in (tiles[0], tiles[2]):
        expected = ref.normalize(rgb)
        ours = reinhard(rgb, lab_stats(rgb, od_threshold=-1), lab_stats(target, od_threshold=-1))
        # torchstain truncates to uint8 where we round: at most one grey level apart.
        assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
        assert np.abs(ours.astype(int) - rgb.astype(int)).mean() > 10  # a real change


def test_reinhard_statistics_come_from_tissue_and_match_the_reference(tiles):
    rgb = tiles[0]
    glass = np.full((150, 150, 3), 238, np.uint8)
    half = np.concatenate([rgb, glass], axis=1)  # the tile beside as much glass
    stats, with_glass = lab_stats(rgb), lab_stats(half)
    np.testing.assert_allclose(with_glass.mean, stats.mean, atol=0.5)  # glass is not tissue
    assert lab_stats(glass) is None and estimate("reinhard", glass) is None
    # The tile's tissue pixels, normalised, have the reference's LAB mean and std.
    from skimage.color import rgb2lab

    tissue = (optical_density(rgb) > 0.15).any(-1)
    lab = rgb2lab(normalize(rgb, estimate("reinhard", rgb))[tissue][None])[0]
    np.testing.assert_allclose(lab.mean(0), REFERENCE_LAB.mean, atol=1.0)  # sRGB gamut clips
    np.testing.assert_allclose(lab.std(0), REFERENCE_LAB.std, rtol=0.1)
    assert np.abs(stats.mean - REFERENCE_LAB.mean).max() > 5  # it did have to move
    assert isinstance(estimate("reinhard", rgb), LabStats)
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        estimate("vahadane", rgb)


def test_reinhard_brings_two_sites_copies_of_a_real_tile_together(data_dir):
    """One LC25000 tile as two hospitals stain it (the linear beer_lambert shift)."""
    from hmgdm_core.studies.partition import beer_lambert_shift

    path = data_dir / "lc25000_lung" / "lung_aca" / "lungaca3960.jpeg"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    a, b = (beer_lambert_shift(rgb, site, 0.3) for site in (0, 1))
    na, nb = (normalize(x, estimate("reinhard", x)) for x in (a, b))
    before = np.abs(a.astype(int) - b.astype(int)).mean()
    after = np.abs(na.astype(int) - nb.astype(int)).mean()
    assert after < 0.6 * before, (before, after)


def test_hed_jitter_scales_and_shifts_each_stain(tiles):
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).double() / 255  # (3, 3, H, W)
    g = torch.Generator().manual_seed(0)
    out = hed_jitter(images, scale=0.2, shift=0.02, generator=g)
    draw = torch.rand((2, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = 1 + 0.2 * (2 * draw[0] - 1), 0.02 * (2 * draw[1] - 1)
    for i in range(len(tiles)):
        before = rgb2hed(images[i].permute(1, 2, 0).numpy())
        after = rgb2hed(out[i].permute(1, 2, 0).numpy())
        # Where skimage clips nothing (all stains positive before and after, no saturation).
        ok = (before > 0.01).all(-1) & (after > 0.01).all(-1)
        ok &= (out[i] < 0.999).all(0).numpy() & (out[i] > 0.001).all(0).numpy()
        assert ok.sum() > 1000
        np.testing.assert_allclose(
            after[ok], before[ok] * a[i].numpy() + b[i].numpy(), rtol=1e-6, atol=1e-6
        )


def test_hed_jitter_is_identity_at_zero_and_shares_draws_within_groups(tiles):
    images = torch.from_numpy(np.stack(tiles + tiles)).permute(0, 3, 1, 2).contiguous()
    same = hed_jitter(images, scale=0.0, shift=0.0)
    assert same.dtype == torch.uint8 and (same.int() - images.int()).abs().max() <= 1

    def jitter(groups):
        g = torch.Generator().manual_seed(1)
        return hed_jitter(images, scale=0.1, shift=0.05, groups=torch.tensor(groups), generator=g)

    # Images i and i + 3 are the same tile: equal output exactly when they share a draw.
    shared, apart = jitter([0, 1, 2, 0, 1, 2]), jitter([0, 0, 0, 1, 1, 1])
    assert torch.equal(shared[:3], shared[3:]) and not torch.equal(apart[:3], apart[3:])
    assert (shared.int() - images.int()).abs().float().mean() > 1


def test_training_batches_jitter_windows_per_graph_only_when_asked(tiles):
    """train.stain_jitter: every entity window of one graph gets the same stain draw."""
    from torch_geometric.data import Data

    from hmgdm_core.data import make_batch

    tile = torch.from_numpy(tiles[0]).permute(2, 0, 1)[:, :32, :32]
    windows = tile.expand(3, -1, -1, -1).contiguous()  # three identical entity windows
    graphs = [
        Data(x=torch.zeros(3, 2), win=windows.clone(), pos=torch.rand(3, 2), num_nodes=3)
        for _ in range(2)
    ]
    plain = make_batch(graphs, 10, torch.Generator().manual_seed(0))
    assert torch.equal(plain.win, torch.cat([windows, windows]))
    batch = make_batch(graphs, 10, torch.Generator().manual_seed(0), stain_jitter=0.2)
    assert torch.equal(batch.x, plain.x) and not torch.equal(batch.win, plain.win)
    # One draw per graph: equal windows stay equal within a graph, differ across graphs.
    assert all(torch.equal(batch.win[i], batch.win[0]) for i in (1, 2))
    assert all(torch.equal(batch.win[i], batch.win[3]) for i in (4, 5))
    assert not torch.equal(batch.win[0], batch.win[3])


def test_both_steps_of_the_training_loop_jitter_their_batches(tiles):
    """train.stain_jitter reaches the batches of the one loop's plain step and of its DP step."""
    from torch_geometric.data import Data

    from hmgdm_core.model.config import TrainConfig
    from hmgdm_core.privacy.config import LocalDP
    from hmgdm_core.privacy.local import patient_batch
    from hmgdm_core.train import BatchStep

    windows = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)[:, :, :32, :32].contiguous()
    graphs = [Data(x=torch.zeros(3, 2), win=windows, pos=torch.rand(3, 2), num_nodes=3)] * 2
    cpu, weight = torch.device("cpu"), torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def drawn(jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = TrainConfig(stain_jitter=jitter, batch_size=2, max_nodes=10)
        seen = []

        def objective(batch):
            seen.append(batch.win)
            return {"loss": weight * 2}

        BatchStep(graphs, cfg, device=cpu, generator=torch.Generator().manual_seed(0))(
            objective, optimizer
        )
        make = patient_batch(cfg, LocalDP(), device=cpu, generator=torch.Generator())
        return seen[0], make(graphs).win

    for plain, jittered in zip(drawn(0.0), drawn(0.2), strict=True):
        assert torch.equal(plain, torch.cat([windows, windows]))
        assert (jittered.int() - plain.int()).abs().float().mean() > 1

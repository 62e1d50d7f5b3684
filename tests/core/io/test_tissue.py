"""Tissue detection on real tiles and synthetic images, and the tissue tile grid."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hsv
from skimage.draw import disk

from hmgdm_core.config import TissueConfig
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.io.slides import Slide
from hmgdm_core.io.tissue import ink_mask, tile_grid, tissue_mask

# Tiles are crops, so whole-slide speck and hole sizes would wipe them out.
TILE_CFG = {"min_object_um2": 200.0, "min_hole_um2": 200.0}
METHODS = ["otsu_saturation", "otsu_od"]
PINK = (225, 150, 190)


def _tile(data_dir, name: str) -> np.ndarray:
    with Slide.open(data_dir / "tissue_tiles" / "tiles" / name, scan_mpp=0.5) as s:
        return s.thumbnail(0.5)


@pytest.mark.parametrize("method", METHODS)
def test_real_tiles_by_weak_label(data_dir, method):
    cfg = TissueConfig(method=method, **TILE_CFG)
    names = sorted(p.name for p in (data_dir / "tissue_tiles" / "tiles").glob("*.png"))
    tissue = [n for n in names if n.startswith("tissue-")]
    empty = [n for n in names if n.startswith(("no-tissue", "almost-white")) and "red-pen" not in n]
    assert len(tissue) == 6 and len(empty) == 7
    for name in tissue:
        assert tissue_mask(_tile(data_dir, name), array_mpp=0.5, cfg=cfg).mean() > 0.3, name
    for name in empty:
        assert tissue_mask(_tile(data_dir, name), array_mpp=0.5, cfg=cfg).mean() < 0.05, name


def test_green_ink_is_excluded(data_dir):
    rgb = _tile(data_dir, "no-tissue-green-pen.png")
    assert ink_mask(rgb2hsv(rgb)).mean() > 0.5  # the tile is mostly ink ...
    assert (
        tissue_mask(rgb, array_mpp=0.5, cfg=TissueConfig(**TILE_CFG)).mean() < 0.05
    )  # ... not tissue


def _scene(rng: np.random.Generator) -> np.ndarray:
    """Near-white noisy glass; a 30 px tissue disk with a 3 px hole; a 3 px speck; black ink."""
    rgb = np.clip(rng.normal(243, 2, (100, 100, 3)), 0, 255).astype(np.uint8)
    rgb[disk((50, 50), 30)] = PINK
    rgb[disk((50, 50), 3)] = 243
    rgb[disk((8, 90), 3)] = PINK
    rgb[85:95, 5:40] = 10
    return rgb


@pytest.mark.parametrize("method", METHODS)
def test_specks_holes_and_dark_areas(method):
    rgb = _scene(np.random.default_rng(0))
    # At 1 µm/px the speck and the hole (29 px = 29 µm² each) fall under the 100 µm² limits ...
    mask = tissue_mask(
        rgb, array_mpp=1.0, cfg=TissueConfig(method=method, min_object_um2=100, min_hole_um2=100)
    )
    assert mask[50, 50] and mask[50, 25] and not mask[8, 90]
    assert not mask[85:95, 5:40].any() and not mask[:5].any()
    # ... at 4 µm/px the same pixels are 16x larger in µm² and stay as they are.
    mask = tissue_mask(
        rgb, array_mpp=4.0, cfg=TissueConfig(method=method, min_object_um2=100, min_hole_um2=100)
    )
    assert not mask[50, 50] and mask[50, 25] and mask[8, 90]


@pytest.mark.parametrize("method", METHODS)
def test_background_only_gives_empty_mask(method):
    cfg = TissueConfig(method=method, min_object_um2=0, min_hole_um2=0)
    rng = np.random.default_rng(1)
    noisy_glass = np.clip(rng.normal(240, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(noisy_glass, array_mpp=8.0, cfg=cfg).any()
    assert not tissue_mask(np.full((16, 16, 3), 255, np.uint8), array_mpp=8.0, cfg=cfg).any()
    # A flat all-tissue image is all tissue: no Otsu split needed.
    assert tissue_mask(np.full((16, 16, 3), PINK, np.uint8), array_mpp=8.0, cfg=cfg).all()


def test_all_tissue_image_is_not_split_in_two(data_dir):
    rgb = _tile(data_dir, "very-low-nuclei-score-level0.png")  # fully covered by tissue
    assert tissue_mask(rgb, array_mpp=0.5, cfg=TissueConfig(**TILE_CFG)).mean() > 0.9


def test_tile_grid_fractions_and_order():
    mask = np.zeros((25, 30), bool)  # 1 µm/px, 10 µm tiles: a 3 x 3 grid, last row partial
    mask[0:10, 0:10] = True  # tile (0, 0): full
    mask[0:3, 10:20] = True  # tile (10, 0): 30 %
    mask[12:15, 20:30] = True  # tile (20, 10): 30 %
    mask[24, 0] = True  # tile (0, 20): one pixel

    def grid(min_fraction: float) -> list:
        return tile_grid(
            mask, mask_mpp=1.0, tile_um=10.0, slide_size_um=(30, 25), min_fraction=min_fraction
        ).tolist()

    assert grid(0.25) == [[0, 0], [10, 0], [20, 10]]
    assert grid(0.5) == [[0, 0]]
    assert grid(0.0) == [[0, 0], [10, 0], [20, 10], [0, 20]]  # empty tiles never returned


def test_tile_grid_covers_every_tissue_pixel():
    rng = np.random.default_rng(2)
    mask = np.zeros((80, 90), bool)
    for _ in range(12):
        mask[disk(tuple(rng.integers(0, 80, 2)), int(rng.integers(2, 8)), shape=mask.shape)] = True
    mask_mpp, tile_um = 8.0, 50.0  # 6.25 mask pixels per tile: edges fall inside pixels
    size_um = (90 * mask_mpp, 80 * mask_mpp)
    tiles = tile_grid(
        mask, mask_mpp=mask_mpp, tile_um=tile_um, slide_size_um=size_um, min_fraction=1e-9
    )
    rows, cols = np.nonzero(mask)
    cx, cy = (cols + 0.5) * mask_mpp, (rows + 0.5) * mask_mpp  # pixel centres in µm
    inside = (
        (cx[:, None] >= tiles[:, 0])
        & (cx[:, None] < tiles[:, 0] + tile_um)
        & (cy[:, None] >= tiles[:, 1])
        & (cy[:, None] < tiles[:, 1] + tile_um)
    )
    assert inside.any(axis=1).all()  # every tissue pixel lies in a returned tile
    assert inside.any(axis=0).all()  # every returned tile holds tissue
    n_all = np.ceil(size_um[0] / tile_um) * np.ceil(size_um[1] / tile_um)
    assert 0 < len(tiles) < n_all  # background tiles skipped
    assert np.array_equal(tiles, tiles[np.lexsort((tiles[:, 0], tiles[:, 1]))])  # row-major


def test_tile_grid_rejects_tiles_finer_than_the_mask():
    with pytest.raises(ConfigError, match=r"tissue\.thumbnail_mpp"):
        tile_grid(
            np.ones((4, 4), bool),
            mask_mpp=8.0,
            tile_um=10.0,
            slide_size_um=(32, 32),
            min_fraction=0.5,
        )


def test_real_slide_thumbnail_to_tiles(data_dir):
    cfg = TissueConfig()
    with Slide.open(data_dir / "slides" / "cmu-1-small-region.svs") as s:
        thumb = s.thumbnail(cfg.thumbnail_mpp)
        size_um = s.size_um
    mask = tissue_mask(thumb, array_mpp=cfg.thumbnail_mpp, cfg=cfg)
    assert 0.15 < mask.mean() < 0.6  # a strip of skin on a mostly empty slide
    tiles = tile_grid(
        mask,
        mask_mpp=cfg.thumbnail_mpp,
        tile_um=256.0,
        slide_size_um=size_um,
        min_fraction=cfg.min_tile_fraction,
    )
    assert len(tiles) > 3
    assert (tiles >= 0).all() and (tiles < np.array(size_um)).all()

"""Synthetic tissue texture and the tile-by-tile pyramidal TIFF writer."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from hmgdm_core.io import synthetic
from hmgdm_core.io.synthetic import tissue_texture, write_pyramidal_tiff


def test_texture_is_a_function_of_position_and_seed():
    big = tissue_texture(100.0, 40.0, 96, 80, mpp=0.5, seed=7).astype(int)
    part = tissue_texture(100.0 + 32 * 0.5, 40.0 + 16 * 0.5, 48, 40, mpp=0.5, seed=7)
    assert np.abs(big[16:56, 32:80] - part).max() <= 1  # tiles agree wherever they are cut
    assert np.array_equal(big, tissue_texture(100.0, 40.0, 96, 80, mpp=0.5, seed=7))
    assert not np.array_equal(big, tissue_texture(100.0, 40.0, 96, 80, mpp=0.5, seed=8))


def test_texture_looks_like_tissue_on_glass():
    rgb = tissue_texture(0.0, 0.0, 500, 500, mpp=8.0, seed=0, supersample=1).astype(int)
    background = (rgb > 240).all(axis=-1)
    nuclei = (rgb[..., 2] - rgb[..., 1] > 60) & (rgb[..., 0] < 150)  # dark purple
    assert 0.2 < background.mean() < 0.9 and nuclei.any()
    blocks = background.reshape(10, 50, 10, 50).mean(axis=(1, 3))  # 400 µm blocks
    assert (blocks == 1).any() and (blocks < 0.1).any()  # empty glass and solid tissue areas


def test_supersampled_level_equals_box_downsample():
    fine = tissue_texture(0.0, 0.0, 64, 64, mpp=0.5, seed=1).astype(float)
    coarse = tissue_texture(0.0, 0.0, 16, 16, mpp=2.0, seed=1, supersample=4)
    box = fine.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(coarse - box).max() <= 1.0


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_pyramid_is_read_by_openslide(tmp_path, compression):
    path = write_pyramidal_tiff(
        tmp_path / "s.tif", 700, 500, mpp=0.25, tile=128, seed=2, compression=compression
    )
    with openslide.OpenSlide(path) as osr:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert osr.level_dimensions == ((700, 500), (350, 250), (175, 125), (88, 63))
        level0 = np.asarray(osr.read_region((0, 0), 0, (700, 500)).convert("RGB")).astype(int)
    diff = np.abs(level0 - tissue_texture(0.0, 0.0, 700, 500, mpp=0.25, seed=2))
    if compression == "zlib":
        assert diff.max() == 0
    else:
        assert diff.mean() < 3
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "tissue_texture", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_pyramidal_tiff(tmp_path / "s.tif", 300, 300, mpp=0.5, tile=128)
    assert list(tmp_path.iterdir()) == []

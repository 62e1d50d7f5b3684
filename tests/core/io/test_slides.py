"""Slide reading: backends, mpp handling, level choice, resampling, padding and bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from hmgdm_core.exceptions import SlideReadError
from hmgdm_core.io import slides
from hmgdm_core.io.slides import Slide
from hmgdm_core.io.synthetic import write_pyramidal_tiff

CMU_MPP = 0.499


@pytest.fixture(scope="module")
def cmu(data_dir):
    return data_dir / "slides" / "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """1024 x 768 lossless synthetic pyramid at 0.5 µm/px with levels 1, 2, 4, 8."""
    path = tmp_path_factory.mktemp("pyr") / "pyr.tif"
    return write_pyramidal_tiff(path, 1024, 768, mpp=0.5, tile=128, seed=3, compression="zlib")


def _box_down(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX)).astype(int)


def test_svs_properties(cmu):
    with Slide.open(cmu) as s:
        assert (s.backend, s.slide_id, s.size) == ("openslide", "cmu-1-small-region", (2220, 2967))
        assert s.scan_mpp == pytest.approx(CMU_MPP)
        assert s.size_um == pytest.approx((2220 * CMU_MPP, 2967 * CMU_MPP))
        assert s.size_at(2 * CMU_MPP) == (1110, 1484)
        assert s.metadata["vendor"] == "aperio" and s.metadata["level_count"] == 1
        assert s.metadata["mpp_source"] == "file"
        json.dumps(s.metadata)  # must be JSON-serialisable for the graph cache header


def test_svs_and_exported_images_agree(cmu, tmp_path):
    x0, y0, w, h = 300, 400, 600, 500
    with openslide.OpenSlide(cmu) as osr:
        crop = np.asarray(osr.read_region((x0, y0), 0, (w, h)).convert("RGB"))
    Image.fromarray(crop).save(tmp_path / "crop.png")
    tifffile.imwrite(tmp_path / "crop.tif", crop)
    # A fractional origin and a non-integer downsample exercise the resampling path.
    dx, dy, out_mpp = 10.3, 7.9, 1.3
    with Slide.open(cmu) as svs:
        ref = svs.read_region(x0 * CMU_MPP + dx, y0 * CMU_MPP + dy, 200, 150, mpp=out_mpp)
        exact = svs.read_region(x0 * CMU_MPP, y0 * CMU_MPP, w, h, mpp=CMU_MPP)
    assert np.array_equal(exact, crop)
    for name, backend in (("crop.png", "pillow"), ("crop.tif", "tifffile")):
        with Slide.open(tmp_path / name, scan_mpp=CMU_MPP) as plain:
            assert plain.backend == backend
            got = plain.read_region(dx, dy, 200, 150, mpp=out_mpp)
        assert np.abs(got.astype(int) - ref).max() <= 1


def test_region_outside_slide_is_white(cmu, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 200, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "small.png")
    with Slide.open(tmp_path / "small.png", scan_mpp=1.0) as s:
        out = s.read_region(-5.0, -10.0, 70, 60, mpp=1.0)
    assert np.array_equal(out[10:50, 5:65], rgb)
    assert (out[:10] == 255).all() and (out[:, :5] == 255).all() and (out[50:] == 255).all()
    with Slide.open(cmu) as s:
        w_um = s.size_um[0]
        edge = s.read_region(w_um - 50 * CMU_MPP, 100.0, 100, 20, mpp=CMU_MPP)
    assert (edge[:, 50:] == 255).all() and (edge[:, :50] < 250).any()


def test_level_choice(pyramid):
    with Slide.open(pyramid) as s:
        assert s.metadata["level_downsamples"] == [1.0, 2.0, 4.0, 8.0]
        chosen = [s.level_for(m) for m in (0.25, 0.5, 0.99, 1.0, 1.9, 2.0, 3.0, 4.0, 50.0)]
    assert chosen == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_coarse_level_is_read_and_matches_level0(pyramid, monkeypatch):
    levels_read = []
    original = slides._OpenSlideLevels.read

    def spy(self, level, *args):
        levels_read.append(level)
        return original(self, level, *args)

    monkeypatch.setattr(slides._OpenSlideLevels, "read", spy)
    with Slide.open(pyramid) as s:
        full = s.read_region(40.0, 20.0, 960, 720, mpp=0.5)
        at_2 = s.read_region(40.0, 20.0, 240, 180, mpp=2.0)
        at_3 = s.read_region(40.0, 20.0, 160, 120, mpp=3.0)
    assert levels_read == [0, 2, 2]
    assert np.abs(at_2.astype(int) - _box_down(full, (240, 180))).max() <= 2
    # Level 2 plus a 1.5x resize vs level 0 plus a 6x resize: PIL weighs the source pixels of
    # a non-integer box by their centres, so sharp nucleus edges differ by a few grey levels.
    assert np.abs(at_3.astype(int) - _box_down(full, (160, 120))).mean() < 3


def test_chunked_read_equals_single_read(cmu, monkeypatch):
    with Slide.open(cmu) as s:
        whole = s.read_region(33.3, 51.7, 150, 130, mpp=2.1)
        monkeypatch.setattr(slides, "_CHUNK_PX", 64)
        chunked = s.read_region(33.3, 51.7, 150, 130, mpp=2.1)
    assert np.abs(whole.astype(int) - chunked).max() <= 1


def test_thumbnail_covers_whole_slide(pyramid):
    with Slide.open(pyramid) as s:
        thumb = s.thumbnail(4.0)
        assert thumb.shape == (96, 128, 3) and thumb.dtype == np.uint8
        assert np.array_equal(thumb, s.read_region(0, 0, 128, 96, mpp=4.0))


def test_mpp_from_file_override_and_missing(data_dir, cmu, tmp_path):
    with Slide.open(cmu, scan_mpp=0.25) as s:
        assert s.scan_mpp == 0.25 and s.metadata["mpp_source"] == "override"
    rgb = np.full((32, 32, 3), 200, np.uint8)
    tifffile.imwrite(
        tmp_path / "res.tif", rgb, resolution=(1e4 / 0.8, 1e4 / 0.8), resolutionunit="CENTIMETER"
    )
    Image.fromarray(rgb).save(tmp_path / "dpi.png", dpi=(25_400 / 0.4, 25_400 / 0.4))
    with Slide.open(tmp_path / "res.tif") as s:
        assert s.scan_mpp == pytest.approx(0.8)
    with Slide.open(tmp_path / "dpi.png") as s:
        assert s.scan_mpp == pytest.approx(0.4, rel=1e-3)
    # No resolution, or a 72/96-dpi default that is not a microscope's, must not be trusted.
    Image.fromarray(rgb).save(tmp_path / "screen.png", dpi=(96, 96))
    for path in (
        data_dir / "slides" / "tcga-cr-7395-01a-01-ts1.svs",
        data_dir / "slides" / "pathml_small_HE_levels.tiff",
        tmp_path / "screen.png",
    ):
        with pytest.raises(SlideReadError, match="pass --mpp"):
            Slide.open(path)


def test_objective_power_gives_the_resolution_with_a_warning(tmp_path):
    """A slide recording only its magnification (Aperio AppMag, no MPP) is read at 10 µm /
    objective power, and says so; --mpp still wins."""
    header = "Aperio Image Library v12.0.16\r\n512x512 (256x256) JPEG/RGB Q=90|AppMag = 20"
    path = write_pyramidal_tiff(
        tmp_path / "mag.svs", 512, 512, mpp=0.5, tile=256, levels=1, description=header
    )
    with Slide.open(path) as s:
        assert s.metadata["vendor"] == "aperio" and s.metadata["mpp_x"] is None
        assert (s.scan_mpp, s.mpp_source) == (0.5, "objective_power")
        assert "mag.svs" in s.mpp_warning and "20x objective" in s.mpp_warning
        assert "0.5 µm/px" in s.mpp_warning and "\n" not in s.mpp_warning
    with Slide.open(path, scan_mpp=0.3) as s:
        assert (s.scan_mpp, s.mpp_source, s.mpp_warning) == (0.3, "override", "")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_mpp_rejected(cmu, bad):
    with pytest.raises(SlideReadError, match="invalid mpp"):
        Slide.open(cmu, scan_mpp=bad)


def test_other_real_files(data_dir):
    with Slide.open(data_dir / "slides" / "tcga-cr-7395-01a-01-ts1.svs", scan_mpp=0.25) as s:
        # The stored downsample 2.0005 counts as 2x: no needless read of level 0.
        assert s.metadata["level_count"] == 2 and s.level_for(0.5) == 1
    with Slide.open(data_dir / "slides" / "kidney-48-5.tif", scan_mpp=0.5) as s:
        assert (s.backend, s.size) == ("tifffile", (1493, 901))
    with Slide.open(data_dir / "slides" / "pathml_smalltif.tif", scan_mpp=1.0) as s:
        grey = s.read_region(0, 0, 64, 64, mpp=1.0)  # 16-bit greyscale first page
    assert grey.dtype == np.uint8 and np.array_equal(grey[..., 0], grey[..., 2])


def test_pixel_format_conversions(tmp_path):
    grey16 = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", grey16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.new("CMYK", (4, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(grey16.astype(np.uint8) + 7, "L").save(tmp_path / "grey.png")
    tifffile.imwrite(
        tmp_path / "miniswhite.tif", np.array([[0, 255]], np.uint8), photometric="miniswhite"
    )
    tifffile.imwrite(
        tmp_path / "la.tif",
        np.array([[[0, 0], [0, 255]]], np.uint8),
        photometric="minisblack",
        planarconfig="contig",
        extrasamples=["unassalpha"],
    )
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 40, 90])
    palette.save(tmp_path / "palette.png", transparency=0)
    names = (
        "g16.tif",
        "g16.png",
        "rgba.png",
        "cmyk.jpg",
        "grey.png",
        "miniswhite.tif",
        "la.tif",
        "palette.png",
    )
    read = {}
    for name in names:
        with Slide.open(tmp_path / name, scan_mpp=1.0) as s:
            read[name] = s.read_region(0, 0, *s.size, mpp=1.0).astype(int)
    assert read["g16.tif"][0, :, 0].tolist() == [0, 128, 255, 4]
    assert np.array_equal(read["g16.png"], read["g16.tif"])
    assert read["rgba.png"][0].tolist() == [[255, 255, 255], [10, 20, 30], [127, 127, 127]]
    assert np.abs(read["cmyk.jpg"][0, 0] - [255, 0, 0]).max() < 20  # CMYK 0,255,255,0 is red
    assert (read["grey.png"][..., 0] == read["grey.png"][..., 1]).all()
    assert read["miniswhite.tif"][0, :, 0].tolist() == [255, 0]
    assert read["la.tif"][0].tolist() == [[255, 255, 255], [0, 0, 0]]
    assert read["palette.png"][0].tolist() == [[255, 255, 255], [200, 40, 90]]


def test_pillow_rejects_32bit_modes(tmp_path):
    # Only Pillow-only formats reach this branch; a Pillow-written int32 TIFF stands in for them.
    Image.fromarray(np.zeros((8, 8), np.int32), "I").save(tmp_path / "i32.tif")
    with pytest.raises(SlideReadError, match="32-bit"):
        slides._read_pillow(tmp_path / "i32.tif")


def _write_bad(tmp_path, data_dir, kind):
    slides_dir = data_dir / "slides"
    p = tmp_path / kind
    if kind == "missing.svs":
        return p
    if kind == "a_directory.svs":
        p.mkdir()
    elif kind == "empty.png":
        p.write_bytes(b"")
    elif kind in ("text.svs", "text.png"):
        p.write_text("this is not an image\n")
    elif kind == "truncated.svs":
        p.write_bytes((slides_dir / "cmu-1-small-region.svs").read_bytes()[:50_000])
    elif kind == "truncated.tif":
        data = (slides_dir / "kidney-48-5.tif").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "truncated.png":
        buf = tmp_path / "full.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf)
        p.write_bytes(buf.read_bytes()[:2000])
    elif kind == "float.tif":
        tifffile.imwrite(p, np.zeros((8, 8, 3), np.float32), photometric="rgb")
    elif kind == "multiplex.tif":
        tifffile.imwrite(
            p, np.zeros((8, 8, 5), np.uint8), photometric="minisblack", planarconfig="contig"
        )
    elif kind == "cmyk.tif":
        tifffile.imwrite(p, np.zeros((8, 8, 4), np.uint8), photometric="separated")
    elif kind == "int32.tif":
        tifffile.imwrite(p, np.zeros((8, 8), np.int32))
    return p


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing.svs", "not found"),
        ("a_directory.svs", "directory"),
        ("empty.png", "empty"),
        ("text.svs", "not recognise"),
        ("text.png", "not an image"),
        ("truncated.svs", "truncated"),
        ("truncated.tif", "truncated"),
        ("truncated.png", "truncated"),
        ("float.tif", "pixel type float32"),
        ("multiplex.tif", "not greyscale, RGB or RGBA"),
        ("cmyk.tif", "SEPARATED"),
        ("int32.tif", "pixel type int32"),
    ],
)
def test_bad_input_raises_one_line_error(tmp_path, data_dir, kind, reason):
    path = _write_bad(tmp_path, data_dir, kind)
    with pytest.raises(SlideReadError, match=reason) as info, Slide.open(path, scan_mpp=0.5) as s:
        s.thumbnail(8.0)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_pickle_reopens_instead_of_sending_handles(cmu, tmp_path):
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "p.png")
    for path, mpp in ((cmu, None), (tmp_path / "p.png", 2.0)):
        with Slide.open(path, scan_mpp=mpp) as s:
            blob = pickle.dumps(s)
            assert len(blob) < 1000  # no pixels or handles inside
            with pickle.loads(blob) as copy:
                assert copy.scan_mpp == s.scan_mpp and copy.size == s.size
                assert np.array_equal(
                    copy.read_region(5, 5, 8, 8, mpp=mpp or 1.0),
                    s.read_region(5, 5, 8, 8, mpp=mpp or 1.0),
                )

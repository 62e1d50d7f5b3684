"""Synthetic tissue-like images and pyramidal TIFFs for tests and benchmarks, written tile by
tile so a 20k x 20k slide never sits in memory; pixels are a seeded function of µm position."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from hmgdm_core.atomic import atomic_write

_BACKGROUND = np.array([244.0, 244.0, 246.0])
_STROMA = np.array([236.0, 172.0, 204.0])
_DENSE_STROMA = np.array([214.0, 118.0, 168.0])
_NUCLEUS = np.array([92.0, 62.0, 148.0])
# rgb = bg + t (stroma - bg) + t*shade (dense - stroma) + t*nuc (nucleus - stroma)
#       - t*nuc*shade (dense - stroma), with t tissue, shade and nuc in [0, 1].
_COLOURS = np.stack(
    [
        _BACKGROUND,
        _STROMA - _BACKGROUND,
        _DENSE_STROMA - _STROMA,
        _NUCLEUS - _STROMA,
        _STROMA - _DENSE_STROMA,
    ]
).astype(np.float32)  # (5, 3)
# (wavelength range in µm, number of plane waves): tissue islands, stroma shading, nuclei.
_FIELDS = {
    "tissue": ((400.0, 2500.0), 8),
    "shade": ((40.0, 160.0), 6),
    "nuclei": ((10.0, 14.0), 12),
}
_MAX_SUPERSAMPLE = 4


@functools.lru_cache(maxsize=8)
def _wave_params(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per field: x and y angular frequencies (rad/µm) and phases of its plane waves."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, ((lo, hi), k) in _FIELDS.items():
        wavelength = rng.uniform(lo, hi, k)
        angle = rng.uniform(0, np.pi, k)
        omega = 2 * np.pi / wavelength
        waves = (omega * np.cos(angle), omega * np.sin(angle), rng.uniform(0, 2 * np.pi, k))
        params[name] = tuple(v.astype(np.float32) for v in waves)
    return params


def _field(
    xs: np.ndarray, ys: np.ndarray, wx: np.ndarray, wy: np.ndarray, phase: np.ndarray
) -> np.ndarray:
    """Unit-variance sum of plane waves on the grid ys x xs, as one matmul:
    cos(a x + b y + c) = cos(a x + c) cos(b y) - sin(a x + c) sin(b y)."""
    k = wx.size
    ax = np.outer(wx, xs) + phase[:, None]  # (k, w)
    by = np.outer(ys, wy)  # (h, k)
    left = np.concatenate([np.cos(by), -np.sin(by)], axis=1)  # (h, 2k)
    right = np.concatenate([np.cos(ax), np.sin(ax)], axis=0)  # (2k, w)
    return (left @ right) * np.float32(np.sqrt(2.0 / k))  # (h, w)


def tissue_texture(
    x_um: float, y_um: float, w: int, h: int, *, mpp: float, seed: int = 0, supersample: int = 1
) -> np.ndarray:
    """(h, w, 3) uint8 synthetic H&E-like pixels of the region at (x_um, y_um) sampled at `mpp`.

    `supersample` s averages s x s samples per pixel (an s-times finer grid), so a level with
    downsample d <= 4 generated with s = d equals a box-downsample of level 0 up to rounding.
    """
    params = _wave_params(seed)
    s = supersample
    step = mpp / s
    xs = (x_um + (np.arange(w * s, dtype=np.float32) + 0.5) * step).astype(np.float32)
    ys = (y_um + (np.arange(h * s, dtype=np.float32) + 0.5) * step).astype(np.float32)
    tissue = np.clip((_field(xs, ys, *params["tissue"]) - 0.2) * 8.0, 0, 1)  # (h*s, w*s)
    if not tissue.any():  # most of a large slide is background: skip the colour work
        return np.broadcast_to(_COLOURS[0].round().astype(np.uint8), (h, w, 3)).copy()
    shade = np.clip(_field(xs, ys, *params["shade"]) * 0.35 + 0.5, 0, 1)
    nuclei = np.clip((_field(xs, ys, *params["nuclei"]) - 1.3) * 3.0, 0, 1)
    # The colour is linear in these products, so averaging them averages the colour.
    tn = tissue * nuclei
    feats = [tissue, tissue * shade, tn, tn * shade]
    if s > 1:
        feats = [f.reshape(h, s, w, s).mean(axis=(1, 3)) for f in feats]
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):  # per channel on (h, w) planes: faster than broadcasting over (h, w, 3)
        k = _COLOURS[:, c]
        rgb[..., c] = (
            k[0] + 0.5 + feats[0] * k[1] + feats[1] * k[2] + feats[2] * k[3] + feats[3] * k[4]
        )
    return rgb


def _level_tiles(
    width: int, height: int, downsample: int, *, mpp: float, tile: int, seed: int
) -> Iterator[np.ndarray]:
    supersample = min(downsample, _MAX_SUPERSAMPLE)
    level_mpp = mpp * downsample
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            # Edge tiles are shorter; tifffile pads them.
            tw, th = min(tile, width - tx), min(tile, height - ty)
            yield tissue_texture(
                tx * level_mpp,
                ty * level_mpp,
                tw,
                th,
                mpp=level_mpp,
                seed=seed,
                supersample=supersample,
            )


def write_pyramidal_tiff(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float,
    tile: int = 256,
    levels: int | None = None,
    seed: int = 0,
    compression: str = "jpeg",
    quality: int = 90,
    description: str | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF of synthetic tissue that OpenSlide reads as `generic-tiff`.

    Reduced levels (downsample 2, 4, ...) are separate pages with subfiletype=1 (OpenSlide
    ignores SubIFDs). `levels=None` adds levels until one fits in a single tile.
    The file is written next to `path` and moved into place when complete. `description` is
    the first page's ImageDescription (e.g. an Aperio header, which OpenSlide then reads as
    an Aperio slide with the header's properties).
    """
    path = Path(path)
    if levels is None:
        levels = 1
        while max(width, height) > tile * 2 ** (levels - 1):
            levels += 1
    compressionargs = {"level": quality} if compression == "jpeg" else None
    bigtiff = width * height * 3 > 2**31

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for level in range(levels):
                d = 2**level
                lw, lh = -(-width // d), -(-height // d)
                tw.write(
                    _level_tiles(lw, lh, d, mpp=mpp, tile=tile, seed=seed),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression=compression,
                    compressionargs=compressionargs,
                    resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if level == 0 else 1,
                    metadata=None,
                    description=description if level == 0 else None,
                )

    return atomic_write(path, write)


def write_dicom_wsi(
    folder: str | Path, width: int, height: int, *, mpp: float, tile: int = 256, seed: int = 0
) -> Path:
    """A DICOM whole-slide image of synthetic tissue, as OpenSlide 4 reads it: one file per
    pyramid level (downsample 1, 2, ...) in `folder`, one series, tiles stored uncompressed
    (VL Whole Slide Microscopy, TILED_FULL). Needs pydicom (a dev dependency)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    level, d = 0, 1
    while True:
        lw, lh = -(-width // d), -(-height // d)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.Modality = frame_of_ref, "SM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = lw, lh
        ds.TotalPixelMatrixFocalPlanes, ds.DimensionOrganizationType = 1, "TILED_FULL"
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1e3, height * mpp / 1e3
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [mpp * d / 1e3, mpp * d / 1e3]  # mm
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence, ds.NumberOfOpticalPaths = [path], 1
        frames = list(_level_tiles(lw, lh, d, mpp=mpp, tile=tile, seed=seed))
        padded = np.full((len(frames), tile, tile, 3), 255, np.uint8)  # edge tiles: white
        for i, f in enumerate(frames):
            padded[i, : f.shape[0], : f.shape[1]] = f
        ds.NumberOfFrames, ds.PixelData = len(frames), padded.tobytes()
        pydicom.dcmwrite(folder / f"level{level}.dcm", ds, enforce_file_format=True)
        if max(lw, lh) <= tile:
            return folder
        level, d = level + 1, d * 2

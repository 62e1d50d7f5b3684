"""Open whole-slide images (OpenSlide) and plain images (tifffile / Pillow) and read regions
at a target resolution in µm/px, choosing the pyramid level and area-averaging the rest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openslide
import tifffile
from PIL import Image, UnidentifiedImageError

from hmgdm_core.exceptions import SlideReadError

# File resolutions outside this range are DPI defaults (72/96/300 dpi), not microscopy.
PLAUSIBLE_MPP = (0.01, 50.0)
# A level whose downsample exceeds the request by less than this still counts as "not coarser":
# scanners store downsamples like 2.0005 for a nominal 2x level.
_LEVEL_SLACK = 1.01
# Level pixels per side decoded at once, so a huge read (a thumbnail of a single-level WSI)
# never holds more than one chunk of the source level in memory.
_CHUNK_PX = 2048
# Plain (non-pyramidal) images are decoded whole; beyond this they need a pyramidal file.
MAX_PLAIN_PIXELS = 2**27
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Extensions only whole-slide formats use: if OpenSlide does not recognise such a file it is
# damaged, and decoding it as a plain image would only hide that.
WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
# µm/px = OBJECTIVE_UM / objective power when a slide records only its magnification: the
# usual scanner optics (40x ~ 0.25 µm/px, 20x ~ 0.5 µm/px); real scanners differ by up to ~10%.
OBJECTIVE_UM = 10.0
# Where a slide's base resolution came from.
MppSource = Literal["override", "file", "objective_power"]


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 straight alpha -> (h, w, 3) uint8 over a white background."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _to_rgb_uint8(arr: np.ndarray, path: Path, *, min_is_white: bool = False) -> np.ndarray:
    """Greyscale / grey+alpha / RGB / RGBA, 8- or 16-bit -> (h, w, 3) uint8 RGB, alpha on white."""
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise SlideReadError(path, f"unsupported pixel type {arr.dtype}; expected 8- or 16-bit")
    if arr.ndim == 2:
        arr = arr[..., None]
    if min_is_white:  # only the grey sample; an alpha sample keeps its meaning
        arr = np.concatenate([255 - arr[..., :1], arr[..., 1:]], axis=-1)
    channels = arr.shape[2] if arr.ndim == 3 else -1
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 2:
        return _composite_on_white(arr[..., [0, 0, 0, 1]])
    if channels == 3:
        return np.ascontiguousarray(arr)
    if channels == 4:
        return _composite_on_white(arr)
    raise SlideReadError(
        path, f"image of shape {arr.shape} is not greyscale, RGB or RGBA (multiplex not supported)"
    )


class _OpenSlideLevels:
    """Pyramid levels read through OpenSlide; pixels outside the slide come back white."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideReadError(path, f"OpenSlide cannot open it: {err}") from None
        self.dims: list[tuple[int, int]] = [tuple(d) for d in self.osr.level_dimensions]
        self.downsamples: list[float] = [float(d) for d in self.osr.level_downsamples]

    def _number(self, key: str) -> float | None:
        try:
            return float(self.osr.properties[key])
        except (KeyError, ValueError):
            return None

    def file_mpp(self) -> float | None:
        return self._number(openslide.PROPERTY_NAME_MPP_X)

    def metadata(self) -> dict[str, Any]:
        return {
            "vendor": self.osr.properties.get(openslide.PROPERTY_NAME_VENDOR),
            "objective_power": self._number(openslide.PROPERTY_NAME_OBJECTIVE_POWER),
            "mpp_x": self._number(openslide.PROPERTY_NAME_MPP_X),
            "mpp_y": self._number(openslide.PROPERTY_NAME_MPP_Y),
        }

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 from `level` at level-pixel offset (x, y)."""
        ds = self.downsamples[level]
        try:
            region = self.osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except openslide.OpenSlideError as err:
            raise SlideReadError(self.path, f"cannot read pixels (truncated?): {err}") from None
        return _composite_on_white(np.asarray(region))

    def close(self) -> None:
        self.osr.close()


class _ArrayLevels:
    """A plain image decoded once into memory: a one-level pyramid."""

    def __init__(self, path: Path, rgb: np.ndarray, backend: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.rgb = rgb  # (height, width, 3) uint8
        self.backend = backend
        self._meta = meta
        self.dims = [(rgb.shape[1], rgb.shape[0])]
        self.downsamples = [1.0]

    def file_mpp(self) -> float | None:
        return self._meta.get("file_mpp")

    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        height, width = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.rgb[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self.rgb = np.empty((0, 0, 3), np.uint8)


def _check_plain_size(path: Path, width: int, height: int) -> None:
    if width == 0 or height == 0:
        raise SlideReadError(path, f"image has zero size ({width}x{height})")
    if width * height > MAX_PLAIN_PIXELS:
        raise SlideReadError(
            path,
            f"plain image of {width}x{height} px is too large to decode whole; "
            "convert it to a pyramidal TIFF",
        )


def _tiff_mpp(page: tifffile.TiffPage) -> float | None:
    tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    unit_um = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value) if unit else 2)
    if tag is None or unit_um is None:
        return None
    if not (isinstance(tag.value, tuple) and len(tag.value) == 2 and all(tag.value)):
        return None
    num, den = tag.value
    return unit_um * den / num


def _read_tifffile(path: Path) -> _ArrayLevels:
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise SlideReadError(path, "TIFF holds no readable image (truncated?)")
            page = tif.pages.first
            height, width = page.imagelength, page.imagewidth
            _check_plain_size(path, width, height)
            photometric = int(page.photometric)
            if photometric not in (0, 1, 2):  # MINISWHITE, MINISBLACK, RGB
                name = tifffile.PHOTOMETRIC(photometric).name
                raise SlideReadError(
                    path, f"TIFF photometric {name} is not supported; convert to RGB"
                )
            arr = page.asarray()
            file_mpp = _tiff_mpp(page)
    except SlideReadError:
        raise
    except Exception as err:  # tifffile raises many types (ValueError, struct.error, ...)
        detail = str(err) or type(err).__name__
        raise SlideReadError(path, f"unreadable or truncated TIFF: {detail}") from None
    rgb = _to_rgb_uint8(arr, path, min_is_white=photometric == 0)
    return _ArrayLevels(path, rgb, "tifffile", {"format": "tiff", "file_mpp": file_mpp})


def _read_pillow(path: Path) -> _ArrayLevels:
    try:
        with Image.open(path) as img:
            _check_plain_size(path, *img.size)
            img.load()
            fmt, dpi = img.format, img.info.get("dpi")
            if img.mode.startswith("I;16"):
                rgb = _to_rgb_uint8(np.asarray(img).astype(np.uint16), path)
            elif img.mode in ("I", "F"):
                raise SlideReadError(path, f"{img.mode}-mode (32-bit) images are not supported")
            elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgb = _composite_on_white(np.asarray(img.convert("RGBA")))
            else:
                rgb = np.asarray(img.convert("RGB"))
    except SlideReadError:
        raise
    except UnidentifiedImageError:
        raise SlideReadError(path, "not an image, or an unsupported format") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise SlideReadError(path, f"unreadable or truncated image: {err}") from None
    file_mpp = 25_400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None
    meta = {"format": (fmt or "unknown").lower(), "file_mpp": file_mpp}
    return _ArrayLevels(path, rgb, "pillow", meta)


def _open_levels(path: Path) -> _OpenSlideLevels | _ArrayLevels:
    if not path.exists():
        raise SlideReadError(path, "file not found")
    if path.is_dir():
        raise SlideReadError(path, "is a directory, not a slide or image file")
    if path.stat().st_size == 0:
        raise SlideReadError(path, "file is empty (0 bytes)")
    if openslide.OpenSlide.detect_format(str(path)) is not None:
        return _OpenSlideLevels(path)
    if path.suffix.lower() in WSI_SUFFIXES:
        raise SlideReadError(
            path, f"OpenSlide does not recognise this {path.suffix} file (truncated or corrupt?)"
        )
    with path.open("rb") as fh:
        is_tiff = fh.read(4) in _TIFF_MAGIC
    return _read_tifffile(path) if is_tiff else _read_pillow(path)


def _snap(v: float) -> float:
    """Remove float noise so integer-aligned reads stay exact copies."""
    r = round(v)
    return float(r) if abs(v - r) < 1e-6 else v


class Slide:
    """A slide or image opened for reading regions in µm coordinates at any resolution.

    `scan_mpp` is the µm/px of its full-resolution image: given, the file's own, or assumed from
    the objective power (`mpp_source`). Open one per worker process; pickling re-opens the file
    by path instead of sending handles.
    """

    def __init__(
        self,
        path: Path,
        levels: _OpenSlideLevels | _ArrayLevels,
        scan_mpp: float,
        mpp_source: MppSource,
    ) -> None:
        self.path = path
        self.slide_id = path.stem
        self._levels = levels
        self._mpp_override = scan_mpp if mpp_source == "override" else None
        self.scan_mpp = scan_mpp
        self.mpp_source: MppSource = mpp_source
        self.size: tuple[int, int] = levels.dims[0]
        self.backend: str = levels.backend
        self.metadata: dict[str, Any] = {
            **levels.metadata(),
            "backend": levels.backend,
            "base_mpp": scan_mpp,  # the archive key of caches already built
            "mpp_source": mpp_source,
            "level_count": len(levels.dims),
            "level_dimensions": [list(d) for d in levels.dims],
            "level_downsamples": list(levels.downsamples),
        }

    @property
    def mpp_warning(self) -> str:
        """What a user must hear when the resolution is an assumption, else ""."""
        if self.mpp_source != "objective_power":
            return ""
        power = self.metadata["objective_power"]
        return (
            f"{self.path}: no microns-per-pixel in the file; assuming {self.scan_mpp:g} µm/px "
            f"from its {power:g}x objective ({OBJECTIVE_UM:g} µm / objective power); if that is "
            "wrong pass --mpp or give the slide an mpp in a slides.csv"
        )

    @classmethod
    def open(cls, path: str | Path, *, scan_mpp: float | None = None) -> Slide:
        """Open `path`; `scan_mpp` (µm/px of the full-resolution image) overrides the file's."""
        path = Path(path)
        if scan_mpp is not None and not (math.isfinite(scan_mpp) and scan_mpp > 0):
            raise SlideReadError(path, f"invalid mpp {scan_mpp}: must be a positive number")
        levels = _open_levels(path)
        if scan_mpp is not None:
            return cls(path, levels, float(scan_mpp), "override")
        if (file_mpp := _plausible(levels.file_mpp())) is not None:
            return cls(path, levels, file_mpp, "file")
        power = levels.metadata().get("objective_power")
        if power is not None and _plausible(OBJECTIVE_UM / power) is not None:
            return cls(path, levels, OBJECTIVE_UM / power, "objective_power")
        levels.close()
        raise SlideReadError(
            path, "no microns-per-pixel or objective power in the file; pass --mpp"
        )

    def __reduce__(self) -> tuple:
        return (_reopen, (str(self.path), self._mpp_override))

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.size
        return f"Slide({self.slide_id!r}, {w}x{h} px, {self.scan_mpp:g} µm/px, {self.backend})"

    @property
    def size_um(self) -> tuple[float, float]:
        """(width, height) of the slide in µm."""
        return (self.size[0] * self.scan_mpp, self.size[1] * self.scan_mpp)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) in pixels of the whole slide at `mpp`."""
        scale = self.scan_mpp / mpp
        return (max(1, round(self.size[0] * scale)), max(1, round(self.size[1] * scale)))

    def level_for(self, mpp: float) -> int:
        """The finest pyramid level that is no finer than needed for `mpp` (never upsample)."""
        want = mpp / self.scan_mpp
        ok = [i for i, d in enumerate(self._levels.downsamples) if d <= want * _LEVEL_SLACK]
        return max(ok, key=lambda i: self._levels.downsamples[i], default=0)

    def read_region(self, x_um: float, y_um: float, w: int, h: int, *, mpp: float) -> np.ndarray:
        """(h, w, 3) uint8 RGB at `mpp` whose top-left is (x_um, y_um); white outside the slide."""
        if w < 1 or h < 1 or not mpp > 0:
            raise ValueError(f"read_region needs w, h >= 1 and mpp > 0, got {w}, {h}, {mpp}")
        level = self.level_for(mpp)
        level_ds = self._levels.downsamples[level]
        scale = mpp / self.scan_mpp / level_ds  # level pixels per output pixel
        fx, fy = x_um / self.scan_mpp / level_ds, y_um / self.scan_mpp / level_ds
        step = max(1, int(_CHUNK_PX / max(scale, 1.0)))  # output pixels per chunk side
        if w <= step and h <= step:
            return self._read_resampled(level, fx, fy, w, h, scale)
        out = np.empty((h, w, 3), dtype=np.uint8)
        for oy in range(0, h, step):
            for ox in range(0, w, step):
                cw, ch = min(step, w - ox), min(step, h - oy)
                out[oy : oy + ch, ox : ox + cw] = self._read_resampled(
                    level, fx + ox * scale, fy + oy * scale, cw, ch, scale
                )
        return out

    def _read_resampled(
        self, level: int, fx: float, fy: float, w: int, h: int, scale: float
    ) -> np.ndarray:
        """Area-average (BOX) when shrinking, bilinear when enlarging; exact copy when aligned."""
        fx, fy, fx1, fy1 = _snap(fx), _snap(fy), _snap(fx + w * scale), _snap(fy + h * scale)
        # One pixel of margin so the bilinear kernel sees real neighbours at chunk borders.
        ix0, iy0 = math.floor(fx) - 1, math.floor(fy) - 1
        ix1, iy1 = math.ceil(fx1) + 1, math.ceil(fy1) + 1
        if abs(scale - 1.0) < 1e-9 and fx == int(fx) and fy == int(fy):
            return self._levels.read(level, int(fx), int(fy), w, h)
        patch = self._levels.read(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        box = (fx - ix0, fy - iy0, fx1 - ix0, fy1 - iy0)
        return np.asarray(Image.fromarray(patch).resize((w, h), resample=_filter(scale), box=box))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at `mpp` (a low resolution), read from the best pyramid level."""
        return self.read_region(0.0, 0.0, *self.size_at(mpp), mpp=mpp)

    def close(self) -> None:
        """Release the file handle and any decoded pixels."""
        self._levels.close()


def _filter(scale: float) -> Image.Resampling:
    """Area-average (BOX) when shrinking (`scale` source pixels per output pixel > 1), bilinear
    when enlarging."""
    return Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR


def rescale(rgb: np.ndarray, array_mpp: float, target_mpp: float) -> np.ndarray:
    """An (h, w, 3) uint8 image sampled at `array_mpp` resampled to `target_mpp` as
    `Slide.read_region` resamples (the same array when they are equal)."""
    if math.isclose(array_mpp, target_mpp):
        return rgb
    scale = target_mpp / array_mpp
    h, w = rgb.shape[:2]
    size = (max(1, round(w / scale)), max(1, round(h / scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, resample=_filter(scale)))


def _reopen(path: str, scan_mpp: float | None) -> Slide:
    return Slide.open(path, scan_mpp=scan_mpp)

"""H&E stain handling: Macenko and Reinhard estimation and normalisation (graph building) and
HED stain jitter (an augmentation for pretraining). Pure numpy / torch, no I/O.

Optical density OD = -ln(I / I0). Macenko et al. (2009): the stain vectors of a slide span the
plane of its tissue pixels' OD; the two extreme angles in that plane are haematoxylin and eosin.
Normalising maps each pixel's stain concentrations from the slide's vectors and 99th-percentile
concentrations onto a reference's. Reinhard et al. (2001): each CIELAB channel of the slide is
shifted and scaled so its tissue's mean and std match a reference's. Jitter (Tellez et al.
2018) scales and shifts each stain's concentration in Ruifrok & Johnston's HED space.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from skimage.color import hed_from_rgb, lab2rgb, rgb2lab, rgb_from_hed  # Ruifrok & Johnston's

# Background (glass) intensity of Macenko's method and the reference stain below.
I0 = 240.0
# A reference H&E appearance widely used with Macenko's method: stain OD vectors (columns:
# haematoxylin, eosin) and their 99th-percentile concentrations.
REFERENCE_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_C = np.array([1.9705, 1.0308])


@dataclass(frozen=True)
class StainBasis:
    """A slide's stains: OD vectors (3, 2) of haematoxylin and eosin, and the 99th percentile
    (2,) of each stain's concentration over the tissue it was estimated on."""

    he: np.ndarray
    max_c: np.ndarray

    def as_dict(self) -> dict:
        return {"he": self.he.tolist(), "max_c": self.max_c.tolist()}


REFERENCE = StainBasis(REFERENCE_HE, REFERENCE_MAX_C)


@dataclass(frozen=True)
class LabStats:
    """A slide's colour for Reinhard's method: mean and std (3,) of CIELAB L, a, b over the
    tissue it was estimated on."""

    mean: np.ndarray
    std: np.ndarray

    def as_dict(self) -> dict:
        return {"lab_mean": self.mean.tolist(), "lab_std": self.std.tolist()}


# Reinhard's reference: the tissue of 24 Kather et al. (2016) colorectal H&E tiles (4 of each of
# tumour, stroma, complex stroma, lymphocytes, debris, mucosa), pooled.
REFERENCE_LAB = LabStats(np.array([40.30, 30.82, -9.93]), np.array([19.51, 11.31, 10.21]))

# A slide's stain estimate: Macenko's basis or Reinhard's colour statistics.
SlideStains = StainBasis | LabStats
STAIN_NORMS = ("macenko", "reinhard")


def optical_density(rgb: np.ndarray, *, i0: float = I0) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) float64 OD = -ln((I + 1) / i0) (values above i0 clip
    to 0; with i0 = 256 none do, and `rgb_from_optical_density` inverts it exactly)."""
    return np.maximum(-np.log((rgb.astype(np.float64) + 1.0) / i0), 0.0)


def rgb_from_optical_density(od: np.ndarray, *, i0: float = I0) -> np.ndarray:
    """(..., 3) OD -> (..., 3) uint8 RGB, the inverse of `optical_density` (rounded, clipped)."""
    return np.clip(np.rint(i0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def estimate_stains(
    rgb: np.ndarray, *, od_threshold: float = 0.15, angle_percentile: float = 1.0
) -> StainBasis | None:
    """Macenko's H&E basis from the tissue pixels of `rgb` (any shape (..., 3) uint8).

    Pixels with OD below `od_threshold` in any channel (glass, faint tissue) are ignored;
    returns None when fewer than 100 pixels remain or the OD has no 2-D spread (one colour).
    """
    od = optical_density(rgb.reshape(-1, 3))
    od = od[(od > od_threshold).all(axis=1)]  # (n, 3)
    if len(od) < 100:
        return None
    # The OD plane: the two leading eigenvectors of the covariance (eigh sorts ascending).
    _, vectors = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vectors[:, 1:3]  # (3, 2)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # OD vectors point positive
    projected = od @ plane  # (n, 2)
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(angle, [angle_percentile, 100 - angle_percentile])
    if hi - lo < 1e-3:
        return None
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin is the bluer stain: the larger red OD share (it absorbs red light).
    he = np.stack([v_lo, v_hi], axis=1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], axis=1)
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]  # (2, n)
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(max_c > 1e-6):
        return None
    return StainBasis(he, max_c)


def lab_stats(rgb: np.ndarray, *, od_threshold: float = 0.15) -> LabStats | None:
    """Reinhard's statistics of the tissue pixels of `rgb` (any shape (..., 3) uint8).

    Tissue = OD above `od_threshold` in *any* channel (glass is below it in all three): unlike
    Macenko's every-channel rule it keeps pale eosin and tissue that hardly absorbs blue (LC25000
    keeps 96% of its pixels, not 19%). None when fewer than 100 pixels remain.
    """
    pixels = rgb.reshape(-1, 3)
    pixels = pixels[(optical_density(pixels) > od_threshold).any(axis=1)]
    if len(pixels) < 100:
        return None
    lab = rgb2lab(pixels[None])[0]  # (n, 3)
    return LabStats(lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-6))


def reinhard(rgb: np.ndarray, source: LabStats, target: LabStats = REFERENCE_LAB) -> np.ndarray:
    """`rgb` (..., 3) uint8 with each CIELAB channel moved from `source`'s mean and std to
    `target`'s (every pixel by the same map, glass included, so nothing jumps at tissue edges)."""
    shape = rgb.shape
    lab = rgb2lab(rgb.reshape(-1, 1, 3))
    lab = (lab - source.mean) * (target.std / source.std) + target.mean
    with warnings.catch_warnings():  # colours outside sRGB clip, which lab2rgb warns about
        warnings.simplefilter("ignore", UserWarning)
        out = lab2rgb(lab)
    return np.rint(out * 255).astype(np.uint8).reshape(shape)


def estimate(method: str, rgb: np.ndarray) -> SlideStains | None:
    """The slide's stains for normaliser `method` (one of STAIN_NORMS) from its tissue pixels;
    None when there is too little stained tissue."""
    if method == "macenko":
        return estimate_stains(rgb)
    if method == "reinhard":
        return lab_stats(rgb)
    raise ValueError(f"unknown stain normalisation {method!r}; choose one of {STAIN_NORMS}")


def normalize(rgb: np.ndarray, stains: SlideStains) -> np.ndarray:
    """`rgb` (..., 3) uint8 mapped onto the reference by the normaliser `stains` came from."""
    if isinstance(stains, LabStats):
        return reinhard(rgb, stains)
    return normalize_stains(rgb, stains)


def normalize_stains(
    rgb: np.ndarray, source: StainBasis, target: StainBasis = REFERENCE
) -> np.ndarray:
    """`rgb` (..., 3) uint8 re-rendered with `target`'s stains: each pixel's H and E
    concentrations under `source` are rescaled to `target`'s percentiles and recombined."""
    shape = rgb.shape
    od = optical_density(rgb.reshape(-1, 3))  # (n, 3)
    conc = od @ np.linalg.pinv(source.he).T  # (n, 2)
    conc = conc * (target.max_c / source.max_c)
    out = I0 * np.exp(-(conc @ target.he.T))  # (n, 3)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape)


def hed_jitter(
    images: torch.Tensor,
    *,
    scale: float = 0.05,
    shift: float = 0.05,
    groups: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random H&E stain variation of (N, 3, H, W) images (uint8 0-255, or float 0-1).

    Each image's haematoxylin, eosin and DAB concentrations become c * a + b with a ~ U(1 -
    scale, 1 + scale) and b ~ U(-shift, shift) per stain (Tellez et al.'s "HED-light" is 0.05).
    `groups` (N,) int gives images that share one draw (e.g. the entities of one tile, as one
    slide has one staining); default: every image its own. Returns the input's dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    groups = torch.arange(n, device=images.device) if groups is None else groups.long()
    k = int(groups.max()) + 1 if n else 0
    draw = torch.rand((2, k, 3), generator=generator, dtype=torch.float64)
    a = (1 + scale * (2 * draw[0] - 1)).to(images.device)[groups]  # (N, 3)
    b = (shift * (2 * draw[1] - 1)).to(images.device)[groups]  # (N, 3)
    floating = images.dtype.is_floating_point
    x = images.double() if floating else images.double() / 255.0
    # skimage.color.rgb2hed's convention (OD in units of -ln(1e-6)), without its clipping of
    # negative concentrations, so zero jitter returns the image unchanged.
    log_adjust = np.log(1e-6)
    od = torch.log(x.clamp_min(1e-6)) / log_adjust  # (N, 3, H, W)
    to_hed = torch.as_tensor(hed_from_rgb, device=images.device)
    stains = torch.einsum("nchw,cs->nshw", od, to_hed)
    stains = stains * a[:, :, None, None] + b[:, :, None, None]
    to_rgb = torch.as_tensor(rgb_from_hed, device=images.device)
    out = torch.exp(torch.einsum("nshw,sc->nchw", stains, to_rgb) * log_adjust).clamp(0, 1)
    if floating:
        return out.to(images.dtype)
    return torch.round(out * 255).to(images.dtype)

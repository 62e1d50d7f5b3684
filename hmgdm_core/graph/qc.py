"""Quality-control images of a graph build: per slide, which tissue was found, which tiles
became graphs and how many entities each holds; per run, a contact sheet of those images.

Drawn with Pillow and numpy (no matplotlib figure per slide): a tile dataset of thousands of
images gets its QC in seconds.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_dilation
from skimage.segmentation import find_boundaries

from hmgdm_core.atomic import atomic_write

PANEL_PX = 560  # longer side of each of the two panels
MAX_ENLARGE = 2.0
SHEET_CELL_PX = 640  # width of one slide in the contact sheet
SHEET_MAX_SLIDES = 48
KEPT, LOW_TISSUE, FEW_ENTITIES = "kept", "low tissue", "too few entities"
TISSUE_RGB = (0, 200, 0)  # green: no stain produces it, so it reads on pink and purple
KEPT_RGB = (30, 90, 255)
DROPPED_RGB = (230, 20, 20)
ENTITY_RGB = (255, 230, 0)
HEAT = colormaps["viridis"]


@dataclass
class SlideQC:
    """What one slide's QC image shows; filled in while the slide is built."""

    slide_id: str
    thumbnail: np.ndarray | None = None  # (h, w, 3) uint8 at thumb_mpp
    thumb_mpp: float = 1.0
    mask: np.ndarray | None = None  # (mh, mw) bool tissue mask at mask_mpp
    mask_mpp: float = 1.0
    tile_um: tuple[float, float] = (0.0, 0.0)  # (width, height) of a tile (the whole region)
    tiles: list[tuple[float, float, str, int]] = field(default_factory=list)  # x, y µm, status, n
    scan_mpp: float = 0.0
    error: str = ""
    enabled: bool = True  # False: callers skip the QC-only work (the extra thumbnail read)
    # A single-region image: its superpixel labels (entity index, -1 none) at thumb_mpp, drawn
    # as entity outlines instead of a one-tile heat layer.
    labels: np.ndarray | None = None

    def add_tile(self, x_um: float, y_um: float, status: str, entities: int = 0) -> None:
        self.tiles.append((float(x_um), float(y_um), status, int(entities)))


@functools.lru_cache(maxsize=8)
def label_font(size: int) -> ImageFont.ImageFont:
    # DejaVu Sans ships with matplotlib and has µ and ², which Pillow's default font lacks.
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _panel_scale(qc: SlideQC) -> float:
    """Panel pixels per thumbnail pixel: large thumbnails shrink to PANEL_PX, small images are
    enlarged (at most MAX_ENLARGE times, which keeps a tile dataset's QC files small)."""
    h, w = qc.thumbnail.shape[:2]
    return min(PANEL_PX / max(h, w), MAX_ENLARGE)


def _resized(qc: SlideQC, scale: float) -> Image.Image:
    h, w = qc.thumbnail.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return Image.fromarray(qc.thumbnail).resize(size, Image.Resampling.LANCZOS)


def _tissue_outline(qc: SlideQC, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the tissue mask's border at panel resolution, 2 px wide."""
    mask = Image.fromarray(qc.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    edge = find_boundaries(np.asarray(mask) > 0, mode="inner")
    return binary_dilation(edge, iterations=1)


def _tile_boxes(qc: SlideQC, scale: float) -> list[tuple[tuple[int, int, int, int], str, int]]:
    px = scale / qc.thumb_mpp  # panel px per µm
    tw, th = qc.tile_um
    return [
        ((round(x * px), round(y * px), round((x + tw) * px) - 1, round((y + th) * px) - 1), s, n)
        for x, y, s, n in qc.tiles
    ]


def _tiles_panel(qc: SlideQC, base: Image.Image, scale: float) -> Image.Image:
    """Thumbnail, tissue outline, kept tiles outlined blue, dropped tiles tinted red."""
    img = base.convert("RGBA")
    tint = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    boxes = _tile_boxes(qc, scale)
    for box, status, _ in boxes:
        if status != KEPT:
            draw.rectangle(box, fill=(*DROPPED_RGB, 70))
    img = Image.alpha_composite(img, tint).convert("RGB")
    if qc.mask is not None:
        rgb = np.asarray(img).copy()
        rgb[_tissue_outline(qc, img.size)] = TISSUE_RGB
        img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for box, status, _ in boxes:
        kept = status == KEPT
        draw.rectangle(box, outline=KEPT_RGB if kept else DROPPED_RGB, width=1 if kept else 2)
    return img


def _heat_panel(qc: SlideQC, base: Image.Image, scale: float, vmax: int) -> Image.Image:
    """Entities per kept tile as a colour layer over a pale grey thumbnail."""
    grey = np.asarray(base.convert("L"), dtype=np.float32)
    pale = (155 + grey * 0.39).astype(np.uint8)  # keep the tissue visible under the colours
    img = Image.fromarray(np.stack([pale] * 3, axis=-1)).convert("RGBA")
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    boxes = [b for b in _tile_boxes(qc, scale) if b[1] == KEPT]
    for box, _, n in boxes:
        r, g, b, _ = HEAT(n / max(vmax, 1))
        draw.rectangle(box, fill=(round(255 * r), round(255 * g), round(255 * b), 190))
    img = Image.alpha_composite(img, layer).convert("RGB")
    # Counts are written in when tiles are large enough to hold them.
    side = min((b[0][2] - b[0][0]) for b in boxes) if boxes else 0
    if boxes and side >= 34:
        draw, font = ImageDraw.Draw(img), label_font(max(10, min(16, side // 3)))
        for (x0, y0, x1, y1), _, n in boxes:
            r, g, b, _ = HEAT(n / max(vmax, 1))
            ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else (255, 255, 255)
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), str(n), fill=ink, font=font, anchor="mm")
    return img


def _entities_panel(qc: SlideQC, base: Image.Image) -> Image.Image:
    """The image with every entity's superpixel outline."""
    labels = Image.fromarray(qc.labels.astype(np.int32)).resize(base.size, Image.Resampling.NEAREST)
    edge = find_boundaries(np.asarray(labels), mode="inner")
    rgb = np.asarray(base.convert("RGB")).copy()
    rgb[edge] = ENTITY_RGB
    return Image.fromarray(rgb)


def _colour_bar(height: int, vmax: int) -> Image.Image:
    """A vertical colour scale, 0 at the bottom and `vmax` at the top, labelled above."""
    bar = Image.new("RGB", (78, height), "white")
    draw, font = ImageDraw.Draw(bar), label_font(12)
    draw.text((4, 0), "entities", fill="black", font=font)
    draw.text((4, 14), "per tile", fill="black", font=font)
    top, bottom = 36, height - 8
    ramp = HEAT(np.linspace(1, 0, bottom - top))[:, :3]  # (h, 3), top = max
    strip = (np.repeat(ramp[:, None, :], 14, axis=1) * 255).astype(np.uint8)
    bar.paste(Image.fromarray(strip), (4, top))
    draw.text((22, top), str(vmax), fill="black", font=font, anchor="lt")
    draw.text((22, bottom), "0", fill="black", font=font, anchor="lb")
    return bar


def _summary(qc: SlideQC) -> str:
    kept = [n for _, _, s, n in qc.tiles if s == KEPT]
    low = sum(s == LOW_TISSUE for _, _, s, _ in qc.tiles)
    few = sum(s == FEW_ENTITIES for _, _, s, _ in qc.tiles)
    what = "tiles" if len(qc.tiles) != 1 or qc.tile_um[0] != qc.tile_um[1] else "tile"
    parts = [f"{len(kept)} {what} kept ({sum(kept):,} entities)"]
    if low:
        parts.append(f"{low} dropped: tissue below min_tile_fraction")
    if few:
        parts.append(f"{few} dropped: fewer than 2 entities")
    return "; ".join(parts)


def render_slide_qc(qc: SlideQC) -> Image.Image:
    """The QC image of one slide: tiles (left) and entities (right: per-tile counts, or the
    superpixel outlines of a single-region image), with legends; failures show the reason."""
    font, bold = label_font(14), label_font(17)
    if qc.thumbnail is None:
        return _text_card(qc.slide_id, qc.error or "no image")
    scale = _panel_scale(qc)
    base = _resized(qc, scale)
    kept = [n for _, _, s, n in qc.tiles if s == KEPT]
    left, right, bar, right_title = _tiles_panel(qc, base, scale), None, None, ""
    if qc.labels is not None:
        right, right_title = _entities_panel(qc, base), "entities (superpixel outlines)"
    elif kept:
        right = _heat_panel(qc, base, scale, max(kept))
        right_title, bar = "entities per kept tile (colour)", _colour_bar(left.height, max(kept))
    gap, foot = 12, 30
    width = left.width + 2 * gap + (right.width + gap if right else 0) + (bar.width if bar else 0)
    h, w = qc.thumbnail.shape[:2]
    full = f"{w * qc.thumb_mpp / 1000:.2f} x {h * qc.thumb_mpp / 1000:.2f} mm"
    scan = f", scanned at {qc.scan_mpp:g} µm/px" if qc.scan_mpp else ""
    title = f"{qc.slide_id}  ({full}{scan})"
    width = max(width, 480, round(bold.getlength(title)) + 2 * gap)
    status = textwrap.wrap(qc.error or _summary(qc), max(40, width // 8))
    head = 34 + 18 * len(status) + 6
    sheet = Image.new("RGB", (width, head + left.height + foot), "white")
    sheet.paste(left, (gap, head))
    if right is not None:
        sheet.paste(right, (2 * gap + left.width, head))
    if bar is not None:
        sheet.paste(bar, (2 * gap + left.width + right.width + gap // 2, head))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 6), title, fill="black", font=bold)
    for i, line in enumerate(status):
        colour = DROPPED_RGB if qc.error else (40, 40, 40)
        draw.text((gap, 32 + 18 * i), line, fill=colour, font=font)
    y, x = head + left.height + 8, gap
    for colour, label in (
        (TISSUE_RGB, "tissue outline"),
        (KEPT_RGB, "tile -> graph"),
        (DROPPED_RGB, "tile dropped"),
    ):
        draw.rectangle((x, y + 2, x + 14, y + 14), outline=colour, width=3)
        draw.text((x + 20, y), label, fill="black", font=font)
        x += 30 + round(draw.textlength(label, font=font))
    if right is not None:
        draw.text((2 * gap + left.width, y), right_title, fill="black", font=font)
    return sheet


def _text_card(title: str, text: str, width: int = 600) -> Image.Image:
    lines = [title, *textwrap.wrap(text, 70)]
    card = Image.new("RGB", (width, 30 + 22 * len(lines)), "white")
    draw = ImageDraw.Draw(card)
    for i, line in enumerate(lines):
        colour = "black" if i == 0 else DROPPED_RGB
        draw.text((12, 10 + 22 * i), line, fill=colour, font=label_font(17 if i == 0 else 14))
    return card


def save_png(path: Path, image: Image.Image) -> Path:
    """Write `image` as PNG atomically."""
    # Level 1: a fifth of the default's time for ~15% more bytes (thousands of tiles per run).
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


def qc_path(qc_dir: Path, slide_id: str) -> Path:
    """Where a slide's QC image lives (ids with `/` give nested folders, as in graphs/)."""
    return Path(qc_dir) / f"{slide_id}.png"


def contact_sheet(
    images: Sequence[tuple[str, Path | None, str]], *, title: str, columns: int = 3
) -> Image.Image:
    """One image of many slides' QC: `images` are (slide id, QC png or None, error), failed
    slides first; at most SHEET_MAX_SLIDES are shown and the title says how many."""
    ordered = sorted(images, key=lambda t: (not t[2], t[0]))
    shown = ordered[:SHEET_MAX_SLIDES]
    cells = []
    for slide_id, png, error in shown:
        if png is not None and png.is_file():
            with Image.open(png) as im:
                cell = im.convert("RGB")
        else:
            cell = _text_card(slide_id, error or "no QC image")
        ratio = SHEET_CELL_PX / cell.width
        cells.append(
            cell.resize((SHEET_CELL_PX, max(1, round(cell.height * ratio))), Image.LANCZOS)
        )
    columns = max(1, min(columns, len(cells)))
    rows = math.ceil(len(cells) / columns) if cells else 0
    row_h = [max(c.height for c in cells[r * columns : (r + 1) * columns]) for r in range(rows)]
    gap, head = 10, 40
    sheet = Image.new(
        "RGB",
        (columns * (SHEET_CELL_PX + gap) + gap, head + sum(row_h) + gap * (rows + 1)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    more = f" (showing {len(shown)}: failed first, then by id)" if len(images) > len(shown) else ""
    draw.text((gap, 10), f"{title}{more}", fill="black", font=label_font(18))
    y = head
    for r in range(rows):
        for c, cell in enumerate(cells[r * columns : (r + 1) * columns]):
            sheet.paste(cell, (gap + c * (SHEET_CELL_PX + gap), y))
        y += row_h[r] + gap
    return sheet

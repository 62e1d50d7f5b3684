"""A cached slide's entities as GeoJSON that QuPath (0.4+), QuPath-based tools and GIS
libraries read: one detection per entity, outlined from its stored superpixel label image (a
point at its centroid for caches built before those were stored), in level-0 pixels of the
slide, with measurements (descriptors, and importance when explaining a prediction).

Also draws such a file back onto the slide thumbnail: what QuPath would show, from the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy.ndimage import find_objects
from skimage.measure import find_contours
from torch_geometric.data import Data

from hmgdm_core.atomic import atomic_write
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.graph.cache import built_mpp
from hmgdm_core.graph.qc import label_font

# Descriptors a pathologist can read, exported as QuPath measurements when the cache has them.
MEASUREMENTS = {
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "od_h_mean": "Haematoxylin OD mean",
    "od_e_mean": "Eosin OD mean",
}
ENTITY_CLASS = {"name": "Entity", "color": [0, 160, 255]}
QUANTILE_BINS = 5  # classify_by classes "<name> 1/5" (lowest) .. "<name> 5/5" (highest)
# Five hues that stay distinct on pink and purple H&E: blue, cyan, green, orange, red.
_CLASS_COLOURS = colormaps["turbo"]


def _ring(points_px: np.ndarray) -> list[list[float]]:
    """A closed GeoJSON ring (first point repeated last) of (n, 2) x, y pixel coordinates."""
    ring = np.round(points_px, 2).tolist()
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def _drop_collinear(contour: np.ndarray) -> np.ndarray:
    """The contour's corners only: a pixel outline's straight runs become one edge (lossless,
    and far smaller files)."""
    step = np.diff(contour, axis=0)  # (m - 1, 2)
    turn = step[:-1, 0] * step[1:, 1] - step[:-1, 1] * step[1:, 0]
    return contour[np.r_[True, np.abs(turn) > 1e-9, True]]


def entity_outlines(seg: np.ndarray, n: int) -> list[np.ndarray | None]:
    """Outline (m, 2) in (row, col) label-image pixels of entities 0..n-1 (None if absent).

    Each entity's largest contour on its own bounding box (SLIC entities are one connected
    piece), straight runs merged.
    """
    boxes = find_objects(seg.astype(np.int32) + 1, max_label=n)  # entity k: label k + 1, index k
    outlines: list[np.ndarray | None] = []
    for k, box in enumerate(boxes[:n]):
        if box is None:
            outlines.append(None)
            continue
        rows, cols = box
        crop = np.pad(seg[box] == k, 1).astype(np.uint8)
        contours = find_contours(crop, 0.5)
        if not contours:
            outlines.append(None)
            continue
        contour = _drop_collinear(max(contours, key=len))
        outlines.append(contour + np.array([rows.start - 1, cols.start - 1]))
    return outlines


def _quantile_class(name: str, k: int) -> dict:
    """QuPath classification of an entity in quintile `k` (0 = lowest) of measurement `name`."""
    r, g, b, _ = _CLASS_COLOURS(0.1 + 0.8 * k / (QUANTILE_BINS - 1))
    return {
        "name": f"{name} {k + 1}/{QUANTILE_BINS}",
        "color": [round(255 * r), round(255 * g), round(255 * b)],
    }


def slide_geojson(
    graphs: Sequence[Data],
    meta: Mapping,
    *,
    seg: Sequence[np.ndarray] | None = None,
    values: Mapping[str, np.ndarray] | None = None,
    classify_by: str | None = None,
) -> dict:
    """A FeatureCollection with one QuPath detection per entity of a cached slide.

    `graphs`, `meta`: as `load_slide_graphs` returns them; `seg`: their label images
    (`load_entity_labels`; None: centroids as points). `values` are extra per-entity
    measurements in cache order (all tiles' entities, tile by tile). `classify_by` names a
    measurement whose quintiles become the entities' classes (QuPath colours by class).
    Coordinates are level-0 pixels of the slide: QuPath's image coordinates.
    """
    scan_mpp, target_mpp = float(meta["slide"]["mpp"]), built_mpp(meta)
    names = list(meta["x_names"])
    columns = {label: names.index(key) for key, label in MEASUREMENTS.items() if key in names}
    total = sum(g.num_nodes for g in graphs)
    values = {k: np.asarray(v, dtype=np.float64) for k, v in (values or {}).items()}
    for key, v in values.items():
        if v.shape != (total,):
            raise GraphDataError(f"{key}: {len(v)} values for {total} entities")
    features = []
    for tile, g in enumerate(graphs):
        x = g.x.double().numpy()
        pos_px = g.pos.double().numpy() / scan_mpp  # (N, 2) x, y level-0 px
        origin = g.tile_origin.double().numpy()[0]  # µm of the label image's pixel (0, 0)
        outlines = entity_outlines(seg[tile], g.num_nodes) if seg is not None else None
        for node in range(g.num_nodes):
            outline = outlines[node] if outlines is not None else None
            if outline is not None and len(outline) >= 3:
                # label (row, col) px -> µm (origin + index * target_mpp) -> level-0 px
                xy_px = (origin + outline[:, ::-1] * target_mpp) / scan_mpp
                geometry = {"type": "Polygon", "coordinates": [_ring(xy_px)]}
            else:
                geometry = {"type": "Point", "coordinates": np.round(pos_px[node], 2).tolist()}
            features.append(
                {
                    "type": "Feature",
                    "id": f"{tile}-{node}",
                    "geometry": geometry,
                    "properties": {
                        "objectType": "detection",
                        "name": f"entity {tile}-{node}",
                        "classification": ENTITY_CLASS,
                        "isLocked": True,
                        "measurements": {label: float(x[node, c]) for label, c in columns.items()},
                        "tile": tile,
                        "entity": node,
                    },
                }
            )
    for key, v in values.items():
        for feature, value in zip(features, v, strict=True):
            feature["properties"]["measurements"][key] = float(value)
    if classify_by is not None:
        by = [f["properties"]["measurements"].get(classify_by) for f in features]
        if any(v is None for v in by):
            known = ", ".join([*columns, *values])
            raise GraphDataError(f"no measurement '{classify_by}' to classify by ({known})")
        rank = np.argsort(np.argsort(np.asarray(by), kind="stable"), kind="stable")
        for feature, r in zip(features, rank, strict=True):
            k = min(int(r * QUANTILE_BINS / max(total, 1)), QUANTILE_BINS - 1)
            feature["properties"]["classification"] = _quantile_class(classify_by, k)
    for feature in features:  # JSON has no NaN; QuPath reads null as a missing value
        m = feature["properties"]["measurements"]
        feature["properties"]["measurements"] = {
            k: (v if math.isfinite(v) else None) for k, v in m.items()
        }
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {
            "slide_id": meta["slide_id"],
            "coordinates": "level-0 pixels",
            "mpp": scan_mpp,
            "outlines": "superpixels" if seg is not None else "centroids",
        },
    }


def write_geojson(path: Path | str, collection: dict) -> Path:
    """Write a FeatureCollection compactly (entity files get large) and atomically."""
    text = json.dumps(collection, separators=(",", ":"), allow_nan=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def render_geojson(
    thumbnail: np.ndarray, px_per_level0: float, collection: Mapping, *, title: str = ""
) -> Image.Image:
    """Draw a GeoJSON file's detections over `thumbnail` (level-0 px * `px_per_level0` =
    thumbnail px) in their classification colours, as QuPath shows them, with a legend of the
    classes below."""
    base = Image.fromarray(thumbnail).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    classes: dict[str, tuple[int, ...]] = {}
    for feature in collection["features"]:
        cls = feature["properties"].get("classification", ENTITY_CLASS)
        colour = classes.setdefault(cls["name"], tuple(cls["color"]))
        geometry = feature["geometry"]
        if geometry["type"] == "Polygon":
            ring = [(x * px_per_level0, y * px_per_level0) for x, y in geometry["coordinates"][0]]
            draw.polygon(ring, fill=(*colour, 120), outline=(*colour, 255))
        elif geometry["type"] == "Point":
            x, y = (c * px_per_level0 for c in geometry["coordinates"])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(*colour, 255))
    picture = Image.alpha_composite(base, layer).convert("RGB")
    font = label_font(14)
    head = 28 if title else 0
    out = Image.new("RGB", (picture.width, head + picture.height + 30), "white")
    out.paste(picture, (0, head))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((6, 5), title, fill="black", font=label_font(16))
    x, y = 6, head + picture.height + 7
    # Quantile classes ("<measurement> k/5") share one label: "<measurement>: [1] [2] ... [5]".
    prefixes = {name.rsplit(" ", 1)[0] for name in classes}
    if len(prefixes) == 1 and len(classes) > 1:
        (prefix,) = prefixes
        draw.text((x, y - 1), f"{prefix} quintile:", fill="black", font=font)
        x += 10 + round(draw.textlength(f"{prefix} quintile:", font=font))
    for name, colour in sorted(classes.items()):
        label = name.rsplit(" ", 1)[1] if len(prefixes) == 1 and len(classes) > 1 else name
        draw.rectangle((x, y, x + 14, y + 14), fill=colour)
        draw.text((x + 19, y - 1), label, fill="black", font=font)
        x += 30 + round(draw.textlength(label, font=font))
    return out

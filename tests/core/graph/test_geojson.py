"""GeoJSON export: valid GeoJSON (the `geojson` package), the fields QuPath reads, and outlines
that really are the entities, in level-0 pixels of the slide."""

from __future__ import annotations

import itertools
import json
import zipfile

import geojson
import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from hmgdm_core.config import GraphConfig, TissueConfig
from hmgdm_core.graph.cache import graph_path, load_entity_labels, load_slide_graphs
from hmgdm_core.graph.geojson import render_geojson, slide_geojson
from hmgdm_core.graph.runner import build_graphs
from hmgdm_core.io.synthetic import write_pyramidal_tiff

pytestmark = pytest.mark.slow

OBJECT_TYPES = {"annotation", "detection", "cell", "tile"}  # QuPath's GeoJSON object types


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A 4-tile synthetic slide scanned at 0.25 µm/px, graphs at 0.5 µm/px: level-0 pixels
    and graph pixels differ by 2x, so a unit slip shows."""
    tmp = tmp_path_factory.mktemp("geo")
    slide = write_pyramidal_tiff(tmp / "s.tif", 1024, 1024, mpp=0.25, tile=256, seed=5)
    cfg = GraphConfig(
        tile_size=256,
        max_region_size=256,
        entity_area_um2=150.0,
        tissue=TissueConfig(thumbnail_mpp=2.0, min_object_um2=500.0, min_hole_um2=500.0),
    )
    (res,) = build_graphs([slide], tmp / "cache", cfg, show_progress=False)
    assert res.status == "done" and res.n_graphs >= 2, res.error
    archive = graph_path(tmp / "cache", res.slide_id)
    graphs, meta = load_slide_graphs(archive)
    return archive, graphs, meta, load_entity_labels(archive)


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_export_is_valid_geojson_with_what_qupath_reads(tiled):
    _, graphs, meta, seg = tiled
    n = sum(g.num_nodes for g in graphs)
    importance = np.random.default_rng(0).random(n)
    collection = slide_geojson(
        graphs, meta, seg=seg, values={"importance": importance}, classify_by="importance"
    )
    parsed = geojson.loads(json.dumps(collection, allow_nan=False))
    assert parsed.is_valid, parsed.errors()
    assert parsed["type"] == "FeatureCollection" and len(parsed["features"]) == n
    classes: dict[str, list[float]] = {}
    for f in parsed["features"]:
        props = f["properties"]
        assert props["objectType"] in OBJECT_TYPES
        assert set(props["classification"]) == {"name", "color"}
        assert len(props["classification"]["color"]) == 3
        assert all(0 <= c <= 255 and isinstance(c, int) for c in props["classification"]["color"])
        m = props["measurements"]
        assert isinstance(m, dict) and all(isinstance(v, float) for v in m.values())
        assert {"Area µm^2", "Haematoxylin OD mean", "importance"} <= set(m)
        classes.setdefault(props["classification"]["name"], []).append(m["importance"])
    # Quintiles of importance: five equal classes, ordered by value.
    names = sorted(classes)
    assert len(names) == 5 and all(abs(len(classes[c]) - n / 5) <= 1 for c in names)
    assert all(max(classes[a]) <= min(classes[b]) for a, b in itertools.pairwise(names))


def test_outlines_are_the_entities_in_level0_pixels(tiled):
    _, graphs, meta, seg = tiled
    collection = slide_geojson(graphs, meta, seg=seg)
    base = meta["slide"]["mpp"]
    width, height = meta["slide"]["size"]
    pos = np.concatenate([g.pos.numpy() for g in graphs]) / base  # centroids, level-0 px
    rel_err, inside = [], 0
    for f, centroid in zip(collection["features"], pos, strict=True):
        assert f["geometry"]["type"] == "Polygon"
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all() and len(ring) >= 4
        assert (
            ring.min() >= -1
            and (ring[:, 0] <= width + 1).all()
            and (ring[:, 1] <= height + 1).all()
        )
        area_um2 = f["properties"]["measurements"]["Area µm^2"]
        rel_err.append(abs(_shoelace(ring) * base**2 - area_um2) / area_um2)
        inside += PolygonPath(ring).contains_point(centroid)
    # Outlines pass through pixel edges, the area counts pixel centres: a few % apart on average.
    assert np.median(rel_err) < 0.15, np.median(rel_err)
    assert inside >= 0.9 * len(pos)  # SLIC entities are compact: nearly all hold their centroid


def test_caches_without_outlines_export_centroids(tiled, tmp_path):
    archive, graphs, meta, _ = tiled
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            if not name.startswith("seg/"):
                dst.writestr(name, src.read(name))
    assert load_entity_labels(old) is None
    collection = slide_geojson(graphs, meta, seg=None)
    assert {f["geometry"]["type"] for f in collection["features"]} == {"Point"}
    assert geojson.loads(json.dumps(collection)).is_valid


def test_rendering_draws_each_entity_in_its_class_colour(tiled):
    _, graphs, meta, seg = tiled
    collection = slide_geojson(graphs, meta, seg=seg)
    collection["features"] = collection["features"][:1]
    f = collection["features"][0]
    f["properties"]["classification"] = {"name": "x", "color": [0, 0, 255]}
    ring = np.asarray(f["geometry"]["coordinates"][0])
    thumb = np.full(
        (meta["slide"]["size"][1] // 4, meta["slide"]["size"][0] // 4, 3), 255, np.uint8
    )
    img = np.asarray(render_geojson(thumb, 0.25, collection))
    cx, cy = (ring.mean(axis=0) * 0.25).round().astype(int)
    r, g, b = img[cy, cx].astype(int)
    assert b > r + 80 and b > g + 80  # inside: blue fill over white
    assert tuple(img[2, 2]) == (255, 255, 255)  # elsewhere untouched

"""Benchmark: entity-graph build of one real image, ours vs the naive scikit-image pipeline.

Naive = skimage `slic` + `graph.rag_mean_color` + `measure.regionprops_table` on a crop of
the real TCGA H&E slide (headline) and on the real IHC kidney image.
Ours = `region_graph` end to end (superpixels, all descriptors, windows, edges), same entity
size, run as `hmgdm_core.graph.build` runs it on a slide: 512 px tiles with a 32 px SLIC
margin (the headline ratio); the whole crop as one region is printed too. Also: each
superpixel candidate's MP/s, and superpixel quality against scikit-image's SLIC on the real
Kather tiles (boundary recall / undersegmentation error w.r.t. stain structure).

    .venv/bin/python benchmarks/graph_build.py [--size 1536] [--threads 1]

Times are process CPU seconds (see `_timed`); MP/s = megapixels per CPU second.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmgdm_core.config import GraphConfig  # noqa: E402
from hmgdm_core.graph.region import region_graph  # noqa: E402
from hmgdm_core.graph.superpixels import (  # noqa: E402
    boundary_recall,
    grid_step,
    slic,
    stain_segments,
    undersegmentation_error,
)

DATA = Path(os.environ.get("HMGDM_DATA", ROOT.parent / "shared" / "data"))
MPP = 0.5  # the TCGA frozen section carries no mpp; 0.5 µm/px is its nominal 20x
KATHER_MPP = 0.495


def _timed(fn, *args, **kwargs):
    """Result and CPU seconds of this process: robust to other jobs on a shared machine, and
    with one torch thread equal to single-core wall time."""
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


def _n_segments(shape: tuple[int, ...], step: int) -> int:
    return int(np.ceil(shape[0] / step) * np.ceil(shape[1] / step))


def read_crop(size: int) -> np.ndarray:
    """A `size` x `size` RGB crop from the middle of the real TCGA slide (level 0)."""
    import openslide

    with openslide.OpenSlide(DATA / "slides" / "tcga-cr-7395-01a-01-ts1.svs") as osr:
        w, h = osr.dimensions
        size = min(size, w, h)
        x, y = (w - size) // 2, (h - size) // 2
        return np.asarray(osr.read_region((x, y), 0, (size, size)).convert("RGB"))


def read_ihc() -> np.ndarray:
    """The real IHC (DAB) kidney image, whole (901 x 1493)."""
    import tifffile

    return tifffile.imread(DATA / "slides" / "kidney-48-5.tif")[..., :3]


def tiled_graphs(rgb: np.ndarray, cfg: GraphConfig) -> int:
    """Region graphs of every tile of `rgb` with its context margin, as build.py tiles a
    slide. Returns the total node count."""
    t, m = cfg.tile_size, cfg.tile_margin
    h, w = rgb.shape[:2]
    nodes = 0
    for y in range(0, h, t):
        for x in range(0, w, t):
            y0, x0 = max(y - m, 0), max(x - m, 0)
            y1, x1 = min(y + t + m, h), min(x + t + m, w)
            core = (y - y0, x - x0, min(y + t, h) - y0, min(x + t, w) - x0)
            graph = region_graph(
                rgb[y0:y1, x0:x1], array_mpp=MPP, cfg=cfg, core=core, origin_um=(x0 * MPP, y0 * MPP)
            )
            nodes += 0 if graph is None else graph.num_nodes
    return nodes


def naive_pipeline(rgb: np.ndarray, n_segments: int, compactness: float) -> dict[str, float]:
    from skimage import graph, measure, segmentation

    times = {}
    labels, times["slic"] = _timed(
        segmentation.slic, rgb, n_segments=n_segments, compactness=compactness, start_label=1
    )
    _, times["rag_mean_color"] = _timed(graph.rag_mean_color, rgb, labels)
    props = ("label", "area", "centroid", "intensity_mean", "perimeter", "eccentricity", "solidity")
    _, times["regionprops_table"] = _timed(
        measure.regionprops_table, labels, intensity_image=rgb, properties=props
    )
    times["n_segments"] = int(labels.max())
    return times


def superpixel_candidates(rgb: np.ndarray, step: int, compactness: float) -> dict[str, float]:
    """MP/s of every superpixel implementation that can run here (nan: not installed)."""
    from skimage.segmentation import slic as skimage_slic

    mp = rgb.shape[0] * rgb.shape[1] / 1e6
    n_segments = _n_segments(rgb.shape, step)
    out = {}
    _, t = _timed(slic, rgb, step=step, compactness=compactness)
    out["hmgdm torch SLIC"] = mp / t
    _, t = _timed(skimage_slic, rgb, n_segments=n_segments, compactness=compactness)
    out["skimage slic"] = mp / t
    try:
        import cv2

        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        engine, t = _timed(
            cv2.ximgproc.createSuperpixelSLIC, lab, algorithm=cv2.ximgproc.SLICO, region_size=step
        )
        _, t2 = _timed(engine.iterate, 10)
        out["opencv ximgproc SLICO"] = mp / (t + t2)
    except (ImportError, AttributeError):
        out["opencv ximgproc SLICO"] = float("nan")
    try:
        from fast_slic import Slic

        _, t = _timed(Slic(num_components=n_segments, compactness=compactness).iterate, rgb)
        out["fast-slic"] = mp / t
    except ImportError:
        out["fast-slic"] = float("nan")
    return out


def quality(step: int, compactness: float) -> tuple[float, float, float, float]:
    """Mean boundary recall and undersegmentation error of ours and skimage's on Kather tiles."""
    from skimage.segmentation import slic as skimage_slic

    ours, ref = [], []
    for path in sorted((DATA / "kather2016_tiles").glob("*/*.tif")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        if rgb.std() < 5:  # a blank tile has no structure to recall
            continue
        truth = stain_segments(rgb)
        theirs = skimage_slic(
            rgb, n_segments=_n_segments(rgb.shape, step), compactness=compactness, start_label=0
        )
        mine = slic(rgb, step=step, compactness=compactness)
        ours.append([boundary_recall(mine, truth), undersegmentation_error(mine, truth)])
        ref.append([boundary_recall(theirs, truth), undersegmentation_error(theirs, truth)])
    (br, use), (br_ref, use_ref) = np.mean(ours, 0), np.mean(ref, 0)
    return br, br_ref, use, use_ref


def dgl_node_count(path: Path) -> int:
    """Nodes of a DGL graph file: the first dimension of its first 2-D NDArray (centroids)."""
    blob = path.read_bytes()
    magic = struct.pack("<Q", 0xDD5E40F096B4A13F)  # DGL's NDArray magic
    at = blob.find(magic)
    while at >= 0:
        # magic, reserved (8 bytes each), device type and id (int32 each), ndim (int32)
        if struct.unpack_from("<i", blob, at + 24)[0] == 2:
            return struct.unpack_from("<q", blob, at + 32)[0]
        at = blob.find(magic, at + 8)
    raise ValueError(f"{path}: no 2-D array found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1536, help="square crop side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (naive: 1 core)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for our pipeline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # No caps on the one-region graph: the naive pipeline keeps every segment too.
    cfg = GraphConfig(target_mpp=MPP, max_entities=10**7, max_edges=10**8)
    step = grid_step(MPP, cfg.entity_area_um2)

    rgb = read_crop(args.size)
    mp = rgb.shape[0] * rgb.shape[1] / 1e6
    print(
        f"image: TCGA frozen section crop {rgb.shape[1]}x{rgb.shape[0]} ({mp:.2f} MP), "
        f"entity {cfg.entity_area_um2} µm² at {MPP} µm/px = {step} px grid, "
        f"{args.threads} torch thread(s); times in CPU seconds"
    )
    region_graph(rgb[:256, :256], array_mpp=MPP, cfg=cfg)  # warm-up: torch kernels, imports
    t_ours = min(_timed(tiled_graphs, rgb, cfg)[1] for _ in range(args.repeats))
    print(
        f"ours, {cfg.tile_size} px tiles + {cfg.tile_margin} px margin: {t_ours:7.2f} s "
        f"{mp / t_ours:6.2f} MP/s  {tiled_graphs(rgb, cfg)} nodes"
    )
    t_region = min(
        _timed(region_graph, rgb, array_mpp=MPP, cfg=cfg)[1] for _ in range(args.repeats)
    )
    graph = region_graph(rgb, array_mpp=MPP, cfg=cfg)
    print(
        f"ours, whole crop as one region:   {t_region:7.2f} s {mp / t_region:6.2f} MP/s  "
        f"{graph.num_nodes} nodes, {graph.edge_index.shape[1] // 2} edges"
    )
    naive = naive_pipeline(rgb, _n_segments(rgb.shape, step), cfg.compactness)
    t_naive = naive["slic"] + naive["rag_mean_color"] + naive["regionprops_table"]
    print(
        f"naive, whole crop:                {t_naive:7.2f} s {mp / t_naive:6.2f} MP/s  "
        f"{naive['n_segments']} segments (slic {naive['slic']:.2f} s, rag_mean_color "
        f"{naive['rag_mean_color']:.2f} s, regionprops_table {naive['regionprops_table']:.2f} s)"
    )
    ratio, ratio_region = t_naive / t_ours, t_naive / t_region
    print(f"speed-up vs naive: tiled {ratio:.1f}x, one region {ratio_region:.1f}x")

    ihc = read_ihc()
    t_ihc = min(_timed(tiled_graphs, ihc, cfg)[1] for _ in range(args.repeats))
    naive_ihc = naive_pipeline(ihc, _n_segments(ihc.shape, step), cfg.compactness)
    t_naive_ihc = sum(naive_ihc[k] for k in ("slic", "rag_mean_color", "regionprops_table"))
    ratio_ihc = t_naive_ihc / t_ihc
    print(
        f"IHC kidney {ihc.shape[1]}x{ihc.shape[0]}: ours tiled {t_ihc:.2f} s, naive "
        f"{t_naive_ihc:.2f} s, speed-up {ratio_ihc:.1f}x"
    )

    print("superpixel candidates (MP/s, nan = not installed):")
    for name, mps in superpixel_candidates(rgb, step, cfg.compactness).items():
        print(f"  {name:24s} {mps:6.2f}")

    kather_step = grid_step(KATHER_MPP, cfg.entity_area_um2) // 2  # ~225 segments per tile
    br, br_ref, use, use_ref = quality(kather_step, cfg.compactness)
    print(
        f"quality on Kather tiles ({kather_step} px grid), reference = stain structure: "
        f"boundary recall ours {br:.3f} vs skimage {br_ref:.3f}; "
        f"undersegmentation error ours {use:.3f} vs skimage {use_ref:.3f}"
    )

    name = "283_dcis_4"
    ref_nodes = dgl_node_count(DATA / "bracs_rois" / "tissue_graphs" / f"{name}.bin")
    roi = np.asarray(Image.open(DATA / "bracs_rois" / "images" / f"{name}.png").convert("RGB"))
    ours_nodes = region_graph(roi, array_mpp=0.25, cfg=cfg).num_nodes
    print(
        f"BRACS {name}: histocartography tissue graph {ref_nodes} nodes; ours at 0.25 µm/px, "
        f"{cfg.entity_area_um2} µm² entities: {ours_nodes} nodes"
    )

    br_rel, use_rel = br / br_ref, use / use_ref
    met = bool(ratio >= 10 and br_rel >= 0.9 and use_rel <= 1.1)
    result = {
        "benchmark": "graph_build",
        "naive_mps": round(mp / t_naive, 3),
        "ours_mps": round(mp / t_ours, 3),
        "ratio": round(ratio, 2),
        "target": 10,
        "ratio_one_region": round(ratio_region, 2),
        "ratio_ihc": round(ratio_ihc, 2),
        "boundary_recall_rel": round(br_rel, 3),
        "underseg_rel": round(use_rel, 3),
        "met": met,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Slide -> region graphs: tissue detection, tiling, per-tile graphs streamed into the cache.

One slide is built by `build_slide` (pure with respect to other slides, so workers can run it
in parallel); `build_graphs` in `runner.py` schedules slides, keeps the manifest and resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hmgdm_core.config import GraphConfig
from hmgdm_core.exceptions import HmgdmError, NoTissueError, SlideReadError
from hmgdm_core.graph.cache import SlideGraphWriter, graph_path
from hmgdm_core.graph.qc import (
    FEW_ENTITIES,
    KEPT,
    LOW_TISSUE,
    PANEL_PX,
    SlideQC,
    qc_path,
    render_slide_qc,
    save_png,
)
from hmgdm_core.graph.region import edge_attr_names, region_graph, x_names
from hmgdm_core.io.slides import Slide
from hmgdm_core.io.tissue import tile_fractions, tile_grid, tissue_mask
from hmgdm_core.stain import SlideStains, estimate

# Specks and holes are sized for whole slides; on a small region they would erase the image.
_REGION_MORPH_SHARE = 0.01

TileProgress = Callable[[int, int], None]
_STAIN_PIXELS = 500_000
# Bump when a code change makes the same slide, config and resolution give different graphs:
# every cached slide is then rebuilt once instead of mixing old and new graphs in one cache.
BUILDER_VERSION = 1


@dataclass
class SlideResult:
    """One manifest row: what happened to one input slide."""

    slide_id: str
    path: str
    sha256: str = ""
    config_hash: str = ""
    status: str = "error"  # done | skipped | error
    n_graphs: int = 0
    n_nodes: int = 0
    n_edges: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    mpp: float = 0.0  # scan_mpp as used: µm/px of the slide's full-resolution image
    mpp_source: str = ""  # override | file | objective_power
    build_key: str = ""  # see build_key()
    warning: str = ""

    def row(self) -> dict:
        return asdict(self)


def build_key(config_hash: str, scan_mpp: float | None, version: int | None = None) -> str:
    """Everything besides the slide's bytes that decides its graphs, as one short hash: the
    graph config, the µm/px given for the input (None: the file's own) and the builder version
    (default: this code's).
    """
    version = BUILDER_VERSION if version is None else version
    blob = json.dumps([config_hash, scan_mpp, version], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def archive_build_key(meta: dict) -> str:
    """The build key an archive was built with; archives from before build keys existed were
    builder version 1 and recorded a given resolution as mpp_source "override"."""
    if "build_key" in meta:
        return meta["build_key"]
    slide = meta.get("slide", {})
    given = slide.get("mpp") if slide.get("mpp_source") == "override" else None
    return build_key(meta["config_hash"], given, version=1)


def slide_fingerprint(path: Path, head_bytes: int = 1 << 20) -> str:
    """sha256 of the first MiB plus the size: detects a replaced slide without reading GBs."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(head_bytes))
    h.update(str(Path(path).stat().st_size).encode())
    return h.hexdigest()


def _mask_for_region(
    mask: np.ndarray,
    mask_mpp: float,
    origin_um: tuple[float, float],
    shape: tuple[int, int],
    mpp: float,
) -> np.ndarray:
    """Nearest-neighbour lookup of a low-resolution tissue mask for a region read at `mpp`."""
    h, w = shape
    rows = np.floor((origin_um[1] + (np.arange(h) + 0.5) * mpp) / mask_mpp).astype(np.int64)
    cols = np.floor((origin_um[0] + (np.arange(w) + 0.5) * mpp) / mask_mpp).astype(np.int64)
    inside_r = (rows >= 0) & (rows < mask.shape[0])
    inside_c = (cols >= 0) & (cols < mask.shape[1])
    out = mask[np.clip(rows, 0, mask.shape[0] - 1)][:, np.clip(cols, 0, mask.shape[1] - 1)]
    return out & inside_r[:, None] & inside_c[None, :]


def _region_tissue_cfg(cfg: GraphConfig, area_um2: float):
    cap = area_um2 * _REGION_MORPH_SHARE
    return cfg.tissue.model_copy(
        update={
            "min_object_um2": min(cfg.tissue.min_object_um2, cap),
            "min_hole_um2": min(cfg.tissue.min_hole_um2, cap),
        }
    )


def _write_single_region(
    slide: Slide, cfg: GraphConfig, writer: SlideGraphWriter, qc: SlideQC
) -> SlideStains | None:
    w, h = slide.size_at(cfg.target_mpp)
    rgb = slide.read_region(0.0, 0.0, w, h, mpp=cfg.target_mpp)
    mask = tissue_mask(
        rgb, array_mpp=cfg.target_mpp, cfg=_region_tissue_cfg(cfg, w * h * cfg.target_mpp**2)
    )
    qc.thumbnail, qc.thumb_mpp, qc.mask, qc.mask_mpp = rgb, cfg.target_mpp, mask, cfg.target_mpp
    qc.tile_um = (w * cfg.target_mpp, h * cfg.target_mpp)
    if not mask.any():
        raise NoTissueError(slide.path, "no tissue found at the configured thresholds")
    stain = _slide_stains(slide, cfg, [rgb[mask]])
    graph = region_graph(
        rgb, array_mpp=cfg.target_mpp, cfg=cfg, mask=mask, keep_labels=True, stain=stain
    )
    if graph is None:
        qc.add_tile(0.0, 0.0, FEW_ENTITIES)
        return stain
    writer.add(graph)
    qc.add_tile(0.0, 0.0, KEPT, graph.num_nodes)
    qc.labels = graph.seg.numpy()
    return stain


def _slide_stains(slide: Slide, cfg: GraphConfig, pixels: list[np.ndarray]) -> SlideStains | None:
    """The slide's stains (Macenko's basis or Reinhard's colour statistics) from (n, 3) tissue
    pixels when `cfg.stain_norm` asks, else None.

    One basis per slide, not per tile: a tile of stroma alone has no haematoxylin to find.
    """
    if cfg.stain_norm == "none":
        return None
    tissue = np.concatenate(pixels)  # (n, 3)
    if len(tissue) > _STAIN_PIXELS:  # percentiles need no more; a fixed subset is repeatable
        tissue = tissue[np.random.default_rng(0).choice(len(tissue), _STAIN_PIXELS, False)]
    stain = estimate(cfg.stain_norm, tissue)
    if stain is None:
        raise SlideReadError(
            slide.path,
            f"too little stained tissue to estimate its stains (graph.stain_norm = "
            f"{cfg.stain_norm}); is it an H&E slide?",
        )
    return stain


def _qc_thumbnail(slide: Slide, cfg: GraphConfig, thumb: np.ndarray, thumb_mpp: float):
    """(image, mpp) for the QC picture: about PANEL_PX on its longer side, reusing the
    tissue thumbnail when that is already as fine."""
    qc_mpp = max(cfg.target_mpp, max(slide.size_um) / PANEL_PX)
    return (thumb, thumb_mpp) if qc_mpp >= thumb_mpp else (slide.thumbnail(qc_mpp), qc_mpp)


def _write_tiles(
    slide: Slide,
    cfg: GraphConfig,
    writer: SlideGraphWriter,
    on_tile: TileProgress | None,
    qc: SlideQC,
) -> SlideStains | None:
    # Tissue is found once on a thumbnail; tiles are then read one at a time at full
    # resolution, so memory stays flat however large the slide is.
    thumb_mpp = max(cfg.tissue.thumbnail_mpp, cfg.target_mpp)
    thumb = slide.thumbnail(thumb_mpp)
    mask = tissue_mask(thumb, array_mpp=thumb_mpp, cfg=cfg.tissue)
    if qc.enabled:
        qc.thumbnail, qc.thumb_mpp = _qc_thumbnail(slide, cfg, thumb, thumb_mpp)
    qc.mask, qc.mask_mpp = mask, thumb_mpp
    if not mask.any():
        raise NoTissueError(slide.path, "no tissue found at the configured thresholds")
    tile_um = cfg.tile_size * cfg.target_mpp
    qc.tile_um = (tile_um, tile_um)
    fractions = tile_fractions(
        mask, mask_mpp=thumb_mpp, tile_um=tile_um, slide_size_um=slide.size_um
    )  # (n_y, n_x)
    low = (fractions > 0) & (fractions < cfg.tissue.min_tile_fraction)
    for ty, tx in np.argwhere(low):
        qc.add_tile(tx * tile_um, ty * tile_um, LOW_TISSUE)
    origins = tile_grid(
        mask,
        mask_mpp=thumb_mpp,
        tile_um=tile_um,
        slide_size_um=slide.size_um,
        min_fraction=cfg.tissue.min_tile_fraction,
    )
    if len(origins) == 0:
        raise NoTissueError(slide.path, "no tile has enough tissue (see tissue.min_tile_fraction)")
    side = cfg.tile_size + 2 * cfg.tile_margin
    margin_um = cfg.tile_margin * cfg.target_mpp
    core = (
        cfg.tile_margin,
        cfg.tile_margin,
        cfg.tile_margin + cfg.tile_size,
        cfg.tile_margin + cfg.tile_size,
    )
    stain = None
    if cfg.stain_norm != "none":  # from up to 8 tiles spread over the slide, at full resolution
        sample = []
        for x_um, y_um in origins[np.unique(np.linspace(0, len(origins) - 1, 8).astype(int))]:
            rgb = slide.read_region(x_um, y_um, cfg.tile_size, cfg.tile_size, mpp=cfg.target_mpp)
            tmask = _mask_for_region(mask, thumb_mpp, (x_um, y_um), rgb.shape[:2], cfg.target_mpp)
            sample.append(rgb[tmask])
        stain = _slide_stains(slide, cfg, sample)
    for i, (x_um, y_um) in enumerate(origins):
        origin = (float(x_um) - margin_um, float(y_um) - margin_um)
        rgb = slide.read_region(origin[0], origin[1], side, side, mpp=cfg.target_mpp)
        tmask = _mask_for_region(mask, thumb_mpp, origin, (side, side), cfg.target_mpp)
        graph = region_graph(
            rgb,
            array_mpp=cfg.target_mpp,
            cfg=cfg,
            mask=tmask,
            core=core,
            origin_um=origin,
            keep_labels=True,
            stain=stain,
        )
        if graph is not None:
            writer.add(graph)
            qc.add_tile(x_um, y_um, KEPT, graph.num_nodes)
        else:
            qc.add_tile(x_um, y_um, FEW_ENTITIES)
        if on_tile is not None:
            on_tile(i + 1, len(origins))
    return stain


def build_slide(
    path: Path,
    out_dir: Path,
    cfg: GraphConfig,
    *,
    scan_mpp: float | None = None,
    slide_id: str | None = None,
    sha256: str | None = None,
    on_tile: TileProgress | None = None,
    qc_dir: Path | None = None,
) -> SlideResult:
    """Build and write every region graph of one slide; errors become a `status=error` row.

    With `qc_dir`, also draw the slide's QC image there (`qc.qc_path`), failures included
    when the slide could be read.
    """
    path = Path(path)
    config_hash = cfg.stable_hash()
    res = SlideResult(
        slide_id=slide_id or path.stem,
        path=str(path),
        config_hash=config_hash,
        build_key=build_key(config_hash, scan_mpp),
    )
    qc = SlideQC(res.slide_id, enabled=qc_dir is not None)
    start = time.perf_counter()
    try:
        res.sha256 = sha256 or slide_fingerprint(path)
        with Slide.open(path, scan_mpp=scan_mpp) as slide:
            res.slide_id = slide_id or slide.slide_id
            res.mpp, res.mpp_source, res.warning = (
                slide.scan_mpp,
                slide.mpp_source,
                slide.mpp_warning,
            )
            qc.scan_mpp = slide.scan_mpp
            out = graph_path(out_dir, res.slide_id)
            with SlideGraphWriter(out) as writer:
                w, h = slide.size_at(cfg.target_mpp)
                if max(w, h) <= cfg.max_region_size:
                    stain = _write_single_region(slide, cfg, writer, qc)
                else:
                    stain = _write_tiles(slide, cfg, writer, on_tile, qc)
                if writer.n_graphs == 0:
                    raise NoTissueError(
                        path,
                        "tissue too small for two superpixels; "
                        "lower graph.entity_area_um2 or check --mpp",
                    )
                res.bytes = writer.commit(
                    {
                        "slide_id": res.slide_id,
                        "source": str(path),
                        "sha256": res.sha256,
                        "config_hash": res.config_hash,
                        "build_key": res.build_key,
                        "graph_config": cfg.model_dump(mode="json"),
                        "x_names": x_names(cfg),
                        "edge_attr_names": edge_attr_names(cfg),
                        # The slide's own stains, as normalisation found them (audit, QC).
                        "stain": None if stain is None else stain.as_dict(),
                        "slide": {
                            "mpp": slide.scan_mpp,
                            "size": list(slide.size),
                            "backend": slide.backend,
                            **slide.metadata,
                        },
                    }
                )
                res.n_graphs, res.n_nodes, res.n_edges = (
                    writer.n_graphs,
                    writer.n_nodes,
                    writer.n_edges,
                )
        res.status = "done"
    except HmgdmError as err:
        res.error = str(err).replace("\n", " ")
    except (OSError, ValueError, MemoryError) as err:
        # Anything a corrupt or exotic file can throw from deep inside a reader library.
        res.error = f"{path}: {type(err).__name__}: {err}".replace("\n", " ")
    if qc_dir is not None and qc.thumbnail is not None:
        qc.error = res.error
        try:
            save_png(qc_path(qc_dir, res.slide_id), render_slide_qc(qc))
        except (OSError, ValueError) as err:  # a QC image never costs a slide its graphs
            res.warning = f"{res.warning} QC image not written: {err}".strip()
    res.seconds = round(time.perf_counter() - start, 3)
    return res

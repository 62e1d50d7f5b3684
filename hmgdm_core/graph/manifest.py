"""`DIR/manifest.csv`: one row per input slide (status, sizes, timings, error), atomic."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

from hmgdm_core.atomic import atomic_write
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.graph.build import SlideResult, archive_build_key
from hmgdm_core.graph.cache import graph_path, read_slide_meta

COLUMNS = [f.name for f in fields(SlideResult)]


def manifest_path(out_dir: Path) -> Path:
    return Path(out_dir) / "manifest.csv"


def read_manifest(out_dir: Path) -> dict[str, SlideResult]:
    """Rows of an existing manifest keyed by slide id (empty when there is none yet)."""
    path = manifest_path(out_dir)
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {r["slide_id"]: _from_row(r) for r in csv.DictReader(fh)}


def _from_row(row: dict[str, str]) -> SlideResult:
    cast = {"int": int, "float": float, "str": str}
    values = {f.name: cast[f.type](row[f.name]) for f in fields(SlideResult) if row.get(f.name)}
    return SlideResult(**values)


def write_manifest(out_dir: Path, rows: dict[str, SlideResult]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows[slide_id].row() for slide_id in sorted(rows))

    return atomic_write(manifest_path(out_dir), write)


def already_built(
    out_dir: Path, slide_id: str, path: Path, sha256: str, key: str
) -> SlideResult | None:
    """The result of an earlier build of the same bytes with the same build key, else None.

    The archive's own metadata decides, not the manifest: a build killed before its manifest
    was rewritten still resumes without redoing finished slides.
    """
    archive = graph_path(out_dir, slide_id)
    try:
        meta = read_slide_meta(archive)
    except GraphDataError:
        return None
    if meta.get("sha256") != sha256 or archive_build_key(meta) != key:
        return None
    slide = meta.get("slide", {})
    return SlideResult(
        slide_id,
        str(path),
        sha256,
        meta["config_hash"],
        "skipped",
        meta["n_graphs"],
        meta.get("n_nodes", 0),
        meta.get("n_edges", 0),
        archive.stat().st_size,
        mpp=slide.get("mpp", 0.0),
        mpp_source=slide.get("mpp_source", ""),
        build_key=key,
    )

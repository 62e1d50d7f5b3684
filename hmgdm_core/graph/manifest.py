"""`DIR/manifest.csv`: one row per input slide (status, sizes, timings, error), atomic."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

from hmgdm_core.atomic import atomic_write
from hmgdm_core.graph.build import SlideResult
from hmgdm_core.graph.cache import graph_path

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


def is_up_to_date(row: SlideResult | None, out_dir: Path, sha256: str, config_hash: str) -> bool:
    """A slide is skipped only if it was built from the same bytes with the same config."""
    return (
        row is not None
        and row.status in ("done", "skipped")
        and row.sha256 == sha256
        and row.config_hash == config_hash
        and graph_path(out_dir, row.slide_id).exists()
    )

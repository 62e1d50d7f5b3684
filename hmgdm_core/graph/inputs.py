"""Which files a build-graphs call reads, what each slide is called and at which resolution.

A directory gives every slide or image under it, named by its path relative to that directory
without the suffix (`2024/case7/HE.svs` -> `2024/case7/HE`): equal file names in different
folders stay apart, and an id never changes when other files are added. A DICOM whole-slide
image (a folder of `.dcm` files, one per pyramid level) is one slide named by its folder. A file
named directly is called by its stem. A `.csv` input lists `slide_id,path[,mpp]` rows: ids of
the site's choosing (read-only archives cannot be renamed) and a resolution per slide.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hmgdm_core.exceptions import SlideReadError
from hmgdm_core.graph.build import SlideResult
from hmgdm_core.slide_ids import valid_slide_id

# Whole-slide formats OpenSlide reads, then plain images. `.dcm` files are grouped by folder.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}
    | {".png", ".jpg", ".jpeg", ".bmp"}
)
DICOM_SUFFIX = ".dcm"
CSV_COLUMNS = ("slide_id", "path")


@dataclass(frozen=True)
class SlideInput:
    """One slide to build: its file, its id, and the µm/px given for it (None: not given)."""

    path: Path  # absolute, so the manifest and graph archives work from any directory
    slide_id: str
    scan_mpp: float | None = None
    # Named by its place in a directory: a cache built before ids were relative paths may
    # know this slide by its file stem (see runner.legacy_id).
    from_directory: bool = False


def absolute(path: Path) -> Path:
    """`path` made absolute without resolving symlinks (a site's mount names stay readable)."""
    return Path(os.path.abspath(path))


def _error(slide_id: str, path: Path | str, reason: str) -> SlideResult:
    return SlideResult(slide_id, str(path), error=f"{path}: {reason}")


def _from_directory(root: Path) -> list[SlideInput]:
    found: list[SlideInput] = []
    dicom_dirs: set[Path] = set()
    for f in sorted(root.rglob("*")):
        suffix = f.suffix.lower()
        if suffix == DICOM_SUFFIX and f.is_file():
            dicom_dirs.add(f.parent)
        elif suffix in SLIDE_SUFFIXES and f.is_file():
            rel = f.relative_to(root).with_suffix("").as_posix()
            found.append(SlideInput(absolute(f), rel, from_directory=True))
    for folder in sorted(dicom_dirs):
        found.append(_dicom_input(folder, root))
    return found


def _dicom_input(folder: Path, root: Path | None) -> SlideInput:
    # OpenSlide opens a DICOM slide from any one file of its series and finds the other levels
    # in the same folder; the first file by name is as good as any.
    first = min(f for f in folder.iterdir() if f.suffix.lower() == DICOM_SUFFIX)
    rel = folder.relative_to(root).as_posix() if root is not None else "."
    return SlideInput(absolute(first), folder.name if rel == "." else rel)


def read_slides_csv(path: Path) -> tuple[list[SlideInput], list[SlideResult]]:
    """Rows of a `slide_id,path[,mpp]` CSV; relative paths are relative to the CSV's folder.

    A file that cannot be used as a whole raises SlideReadError; a bad row becomes an error
    row naming the CSV line, so the other slides are still built.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SlideReadError(path, f"not a readable slides CSV: {err}") from None
    if missing := [c for c in CSV_COLUMNS if c not in columns]:
        raise SlideReadError(
            path, f"slides CSV needs columns slide_id,path[,mpp]; missing {', '.join(missing)}"
        )
    if not rows:
        raise SlideReadError(path, "slides CSV lists no slides")
    inputs, errors = [], []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        sid, given = row["slide_id"], row["path"]
        where = f"{path} line {line}"
        if not sid or not given:
            errors.append(_error(sid or f"{path.name}:{line}", where, "empty slide_id or path"))
            continue
        if not valid_slide_id(sid):
            errors.append(_error(sid, where, f"slide id '{sid}' is not a relative name like a/b"))
            continue
        target = Path(given) if Path(given).is_absolute() else path.parent / given
        scan_mpp = None
        if row.get("mpp"):
            try:
                scan_mpp = float(row["mpp"])
            except ValueError:
                scan_mpp = math.nan
            if not (math.isfinite(scan_mpp) and scan_mpp > 0):
                errors.append(_error(sid, where, f"mpp '{row['mpp']}' is not a positive number"))
                continue
        if target.is_dir():
            has_dicom = any(f.suffix.lower() == DICOM_SUFFIX for f in target.iterdir())
            if not has_dicom:
                errors.append(_error(sid, where, f"{target} is a folder without .dcm files"))
                continue
            target = _dicom_input(target, None).path
        elif not target.exists():
            errors.append(_error(sid, where, f"{target}: no such file or directory"))
            continue
        inputs.append(SlideInput(absolute(target), sid, scan_mpp))
    return inputs, errors


def slide_inputs(paths: Iterable[Path]) -> tuple[list[SlideInput], list[SlideResult]]:
    """The slides named by `paths` (files, directories, slides CSVs), and error rows for
    those that do not exist. A directory without any slide raises SlideReadError."""
    inputs: list[SlideInput] = []
    errors: list[SlideResult] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = _from_directory(p)
            if not found:
                kinds = " ".join(sorted(SLIDE_SUFFIXES | {DICOM_SUFFIX}))
                raise SlideReadError(p, f"no slides or images found in this folder ({kinds})")
            inputs += found
        elif p.suffix.lower() == ".csv" and p.is_file():
            rows, bad = read_slides_csv(p)
            inputs, errors = inputs + rows, errors + bad
        elif p.suffix.lower() == DICOM_SUFFIX and p.is_file():
            inputs.append(SlideInput(absolute(p), p.parent.resolve().name))
        elif p.exists():
            inputs.append(SlideInput(absolute(p), p.stem))  # let the reader decide what it is
        else:
            errors.append(_error(p.stem, p, "no such file or directory"))
    return inputs, errors

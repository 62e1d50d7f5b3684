"""A site's slide -> patient table (`slide_id,patient_id` CSV): what makes the patient, not the
slide, the privacy unit of local DP-SGD. Slides missing from it count as their own patient.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.slide_ids import match_slide_ids

COLUMNS = ("slide_id", "patient_id")


def read_patients(path: Path | str) -> dict[str, str]:
    """slide_id -> patient_id from a CSV with those two columns (others are ignored).

    A slide listed twice with different patients, or with an empty id, is refused: guessing
    would silently split one patient into several privacy units.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PrivacyError(
                    f"{path}: slide->patient table lacks column(s) {', '.join(missing)} "
                    f"(needs {','.join(COLUMNS)})"
                )
            rows = list(reader)
    except FileNotFoundError:
        raise PrivacyError(f"{path}: slide->patient table not found") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise PrivacyError(f"{path}: not a readable CSV ({err})") from None
    table: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):  # the header is line 1
        slide, patient = (str(row[c] or "").strip() for c in COLUMNS)
        if not slide or not patient:
            raise PrivacyError(f"{path}: line {line}: empty slide_id or patient_id")
        if table.get(slide, patient) != patient:
            raise PrivacyError(
                f"{path}: line {line}: slide {slide!r} is listed for patients "
                f"{table[slide]!r} and {patient!r}"
            )
        table[slide] = patient
    return table


def for_slides(table: dict[str, str], slides: Iterable[str]) -> dict[str, str]:
    """`table` keyed by the cache's slide ids: a table naming slides by file stem (as ids were
    before they became relative paths) still groups them into their patients."""
    matched, _ = match_slide_ids(table, slides)
    return {matched.get(slide, slide): patient for slide, patient in table.items()}


def unmapped(slides: Iterable[str], table: dict[str, str]) -> list[str]:
    """The slides the table does not name (each then counts as its own patient)."""
    return sorted({str(s) for s in slides} - set(table))

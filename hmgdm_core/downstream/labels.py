"""Reading a site's `labels.csv` (class labels or survival times) and validating every row.

Columns: `slide_id`, then either `label` or `time` + `event` (0/1); optional `patient_id`
(default: the slide is its own patient). Every bad row is reported in one LabelError.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hmgdm_core.exceptions import LabelError
from hmgdm_core.slide_ids import id_from_path, match_slide_ids

Task = Literal["classification", "survival"]
_MAX_LISTED = 10


@dataclass(frozen=True)
class Labels:
    """Validated labels, one row per slide: `slide_id`, `patient_id`, `label` or `time`+`event`."""

    table: pd.DataFrame
    task: Task
    summary: dict = field(default_factory=dict)

    @property
    def groups(self) -> np.ndarray:
        """Patient id per slide: the grouping variable of every split."""
        return self.table["patient_id"].to_numpy()

    @property
    def strata(self) -> np.ndarray:
        """What folds are stratified on: the class, or the event indicator for survival."""
        column = "label" if self.task == "classification" else "event"
        return self.table[column].to_numpy()


def read_labels(
    path: Path | str,
    known_slides: Iterable[str] | None = None,
    *,
    n_folds: int = 5,
    task: Task | None = None,
    id_column: str = "slide_id",
    patient_column: str = "patient_id",
    only_known: bool = False,
) -> Labels:
    """Read and validate a labels CSV; raise one LabelError listing every offending row.

    `known_slides` are the slide ids that have embeddings; labelled slides outside it are errors,
    known slides without a label are counted in `summary["unlabelled_slides"]`. `id_column` and
    `patient_column` let region datasets name theirs differently (LC25000: `path`, the image
    path relative to the input folder, and `group_id`). Ids are matched to `known_slides` by
    `match_slide_ids`, so tables naming slides by file stem keep working. `only_known` keeps
    just the rows of `known_slides` (a simulated site reading the one labels file of all sites)
    and counts the others in the summary.
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise LabelError(f"{path}: labels file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LabelError(f"{path}: not a readable CSV: {err}") from None
    raw.columns = [c.strip() for c in raw.columns]
    task = _infer_task(path, raw.columns, task, id_column)

    ids = raw[id_column].str.strip()
    if id_column == "path":  # a column of image paths (LC25000), relative to the input folder
        ids = ids.map(lambda p: id_from_path(p) if p else p)
    ambiguous: dict[str, list[str]] = {}
    if known_slides is not None:
        known_slides = list(known_slides)
        matched, ambiguous = match_slide_ids(ids, known_slides)
        ids = ids.map(lambda s: matched.get(s, s))
    line = np.arange(len(raw)) + 2  # header is line 1
    other_sites = 0
    if only_known and known_slides is not None:
        mine = ids.isin(set(known_slides)).to_numpy()
        other_sites = int((~mine).sum())
        raw, ids = raw[mine].reset_index(drop=True), ids[mine].reset_index(drop=True)
        line = line[mine]
    table = pd.DataFrame({"slide_id": ids})
    if patient_column in raw.columns:
        patients = raw[patient_column].str.strip()
        table["patient_id"] = patients.where(patients != "", table["slide_id"])
    else:
        table["patient_id"] = table["slide_id"]
    problems: list[tuple[int, str]] = []
    problems += _check_ids(table["slide_id"], line, known_slides, ambiguous)
    if task == "classification":
        table["label"] = raw["label"].str.strip()
        problems += [(n, "missing label") for n in line[table["label"].eq("").to_numpy()]]
    else:
        time, event, bad = _parse_survival(raw["time"], raw["event"])
        table["time"], table["event"] = time, event
        problems += [(n, why) for n, why in zip(line, bad, strict=True) if why]
        problems += _check_patient_outcomes(table, line)
    if not problems:  # patient counts per class only mean something once every row is valid
        problems += _check_fold_counts(table, task, line, n_folds)
    if problems:
        problems.sort()
        listed = "\n".join(f"  line {n}: {why}" for n, why in problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise LabelError(f"{path}: {len(problems)} bad row(s):\n{listed}{tail}")
    summary = _summary(table, task, known_slides) | {"rows_of_other_sites": other_sites}
    return Labels(table=table, task=task, summary=summary)


def _infer_task(path: Path, columns: pd.Index, task: Task | None, id_column: str) -> Task:
    if id_column not in columns:
        raise LabelError(f"{path}: no '{id_column}' column (found: {', '.join(columns)})")
    has_label = "label" in columns
    has_survival = {"time", "event"} <= set(columns)
    if task is None:
        if has_label == has_survival:
            raise LabelError(
                f"{path}: need either a 'label' column or 'time' and 'event' columns "
                f"(found: {', '.join(columns)}); pass the task explicitly when both are present"
            )
        task = "classification" if has_label else "survival"
    if task == "classification" and not has_label:
        raise LabelError(f"{path}: classification needs a 'label' column")
    if task == "survival" and not has_survival:
        raise LabelError(f"{path}: survival needs 'time' and 'event' columns")
    return task


def _check_ids(
    slide_ids: pd.Series,
    line: np.ndarray,
    known: Iterable[str] | None,
    ambiguous: dict[str, list[str]],
) -> list[tuple[int, str]]:
    problems = [(n, "empty slide id") for n in line[slide_ids.eq("").to_numpy()]]
    first_line = dict(zip(slide_ids[::-1], line[::-1], strict=True))
    dup = slide_ids.duplicated().to_numpy() & slide_ids.ne("").to_numpy()
    problems += [
        (n, f"duplicate slide id '{s}' (first on line {first_line[s]})")
        for n, s in zip(line[dup], slide_ids[dup], strict=True)
    ]
    if known is not None:
        unknown = ~slide_ids.isin(set(known)).to_numpy() & slide_ids.ne("").to_numpy()
        pairs = zip(line[unknown], slide_ids[unknown], strict=True)
        problems += [(n, _unknown(s, ambiguous.get(s))) for n, s in pairs]
    return problems


def _unknown(slide: str, fits: list[str] | None) -> str:
    if not fits:
        return f"unknown slide '{slide}'"
    return f"slide '{slide}' fits several slides ({', '.join(fits[:3])}); use the full id"


def _parse_survival(time_raw: pd.Series, event_raw: pd.Series) -> tuple[pd.Series, pd.Series, list]:
    time = pd.to_numeric(time_raw, errors="coerce")
    event = pd.to_numeric(event_raw, errors="coerce")
    bad = []
    for t_raw, t, e_raw, e in zip(time_raw, time, event_raw, event, strict=True):
        if t_raw.strip() == "":
            bad.append("missing time")
        elif np.isnan(t) or np.isinf(t):
            bad.append(f"time '{t_raw}' is not a number")
        elif t < 0:
            bad.append(f"negative time {t_raw}")
        elif e not in (0, 1):
            bad.append(f"event '{e_raw}' is not 0 or 1")
        else:
            bad.append("")
    return time, event.fillna(-1).astype(int), bad


def _check_patient_outcomes(table: pd.DataFrame, line: np.ndarray) -> list[tuple[int, str]]:
    # A patient's slides share one outcome; disagreeing rows would make patient-level Cox ambiguous.
    n_outcomes = table.groupby("patient_id")[["time", "event"]].transform("nunique").max(axis=1)
    bad = (n_outcomes > 1).to_numpy()
    return [
        (n, f"patient '{p}' has slides with different time/event")
        for n, p in zip(line[bad], table["patient_id"][bad], strict=True)
    ]


def _check_fold_counts(
    table: pd.DataFrame, task: Task, line: np.ndarray, n_folds: int
) -> list[tuple[int, str]]:
    if task == "survival":
        n_patients = table["patient_id"].nunique()
        if n_patients >= n_folds:
            return []
        return [(int(line[0]), f"only {n_patients} patient(s), fewer than {n_folds} folds")]
    per_class = table.groupby("label")["patient_id"].nunique()
    small = per_class[per_class < n_folds]
    first_line = {c: int(line[rows[0]]) for c, rows in table.groupby("label").indices.items()}
    return [
        (first_line[c], f"class '{c}' has {k} patient(s), fewer than {n_folds} folds")
        for c, k in small.items()
    ]


def _summary(table: pd.DataFrame, task: Task, known: Iterable[str] | None) -> dict:
    summary = {
        "slides": len(table),
        "patients": int(table["patient_id"].nunique()),
        "unlabelled_slides": 0 if known is None else len(set(known) - set(table["slide_id"])),
    }
    if task == "classification":
        summary["patients_per_class"] = {
            str(k): int(v) for k, v in table.groupby("label")["patient_id"].nunique().items()
        }
    else:
        per_patient = table.drop_duplicates("patient_id")
        summary["events"] = int(per_patient["event"].sum())
        summary["censored"] = int(len(per_patient) - per_patient["event"].sum())
    return summary

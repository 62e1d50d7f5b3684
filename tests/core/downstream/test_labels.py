"""Tests of labels.csv reading: valid files, the summary, and one error per kind of bad row."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmgdm_core.downstream.labels import read_labels
from hmgdm_core.exceptions import LabelError

SLIDES = [f"s{i}" for i in range(12)]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def classification_csv(rows: list[str]) -> str:
    return "slide_id,label,patient_id\n" + "\n".join(rows) + "\n"


def survival_csv(rows: list[str]) -> str:
    return "slide_id,time,event,patient_id\n" + "\n".join(rows) + "\n"


def good_classification_rows() -> list[str]:
    # 2 classes x 3 patients, patient p0 has two slides
    return [
        "s0,tumour,p0",
        "s1,tumour,p0",
        "s2,tumour,p1",
        "s3,tumour,p2",
        "s4,normal,p3",
        "s5,normal,p4",
        "s6,normal,",
    ]


def test_classification_file_reads_with_patients_and_summary(tmp_path):
    path = write(tmp_path, classification_csv(good_classification_rows()))
    labels = read_labels(path, SLIDES, n_folds=3)
    assert labels.task == "classification"
    # empty patient_id falls back to the slide id
    assert labels.groups.tolist() == ["p0", "p0", "p1", "p2", "p3", "p4", "s6"]
    assert labels.summary["patients_per_class"] == {"normal": 3, "tumour": 3}
    assert labels.summary["unlabelled_slides"] == len(SLIDES) - 7
    assert labels.strata.tolist()[:2] == ["tumour", "tumour"]


def test_survival_file_without_patient_column_uses_slides(tmp_path):
    text = "slide_id,time,event\ns0,3.5,1\ns1,0,0\ns2,12,1\n"
    labels = read_labels(write(tmp_path, text), n_folds=2)
    assert labels.task == "survival"
    assert labels.groups.tolist() == ["s0", "s1", "s2"]
    assert labels.table["event"].tolist() == [1, 0, 1]
    assert labels.summary["events"] == 2 and labels.summary["censored"] == 1


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        (["s0,4,1,p0", "zz,3,1,p1"], "line 3: unknown slide 'zz'"),
        (["s0,,1,p0", "s1,3,1,p1"], "line 2: missing time"),
        (["s0,-2,1,p0", "s1,3,1,p1"], "line 2: negative time -2"),
        (["s0,abc,1,p0", "s1,3,1,p1"], "line 2: time 'abc' is not a number"),
        (["s0,2,2,p0", "s1,3,1,p1"], "line 2: event '2' is not 0 or 1"),
        (["s0,2,yes,p0", "s1,3,1,p1"], "line 2: event 'yes' is not 0 or 1"),
        (["s0,2,1,p0", "s0,3,1,p1"], "line 3: duplicate slide id 's0' (first on line 2)"),
        (["s0,2,1,p0", "s1,3,1,p0"], "line 3: patient 'p0' has slides with different time/event"),
    ],
)
def test_bad_survival_rows_are_listed(tmp_path, rows, reason):
    path = write(tmp_path, survival_csv(rows))
    with pytest.raises(LabelError) as err:
        read_labels(path, SLIDES, n_folds=1 + 1)
    assert str(path) in str(err.value)
    assert reason in str(err.value)


def test_class_with_too_few_patients_is_an_error(tmp_path):
    rows = [*good_classification_rows(), "s7,rare,p9"]
    with pytest.raises(LabelError, match="class 'rare' has 1 patient\\(s\\), fewer than 3 folds"):
        read_labels(write(tmp_path, classification_csv(rows)), SLIDES, n_folds=3)


def test_many_bad_rows_are_all_counted_first_ten_listed(tmp_path):
    rows = [f"x{i},tumour,p{i}" for i in range(25)]
    with pytest.raises(LabelError) as err:
        read_labels(write(tmp_path, classification_csv(rows)), SLIDES)
    message = str(err.value)
    assert "25 bad row(s)" in message
    assert message.count("unknown slide") == 10
    assert "and 15 more" in message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("slide,label\ns0,a\n", "no 'slide_id' column"),
        ("slide_id,grade\ns0,a\n", "need either a 'label' column or 'time' and 'event'"),
        ("slide_id,label,time,event\ns0,a,1,1\n", "pass the task explicitly"),
        ("slide_id,label\ns0,\n", "line 2: missing label"),
    ],
)
def test_unusable_files_name_the_problem(tmp_path, text, match):
    with pytest.raises(LabelError, match=match):
        read_labels(write(tmp_path, text), n_folds=1 + 1)


def test_missing_file_is_a_label_error(tmp_path):
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "absent.csv")

"""Tests of patient-grouped folds, including the real LC25000 groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from hmgdm_core.downstream.labels import read_labels
from hmgdm_core.downstream.splits import patient_folds, repeated_patient_folds
from hmgdm_core.exceptions import LabelError

LC25000 = DATA / "lc25000_lung/labels.csv"


def assert_grouped(folds, groups):
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(groups)))  # every row tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])


def test_patients_with_several_slides_never_straddle_a_split():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 5, size=40))  # 1-4 slides per patient
    strata = (groups % 2).astype(str)
    folds = patient_folds(strata, groups, n_folds=5, seed=3)
    assert len(folds) == 5
    assert_grouped(folds, groups)
    for _, test in folds:  # stratified: both classes in every test fold
        assert set(strata[test]) == {"0", "1"}


def test_seed_changes_folds_and_same_seed_repeats_them():
    groups = np.arange(30)
    strata = groups % 3
    first = patient_folds(strata, groups, 5, seed=1)
    again = patient_folds(strata, groups, 5, seed=1)
    other = patient_folds(strata, groups, 5, seed=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_repeated_assignments_differ_and_each_keeps_patients_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 5, size=40))  # 1-4 slides per patient
    strata = (groups % 2).astype(str)
    splits = repeated_patient_folds(strata, groups, n_folds=5, seed=7, repeats=3)
    assert [(s.repeat, s.fold) for s in splits] == [(r, k) for r in range(3) for k in range(5)]
    partitions = []
    for r in range(3):
        folds = [(s.train, s.test) for s in splits if s.repeat == r]
        assert_grouped(folds, groups)
        single = patient_folds(strata, groups, 5, seed=7 + r)  # assignment r is seeded seed + r
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, single, strict=True))
        partitions.append(frozenset(frozenset(groups[test]) for _, test in folds))
    # Which patients share a test fold differs between every two assignments (not a renumbering).
    assert len(set(partitions)) == 3


def test_too_few_patients_for_the_folds():
    with pytest.raises(LabelError, match="only 3 patients, fewer than 5 folds"):
        patient_folds([0, 1, 0, 1], ["a", "b", "c", "c"], n_folds=5)


def test_lc25000_groups_never_on_both_sides():
    stems = pd.read_csv(LC25000)["path"].map(lambda p: Path(p).stem)
    labels = read_labels(LC25000, stems, id_column="path", patient_column="group_id")
    assert labels.summary["unlabelled_slides"] == 0
    assert labels.summary["patients"] < labels.summary["slides"]  # augmented copies share groups
    folds = patient_folds(labels.strata, labels.groups, n_folds=5, seed=0)
    assert_grouped(folds, labels.groups)

"""Tests of the cross-validated linear probe: learns separable classes, chance on shuffled
labels, metrics robust to a fold missing a class, outputs written, label-efficiency curve."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from hmgdm_core.downstream.classify import (
    ProbeCV,
    classification_metrics,
    label_efficiency,
    macro_auc,
    patient_share,
    write_label_efficiency,
)
from hmgdm_core.downstream.config import EvalConfig


def cohort(seed: int = 0, n_patients: int = 60, slides: int = 2, dim: int = 16):
    """Three classes with separated centres; each patient has `slides` noisy slide embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(3, dim))
    patient_class = np.arange(n_patients) % 3
    groups = np.repeat(np.arange(n_patients), slides)
    y = np.array(["adeno", "benign", "squamous"])[patient_class[groups]]
    x = centres[patient_class[groups]] + rng.normal(size=(len(groups), dim))
    return x, y, groups


def test_probe_separates_classes():
    x, y, groups = cohort()
    probe = ProbeCV(EvalConfig(folds=5, seed=0)).fit(x, y, groups)
    assert probe.metrics_["accuracy"]["mean"] >= 0.9
    assert probe.metrics_["macro_auc"]["mean"] >= 0.95
    assert len(probe.folds_) == 5
    assert probe.confusion_.trace() / probe.confusion_.sum() >= 0.9
    assert probe.score(x, y) >= 0.9


def test_probe_on_shuffled_labels_is_near_chance():
    x, y, groups = cohort()
    rng = np.random.default_rng(1)
    # shuffle at patient level so patients keep one label
    patients = np.unique(groups)
    permuted = rng.permutation(y[np.searchsorted(groups, patients)])
    shuffled = dict(zip(patients, permuted, strict=True))
    y_shuffled = np.array([shuffled[g] for g in groups])
    probe = ProbeCV(EvalConfig(folds=5, seed=0)).fit(x, y_shuffled, groups)
    assert abs(probe.metrics_["accuracy"]["mean"] - 1 / 3) < 0.15
    assert abs(probe.metrics_["macro_auc"]["mean"] - 0.5) < 0.15


def test_macro_auc_skips_a_class_missing_from_the_fold():
    classes = np.array(["a", "b", "c"])
    y_true = np.array(["a", "a", "b", "b"])  # no "c" in this fold
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert macro_auc(y_true, proba, classes) == pytest.approx(1.0)
    assert np.isnan(macro_auc(np.array(["a", "a"]), proba[:2], classes))
    metrics = classification_metrics(y_true, proba, classes)
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0


def test_binary_macro_auc_equals_usual_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    proba = np.stack([1 - p1, p1], axis=1)
    assert macro_auc(y, proba, np.array([0, 1])) == pytest.approx(roc_auc_score(y, p1))


def test_write_outputs(tmp_path):
    x, y, groups = cohort(n_patients=30)
    probe = ProbeCV(EvalConfig(folds=3, seed=0)).fit(x, y, groups)
    paths = probe.write(tmp_path / "out")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["classes"] == ["adeno", "benign", "squamous"]
    expected = probe.metrics_["macro_f1"]["mean"]
    assert metrics["metrics"]["macro_f1"]["mean"] == pytest.approx(expected)
    folds = pd.read_csv(paths["folds"])
    assert folds["fold"].tolist() == [0, 1, 2]
    assert folds["n_test"].sum() == len(y)
    assert paths["confusion"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "confusion.png",
        "folds.csv",
        "metrics.json",
        "predictions.csv",
        "roc.png",
    ]  # no temp files left behind


def test_predictions_are_out_of_fold_per_slide_and_match_the_metrics():
    from hmgdm_core.downstream.plots import plot_roc

    x, y, groups = cohort(n_patients=30)
    probe = ProbeCV(EvalConfig(folds=3, seed=0)).fit(x, y, groups)
    ids = [f"case{g}/slide{i}" for i, g in enumerate(groups)]
    pred = probe.predictions(ids)
    assert list(pred.columns) == [
        "slide_id", "patient_id", "fold", "truth", "prediction", "p_adeno", "p_benign", "p_squamous"
    ]  # fmt: skip
    assert pred["slide_id"].tolist() == ids and (pred["truth"] == y).all()
    # Each patient is tested in exactly one fold, the fold the per-fold metrics counted it in.
    assert (pred.groupby("patient_id")["fold"].nunique() == 1).all()
    for fold, rows in pred.groupby("fold"):
        assert probe.folds_.loc[fold, "accuracy"] == pytest.approx(
            (rows["truth"] == rows["prediction"]).mean()
        )
    proba = pred[["p_adeno", "p_benign", "p_squamous"]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1)
    assert (pred["prediction"] == np.array(probe.classes_)[proba.argmax(axis=1)]).all()
    # The ROC plot has one curve per class, each labelled with the AUC of these predictions.
    from sklearn.metrics import roc_auc_score

    ax = plot_roc(y, proba, ["adeno", "benign", "squamous"])
    labels = [line.get_label() for line in ax.get_lines()]
    assert len(labels) == 4 and labels[-1] == "chance"
    auc = roc_auc_score(y == "benign", proba[:, 1])
    assert labels[1].startswith(f"benign (AUC {auc:.3f}")


def test_patient_share_keeps_whole_patients_and_every_class():
    _, y, groups = cohort(n_patients=60, slides=3)
    rng = np.random.default_rng(0)
    rows = patient_share(y, groups, 0.1, rng)
    picked = np.unique(groups[rows])
    assert len(picked) == 6  # 10% of the 20 patients of each of 3 classes
    assert set(y[rows]) == set(y)
    for patient in picked:  # never part of a patient
        assert set(np.flatnonzero(groups == patient)) <= set(rows)
    tiny = patient_share(y, groups, 0.01, np.random.default_rng(0))
    assert len(np.unique(groups[tiny])) == 3  # at least one patient per class


def test_label_efficiency_at_full_share_is_the_probe_and_separates_informative_features():
    x, y, groups = cohort(n_patients=90, dim=16)
    noise = np.random.default_rng(5).normal(size=x.shape)
    cfg = EvalConfig(folds=4, seed=0, label_shares=[1.0, 0.1], label_draws=2)
    table = label_efficiency({"signal": x, "noise": noise}, y, groups, cfg)
    assert list(table["share"].unique()) == [0.1, 1.0]  # sorted by the config
    row = table.set_index(["features", "share"])
    full = ProbeCV(cfg).fit(x, y, groups).metrics_["accuracy"]["mean"]
    assert row.loc[("signal", 1.0), "accuracy_mean"] == pytest.approx(full)
    assert row.loc[("signal", 1.0), "fits"] == 4 and row.loc[("signal", 0.1), "fits"] == 8
    assert row.loc[("signal", 0.1), "train_patients"] < row.loc[("signal", 1.0), "train_patients"]
    assert row.loc[("signal", 0.1), "accuracy_mean"] > 0.8
    assert abs(row.loc[("noise", 0.1), "accuracy_mean"] - 1 / 3) < 0.2


def test_label_efficiency_files_and_bad_shares(tmp_path):
    x, y, groups = cohort()
    cfg = EvalConfig(folds=3, label_shares=[0.25, 1.0], label_draws=1)
    files = write_label_efficiency(tmp_path, label_efficiency({"a": x}, y, groups, cfg))
    assert len(pd.read_csv(files["label_efficiency"])) == 2
    assert files["label_efficiency_plot"].stat().st_size > 1000
    for bad in ([0.0], [1.5]):
        with pytest.raises(ValidationError, match="share must be in"):
            EvalConfig(label_shares=bad)

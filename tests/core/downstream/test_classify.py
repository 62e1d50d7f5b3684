"""Tests of the cross-validated linear probe: learns separable classes, chance on shuffled
labels, metrics robust to a fold missing a class, repeated fold assignments, outputs written,
label-efficiency curve."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from hmgdm_core.downstream.classify import (
    METRICS,
    ProbeCV,
    classification_metrics,
    label_efficiency,
    macro_auc,
    make_probe,
    mean_std,
    patient_share,
    write_label_efficiency,
)
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.downstream.splits import patient_folds


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
    assert len(probe.folds_) == 5 * 3  # 5 folds of each of the default 3 assignments
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


def blurred_cohort(n_patients: int = 30):
    """`cohort` with extra noise, so accuracy varies between folds and assignments."""
    x, y, groups = cohort(n_patients=n_patients)
    return x + np.random.default_rng(7).normal(scale=4.0, size=x.shape), y, groups


def test_one_assignment_is_the_plain_patient_grouped_cv():
    x, y, groups = blurred_cohort()
    cfg = EvalConfig(folds=3, seed=4, repeats=1)
    probe = ProbeCV(cfg).fit(x, y, groups)
    # The probe before repeats existed: one patient_folds assignment, fold by fold.
    proba, folds = np.zeros((len(y), 3)), []
    for train, test in patient_folds(y, groups, 3, seed=4):
        proba[test] = make_probe(cfg).fit(x[train], y[train]).predict_proba(x[test])
        folds.append(classification_metrics(y[test], proba[test], np.unique(y)))
    assert np.array_equal(probe.oof_proba_, proba)
    assert probe.metrics_ == {m: mean_std([f[m] for f in folds]) for m in METRICS}
    assert probe.folds_["repeat"].eq(0).all()


def test_repeats_average_every_fold_of_every_assignment_and_the_probabilities():
    x, y, groups = blurred_cohort()
    probe = ProbeCV(EvalConfig(folds=3, seed=4, repeats=3)).fit(x, y, groups)
    singles = [
        ProbeCV(EvalConfig(folds=3, seed=4 + r, repeats=1)).fit(x, y, groups) for r in range(3)
    ]
    # One row per assignment x fold: assignment r is the single one seeded seed + r.
    expected = pd.concat([s.folds_.assign(repeat=r) for r, s in enumerate(singles)])
    pd.testing.assert_frame_equal(probe.folds_, expected.reset_index(drop=True))
    assert probe.folds_["accuracy"].nunique() > 3  # the folds disagree: averaging matters
    for m in METRICS:
        assert probe.metrics_[m]["mean"] == pytest.approx(probe.folds_[m].mean())
        assert probe.metrics_[m]["std"] == pytest.approx(probe.folds_[m].std(ddof=1))
    assert probe.metrics_["accuracy"] != singles[0].metrics_["accuracy"]
    # One prediction per slide: probabilities averaged over the assignments (each tests every
    # slide once), the fold that of the first assignment.
    assert np.allclose(probe.oof_proba_, np.mean([s.oof_proba_ for s in singles], axis=0))
    pred = probe.predictions()
    assert len(pred) == len(y) and np.array_equal(pred["fold"], singles[0].oof_fold_)
    proba = pred[[f"p_{c}" for c in probe.classes_]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1)
    assert (pred["prediction"] == probe.classes_[proba.argmax(axis=1)]).all()
    assert probe.confusion_.sum() == len(y)
    # A baseline gets the same assignments.
    noise = np.random.default_rng(3).normal(size=x.shape)
    assert (
        probe.add_baseline("noise", noise) == ProbeCV(probe.config).fit(noise, y, groups).metrics_
    )


def test_write_outputs(tmp_path):
    x, y, groups = cohort(n_patients=30)
    probe = ProbeCV(EvalConfig(folds=3, seed=0)).fit(x, y, groups)
    paths = probe.write(tmp_path / "out")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["classes"] == ["adeno", "benign", "squamous"] and metrics["repeats"] == 3
    expected = probe.metrics_["macro_f1"]["mean"]
    assert metrics["metrics"]["macro_f1"]["mean"] == pytest.approx(expected)
    folds = pd.read_csv(paths["folds"])  # 3 folds x the default 3 assignments
    assert folds["repeat"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert folds["fold"].tolist() == [0, 1, 2] * 3
    assert (folds.groupby("repeat")["n_test"].sum() == len(y)).all()
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
    # One assignment: each slide's prediction is the one its fold's metrics counted.
    probe = ProbeCV(EvalConfig(folds=3, seed=0, repeats=1)).fit(x, y, groups)
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
    # Every fold of the 3 assignments; at share 0.1 two draws each.
    assert row.loc[("signal", 1.0), "fits"] == 4 * 3 and row.loc[("signal", 0.1), "fits"] == 8 * 3
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

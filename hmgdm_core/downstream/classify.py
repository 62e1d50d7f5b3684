"""Linear probe on frozen embeddings: patient-grouped cross-validation, metrics and outputs.

The probe is scikit-learn's LogisticRegression on standardised embeddings; this module only
adds the folds (over `[evaluation] repeats` fold assignments), the metrics a study reports
(accuracy, macro-F1, balanced accuracy, macro AUC), the label-efficiency curve and the files
(`metrics.json`, `folds.csv`, `predictions.csv`, `confusion.png`, `roc.png`,
`label_efficiency.csv|png`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from hmgdm_core.atomic import save_figure, write_csv, write_json
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.downstream.plots import plot_confusion, plot_label_efficiency, plot_roc
from hmgdm_core.downstream.splits import repeated_patient_folds

METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "macro_auc")


def make_probe(config: EvalConfig) -> Pipeline:
    """Standardise, then multinomial logistic regression (the frozen-embedding linear probe)."""
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=config.probe_c, max_iter=config.probe_max_iter)
    )


def macro_auc(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes present in `y_true` (NaN if fewer than two).

    A test fold can miss a class; that class has no AUC and is left out of the mean rather
    than failing the fold. For two classes this equals the usual binary AUC.
    """
    aucs = [
        roc_auc_score(y_true == c, proba[:, k])
        for k, c in enumerate(classes)
        if 0 < np.sum(y_true == c) < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(y_true: ArrayLike, proba: np.ndarray, classes: ArrayLike) -> dict:
    """Accuracy, macro-F1, balanced accuracy and macro AUC of class probabilities (n, classes)."""
    y_true, classes = np.asarray(y_true), np.asarray(classes)
    y_pred = classes[np.argmax(proba, axis=1)]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_auc": macro_auc(y_true, proba, classes),
    }


def mean_std(values: ArrayLike) -> dict[str, float]:
    """Mean and sample std over folds, ignoring folds where the metric is undefined (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values, ddof=1))}


def patient_share(
    y: np.ndarray, groups: np.ndarray, share: float, rng: np.random.Generator
) -> np.ndarray:
    """Row indices of `share` of the patients of each class (at least one; a patient's class is
    that of its first row), all rows of a picked patient: a smaller labelled cohort."""
    patients, first = np.unique(groups, return_index=True)
    picked = [
        rng.choice(of_class, max(1, round(share * len(of_class))), replace=False)
        for c in np.unique(y)
        if len(of_class := patients[y[first] == c])
    ]
    return np.flatnonzero(np.isin(groups, np.concatenate(picked)))


def label_efficiency(
    features: Mapping[str, ArrayLike], y: ArrayLike, groups: ArrayLike, config: EvalConfig
) -> pd.DataFrame:
    """How many labels each embedding needs: per `config.label_shares`, the probe's accuracy on
    every test fold of ProbeCV's fold assignments when it trains on that share of the fold's
    training patients (`label_draws` seeded draws; at share 1 the plain probe). Every feature
    set gets the same folds and patients. One row per (features, share): mean and std (ddof 1)
    over assignments x folds x draws, and the mean number of training patients."""
    y, groups = np.asarray(y), np.asarray(groups)
    splits = repeated_patient_folds(y, groups, config.folds, config.seed, config.repeats)
    x_of = {name: np.asarray(x, dtype=np.float64) for name, x in features.items()}
    fits = []
    for share in config.label_shares:
        for repeat, fold, train, test in splits:
            for draw in range(1 if share == 1 else config.label_draws):
                # Keyed by the assignment's own seed: the first draws what one assignment did.
                rng = np.random.default_rng([config.seed + repeat, fold, draw, round(share * 1e6)])
                rows = train[patient_share(y[train], groups[train], share, rng)]
                for name, x in x_of.items():
                    probe = make_probe(config).fit(x[rows], y[rows])
                    fits.append({
                        "features": name, "share": share,
                        "patients": len(np.unique(groups[rows])),
                        "accuracy": accuracy_score(y[test], probe.predict(x[test])),
                    })  # fmt: skip
    table = pd.DataFrame(fits).groupby(["features", "share"], sort=False)
    return table.agg(
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", lambda a: a.std(ddof=1) if len(a) > 1 else 0.0),
        train_patients=("patients", "mean"),
        fits=("accuracy", "size"),
    ).reset_index()


def write_label_efficiency(out_dir: Path | str, table: pd.DataFrame) -> dict[str, Path]:
    """`label_efficiency.csv` (a `label_efficiency` table) and its plot `label_efficiency.png`."""
    out_dir = Path(out_dir)
    return {
        "label_efficiency": write_csv(out_dir / "label_efficiency.csv", table, private=False),
        "label_efficiency_plot": save_figure(
            out_dir / "label_efficiency.png", plot_label_efficiency(table).figure, private=False
        ),
    }


class ProbeCV:
    """Cross-validated linear probe: `fit(x, y, groups)` runs the patient-grouped folds of
    `repeats` fold assignments (`config.repeats`).

    Fitted: `classes_`, `folds_` (one row of metrics per assignment x fold), `metrics_` (mean
    and std over all those folds), `oof_proba_` (out-of-fold probabilities, averaged over the
    assignments: each tests every row once), `oof_fold_` (the fold each row was tested in by
    the first assignment), `confusion_` (of `oof_proba_`), and `model_` (the probe refitted on
    all rows, used by `predict*` and `score`).
    """

    def __init__(self, config: EvalConfig | None = None) -> None:
        self.config = config or EvalConfig()

    description = "logistic regression on standardised embeddings"

    def fit(self, x: ArrayLike, y: ArrayLike, groups: ArrayLike) -> ProbeCV:
        """`x`: embeddings (n, dim) here; what a subclass's `_fit_model` takes per row."""
        x, y, groups = self._rows(x), np.asarray(y), np.asarray(groups)
        self.y_, self.groups_, self.baselines_ = y, groups, {}
        self.classes_ = np.unique(y)
        proba_sum = np.zeros((len(y), len(self.classes_)))
        self.oof_fold_ = np.full(len(y), -1)
        rows = []
        cfg = self.config
        splits = repeated_patient_folds(y, groups, cfg.folds, cfg.seed, cfg.repeats)
        for repeat, fold, train, test in splits:
            model = self._fit_model(x[train], y[train], groups[train])
            proba = self._proba(model, x[test])
            proba_sum[test] += proba
            if repeat == 0:
                self.oof_fold_[test] = fold
            rows.append({
                "repeat": repeat, "fold": fold, "n_train": len(train),
                "n_test": len(test), **classification_metrics(y[test], proba, self.classes_),
            })  # fmt: skip
        # Each assignment tests every row once: the mean is one out-of-fold prediction per row.
        self.oof_proba_ = proba_sum / cfg.repeats
        self.folds_ = pd.DataFrame(rows)
        self.metrics_ = {m: mean_std(self.folds_[m]) for m in METRICS}
        y_oof = self.classes_[np.argmax(self.oof_proba_, axis=1)]
        self.confusion_ = confusion_matrix(y, y_oof, labels=self.classes_)
        self.model_ = self._fit_model(x, y, groups)
        return self

    def add_baseline(self, name: str, x: ArrayLike) -> dict:
        """The same probe on the same folds and labels with other features `x` (e.g. raw
        descriptors): its mean/std metrics, kept in `baselines_` and written to metrics.json."""
        other = ProbeCV(self.config).fit(x, self.y_, self.groups_)
        self.baselines_[name] = other.metrics_
        return other.metrics_

    def _rows(self, x: ArrayLike) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)  # (n, dim)

    def _fit_model(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> Pipeline:
        return make_probe(self.config).fit(x, y)

    def _proba(self, model: Pipeline, x: np.ndarray) -> np.ndarray:
        return _proba_on(model, x, self.classes_)

    def predict_proba(self, x: ArrayLike) -> np.ndarray:
        return self._proba(self.model_, self._rows(x))

    def predict(self, x: ArrayLike) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(x), axis=1)]

    def score(self, x: ArrayLike, y: ArrayLike) -> float:
        """Accuracy of the all-rows probe (use `metrics_` for the cross-validated figures)."""
        return float(accuracy_score(np.asarray(y), self.predict(x)))

    def plot(self, ax: Axes | None = None) -> Axes:
        return plot_confusion(self.confusion_, [str(c) for c in self.classes_], ax=ax)

    def predictions(self, slide_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per slide, out of fold: slide, patient, fold (of the first assignment),
        truth, prediction and the probability of each class (`p_<class>`, mean over the
        assignments)."""
        return predictions_table(
            slide_ids,
            self.groups_,
            self.oof_fold_,
            truth=self.y_,
            prediction=self.classes_[np.argmax(self.oof_proba_, axis=1)],
            **{f"p_{c}": self.oof_proba_[:, k] for k, c in enumerate(self.classes_)},
        )

    def write(self, out_dir: Path | str, slide_ids: Sequence[str] | None = None) -> dict[str, Path]:
        """Write `metrics.json`, `folds.csv`, `predictions.csv` (rows named by `slide_ids`),
        `confusion.png` and `roc.png` into `out_dir` (atomically)."""
        out_dir = Path(out_dir)
        classes = [str(c) for c in self.classes_]
        summary = {
            "task": "classification",
            "probe": self.description,
            "folds": self.config.folds,
            "repeats": self.config.repeats,
            "seed": self.config.seed,
            "classes": classes,
            "metrics": self.metrics_,
        }
        if self.baselines_:
            summary["baselines"] = self.baselines_
        return {
            "metrics": write_json(out_dir / "metrics.json", summary, private=False),
            "folds": write_csv(out_dir / "folds.csv", self.folds_, private=False),
            "confusion": save_figure(out_dir / "confusion.png", self.plot().figure, private=False),
            **write_predictions(out_dir, self.predictions(slide_ids), classes),
        }


def predictions_table(
    slide_ids: Sequence[str] | None,
    patients: ArrayLike,
    folds: ArrayLike | str,
    **columns: ArrayLike,
) -> pd.DataFrame:
    """Per-slide out-of-sample predictions: slide_id (row numbers when None), patient_id, fold
    (an index per slide, or one name such as "held-out"), then `columns` in order."""
    patients = np.asarray(patients)
    ids = np.arange(len(patients)).astype(str) if slide_ids is None else np.asarray(slide_ids)
    folds = np.broadcast_to(np.asarray(folds), patients.shape)
    return pd.DataFrame({"slide_id": ids, "patient_id": patients, "fold": folds, **columns})


def write_predictions(
    out_dir: Path | str, table: pd.DataFrame, classes: Sequence[str] | None = None
) -> dict[str, Path]:
    """`predictions.csv` (a `predictions_table`) and, given the `classes` whose `p_<class>`
    columns it has, `roc.png` of those probabilities against its `truth` column."""
    out_dir = Path(out_dir)
    files = {"predictions": write_csv(out_dir / "predictions.csv", table)}
    if classes is not None:
        proba = table[[f"p_{c}" for c in classes]].to_numpy()
        roc = plot_roc(table["truth"].to_numpy(), proba, list(classes))
        files["roc"] = save_figure(out_dir / "roc.png", roc.figure, private=False)
    return files


def _proba_on(model: Pipeline, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    # A training fold may lack a class; its column stays 0 so columns always match `classes`.
    proba = np.zeros((len(x), len(classes)))  # (n, classes)
    proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(x)
    return proba

"""Survival on frozen embeddings: lifelines Cox probe on PCA components, patient-grouped
cross-validation with per-fold and pair-count-pooled C-index, Kaplan-Meier by predicted risk.

Rows are patients (or slides, with `groups` keeping a patient's slides in one fold); risk is
the log partial hazard, higher = shorter survival.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.axes import Axes
from numpy.typing import ArrayLike
from sklearn.decomposition import PCA

from hmgdm_core.atomic import save_figure, write_csv, write_json
from hmgdm_core.downstream.classify import mean_std, predictions_table, write_predictions
from hmgdm_core.downstream.concordance import cindex, linear_risk, pair_counts, pooled_cindex
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.downstream.plots import plot_kaplan_meier
from hmgdm_core.downstream.splits import patient_folds


class CoxProbe:
    """lifelines `CoxPHFitter(penalizer)` on the first `pca_components` PCA dimensions.

    `pca_components=None` fits the covariates as given (e.g. clinical age and sex). Fitted:
    `pca_` (or None), `cox_` (the lifelines fitter), `params_` (its coefficients), `center_`
    (training mean of the fitted columns).
    """

    def __init__(
        self,
        *,
        penalizer: float = 0.1,
        pca_components: int | None = 8,
        feature_names: Sequence[str] | None = None,
    ) -> None:
        self.penalizer = penalizer
        self.pca_components = pca_components
        self.feature_names = feature_names

    def fit(self, x: ArrayLike, time: ArrayLike, event: ArrayLike) -> CoxProbe:
        x = np.asarray(x, dtype=np.float64)  # (n, dim)
        self.pca_ = None
        if self.pca_components is not None:
            k = min(self.pca_components, x.shape[1], len(x) - 1)
            self.pca_ = PCA(n_components=k, random_state=0).fit(x)
        frame = self._frame(x).assign(time=np.asarray(time), event=np.asarray(event))
        self.cox_ = CoxPHFitter(penalizer=self.penalizer).fit(frame, "time", "event")
        self.params_ = self.cox_.params_
        self.center_ = frame.drop(columns=["time", "event"]).mean().to_numpy()
        return self

    def _frame(self, x: np.ndarray) -> pd.DataFrame:
        if self.pca_ is not None:
            z = self.pca_.transform(x)
            return pd.DataFrame(z, columns=[f"pc{i + 1}" for i in range(z.shape[1])])
        names = self.feature_names or [f"x{i + 1}" for i in range(x.shape[1])]
        return pd.DataFrame(x, columns=list(names))

    def predict_risk(self, x: ArrayLike) -> np.ndarray:
        """Log partial hazard per row relative to the training mean (higher = shorter survival).

        Same values as lifelines' `predict_log_partial_hazard`, computed by `linear_risk` so
        identical rows keep exactly tied risks.
        """
        frame = self._frame(np.asarray(x, dtype=np.float64))
        return linear_risk(frame.to_numpy(), self.params_.to_numpy(), self.center_)

    def score(self, x: ArrayLike, time: ArrayLike, event: ArrayLike) -> float:
        """Harrell's C-index of the predicted risks."""
        return cindex(time, self.predict_risk(x), event)


class RiskGroupKM:
    """Kaplan-Meier of low vs high risk (split at the median risk) and their log-rank test.

    Fitted: `threshold_`, `fitters_` ({"low risk": KaplanMeierFitter, "high risk": ...}),
    `p_value_`, `statistic_`.
    """

    def fit(self, time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> RiskGroupKM:
        time, event = np.asarray(time, dtype=np.float64), np.asarray(event).astype(int)
        risk = np.asarray(risk, dtype=np.float64)
        self.threshold_ = float(np.median(risk))
        high = risk > self.threshold_
        self.fitters_ = {
            name: KaplanMeierFitter().fit(time[mask], event[mask], label=f"{name} (n={mask.sum()})")
            for name, mask in (("low risk", ~high), ("high risk", high))
        }
        test = logrank_test(time[~high], time[high], event[~high], event[high])
        self.p_value_, self.statistic_ = float(test.p_value), float(test.test_statistic)
        self._masks, self._event = {"low risk": ~high, "high risk": high}, event
        return self

    def summary(self) -> dict:
        """Group sizes, events, median survival (inf if never reached) and the log-rank test."""
        groups = {
            name: {
                "n": int(mask.sum()),
                "events": int(self._event[mask].sum()),
                "median_survival": float(self.fitters_[name].median_survival_time_),
            }
            for name, mask in self._masks.items()
        }
        return {
            "split": "median of out-of-fold risk",
            "threshold": self.threshold_,
            "groups": groups,
            "logrank_p": self.p_value_,
            "logrank_statistic": self.statistic_,
        }

    def plot(self, ax: Axes | None = None) -> Axes:
        return plot_kaplan_meier(self.fitters_, self.p_value_, ax=ax)


class SurvivalCV:
    """Cross-validated Cox probe: `fit(x, time, event, groups)` runs patient folds by event.

    Fitted: `folds_` (C-index and pair counts per fold), `oof_risk_` and `oof_fold_` (the
    fold each row was tested in), `metrics_` (per-fold
    C-index mean and std, and the C-index of the pair counts pooled over folds, which never
    compares risks of two different fold models), `km_` (RiskGroupKM of the out-of-fold
    risk), `model_` (the probe refitted on all rows).
    """

    def __init__(self, config: EvalConfig | None = None) -> None:
        self.config = config or EvalConfig()

    def _probe(self) -> CoxProbe:
        return CoxProbe(penalizer=self.config.penalizer, pca_components=self.config.pca_components)

    @property
    def description(self) -> str:
        return (
            f"lifelines CoxPHFitter(penalizer={self.config.penalizer}) "
            f"on {self.config.pca_components} PCA components"
        )

    def _rows(self, x: ArrayLike) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)  # (n, dim)

    def _fit_model(
        self, x: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray
    ) -> CoxProbe:
        return self._probe().fit(x, time, event)

    def _risk(self, model: CoxProbe, x: np.ndarray) -> np.ndarray:
        return model.predict_risk(x)

    def fit(self, x: ArrayLike, time: ArrayLike, event: ArrayLike, groups: ArrayLike) -> SurvivalCV:
        """`x`: embeddings (n, dim) here; what a subclass's `_fit_model` takes per row."""
        x, groups = self._rows(x), np.asarray(groups)
        time, event = np.asarray(time, dtype=np.float64), np.asarray(event).astype(int)
        self.time_, self.event_, self.groups_ = time, event, groups
        self.oof_risk_ = np.full(len(time), np.nan)
        self.oof_fold_ = np.full(len(time), -1)
        rows, counts = [], []
        for fold, (train, test) in enumerate(
            patient_folds(event, groups, self.config.folds, self.config.seed)
        ):
            model = self._fit_model(x[train], time[train], event[train], groups[train])
            self.oof_risk_[test] = self._risk(model, x[test])
            self.oof_fold_[test] = fold
            counts.append(pair_counts(time[test], self.oof_risk_[test], event[test]))
            rows.append(
                {
                    "fold": fold,
                    "n_train": len(train),
                    "n_test": len(test),
                    "events_test": int(event[test].sum()),
                    "cindex": counts[-1].cindex,
                    **vars(counts[-1]),
                }
            )
        self.folds_ = pd.DataFrame(rows)
        self.metrics_ = {
            "cindex": mean_std(self.folds_["cindex"]),
            "cindex_pooled": pooled_cindex(counts),
        }
        self.km_ = RiskGroupKM().fit(time, event, self.oof_risk_)
        self.model_ = self._fit_model(x, time, event, groups)
        return self

    def predict_risk(self, x: ArrayLike) -> np.ndarray:
        return self._risk(self.model_, self._rows(x))

    def score(self, x: ArrayLike, time: ArrayLike, event: ArrayLike) -> float:
        """C-index of the all-rows model (use `metrics_` for the cross-validated figures)."""
        return cindex(time, self.predict_risk(x), event)

    def plot(self, ax: Axes | None = None) -> Axes:
        return self.km_.plot(ax=ax)

    def predictions(self, slide_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per slide, out of fold: slide, patient, fold, time, event, risk (log partial
        hazard of its fold's model) and risk group (the KM plot's median split)."""
        return predictions_table(
            slide_ids,
            self.groups_,
            self.oof_fold_,
            time=self.time_,
            event=self.event_,
            risk=self.oof_risk_,
            risk_group=np.where(self.oof_risk_ > self.km_.threshold_, "high", "low"),
        )

    def write(self, out_dir: Path | str, slide_ids: Sequence[str] | None = None) -> dict[str, Path]:
        """Write `metrics.json`, `folds.csv`, `predictions.csv` (rows named by `slide_ids`),
        `km.png` and `km.json` into `out_dir` (atomically)."""
        out_dir = Path(out_dir)
        summary = {
            "task": "survival",
            "probe": self.description,
            "folds": self.config.folds,
            "seed": self.config.seed,
            "metrics": self.metrics_,
        }
        return {
            "metrics": write_json(out_dir / "metrics.json", summary, private=False),
            "folds": write_csv(out_dir / "folds.csv", self.folds_, private=False),
            **write_predictions(out_dir, self.predictions(slide_ids)),
            "km_plot": save_figure(out_dir / "km.png", self.plot().figure, private=False),
            "km": write_json(out_dir / "km.json", self.km_.summary(), private=False),
        }

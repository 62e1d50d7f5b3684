"""Tests of the Cox probe, survival cross-validation and Kaplan-Meier by risk group."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index

from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.downstream.splits import patient_folds
from hmgdm_core.downstream.survival import CoxProbe, RiskGroupKM, SurvivalCV
from hmgdm_core.downstream.tcga import COVARIATES, read_tcga_survival

TCGA_BLCA = DATA / "tcga_survival/tcga_blca_survival.csv"


def hazard_cohort(seed: int = 0, n: int = 240, dim: int = 12):
    """Embeddings whose first two dimensions set a log-hazard; ~30% censored."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    log_hazard = 1.5 * x[:, 0] - 1.0 * x[:, 1]
    event_time = rng.exponential(np.exp(-log_hazard))
    censor_time = rng.exponential(2.0 * np.median(event_time), n)
    time = np.minimum(event_time, censor_time)
    event = (event_time <= censor_time).astype(int)
    return x, time, event, np.arange(n)


def test_known_linear_hazard_is_recovered_out_of_fold():
    x, time, event, groups = hazard_cohort()
    cv = SurvivalCV(EvalConfig(folds=5, pca_components=12, penalizer=0.01)).fit(
        x, time, event, groups
    )
    assert cv.metrics_["cindex_pooled"] > 0.75
    assert cv.metrics_["cindex"]["mean"] > 0.75
    assert np.isfinite(cv.oof_risk_).all()
    assert cv.km_.p_value_ < 1e-4  # high predicted risk really dies sooner


def test_shuffled_times_give_chance_cindex():
    x, time, event, groups = hazard_cohort()
    perm = np.random.default_rng(1).permutation(len(time))
    cv = SurvivalCV(EvalConfig(folds=5, pca_components=12, penalizer=0.01)).fit(
        x, time[perm], event[perm], groups
    )
    assert abs(cv.metrics_["cindex_pooled"] - 0.5) < 0.08


def test_fold_cindex_is_lifelines_on_the_same_risks():
    x, time, event, groups = hazard_cohort(n=100)
    config = EvalConfig(folds=4, seed=7)
    cv = SurvivalCV(config).fit(x, time, event, groups)
    folds = patient_folds(event, groups, config.folds, config.seed)  # same seed, same folds
    for (_, test), (_, row) in zip(folds, cv.folds_.iterrows(), strict=True):
        expected = concordance_index(time[test], -cv.oof_risk_[test], event[test])
        assert row["cindex"] == pytest.approx(expected, abs=1e-12)
        assert row["concordant"] + row["discordant"] + row["tied_risk"] == row["comparable"]
    assert cv.km_.summary()["groups"]["high risk"]["n"] == 50


def test_cox_probe_on_tcga_clinical_covariates_equals_lifelines():
    table, _ = read_tcga_survival(TCGA_BLCA)
    x = table[list(COVARIATES)].to_numpy()
    probe = CoxProbe(penalizer=0.0, pca_components=None, feature_names=COVARIATES)
    probe.fit(x, table["time"], table["event"])
    direct = CoxPHFitter().fit(table[[*COVARIATES, "time", "event"]], "time", "event")
    np.testing.assert_allclose(probe.params_.to_numpy(), direct.params_.to_numpy(), rtol=1e-10)
    assert list(probe.params_.index) == list(COVARIATES)
    expected_c = concordance_index(
        table["time"], -direct.predict_partial_hazard(table[list(COVARIATES)]), table["event"]
    )
    assert probe.score(x, table["time"], table["event"]) == pytest.approx(expected_c, abs=1e-12)
    assert direct.params_["age"] > 0  # older bladder-cancer patients die sooner


def test_km_groups_and_logrank():
    rng = np.random.default_rng(4)
    risk = rng.normal(size=80)
    time = rng.exponential(np.exp(-2 * risk))
    event = np.ones(80, dtype=int)
    km = RiskGroupKM().fit(time, event, risk)
    summary = km.summary()
    assert summary["groups"]["low risk"]["n"] == 40 == summary["groups"]["high risk"]["n"]
    assert (
        summary["groups"]["low risk"]["median_survival"]
        > summary["groups"]["high risk"]["median_survival"]
    )
    assert km.p_value_ < 1e-3
    null = RiskGroupKM().fit(time, event, rng.normal(size=80))
    assert null.p_value_ > km.p_value_


def test_write_outputs(tmp_path):
    x, time, event, groups = hazard_cohort(n=80)
    cv = SurvivalCV(EvalConfig(folds=3)).fit(x, time, event, groups)
    paths = cv.write(tmp_path)
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["metrics"]["cindex_pooled"] == pytest.approx(cv.metrics_["cindex_pooled"])
    km = json.loads(paths["km"].read_text())
    assert km["logrank_p"] == pytest.approx(cv.km_.p_value_)
    assert len(pd.read_csv(paths["folds"])) == 3
    assert paths["km_plot"].read_bytes()[:4] == b"\x89PNG"
    pred = pd.read_csv(paths["predictions"])
    assert list(pred.columns) == [
        "slide_id", "patient_id", "fold", "time", "event", "risk", "risk_group"
    ]  # fmt: skip
    assert np.allclose(pred["time"], time) and (pred["event"] == event).all()
    # Each fold's C-index is the one of the risks written for that fold's slides.
    for fold, rows in pred.groupby("fold"):
        expected = concordance_index(rows["time"], -rows["risk"], rows["event"])
        assert cv.folds_.loc[fold, "cindex"] == pytest.approx(expected)
    assert (pred["risk_group"] == "high").sum() == km["groups"]["high risk"]["n"]

"""Federated Cox as Flower messages on the simulation engine: TCGA-BLCA's tissue source sites as
virtual hospitals, each reading only its own table; the result equals lifelines' stratified fit
on the pooled rows and the pooled pair-count C-index is the union's minus cross-site pairs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

from hmgdm_core.downstream.concordance import PairCounts, linear_risk, pair_counts
from hmgdm_core.downstream.tcga import COVARIATES, group_sites, read_tcga_survival, site_arrays
from server.simulation import simulate_clinical_survival

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BLCA = DATA / "tcga_survival" / "tcga_blca_survival.csv"


def test_sites_answer_cox_messages_and_the_server_fits_the_stratified_model(tmp_path):
    path, summary = simulate_clinical_survival(BLCA, tmp_path, min_events=20)
    m = json.loads(path.read_text())
    cases, _ = read_tcga_survival(BLCA)
    groups = group_sites(cases["site"], cases["event"], 20)
    names = sorted(groups.unique())
    assert m["sites"] == len(names) >= 3 and m["patients"] == len(cases)
    # Each virtual site read only its own tissue source site(s)' rows.
    for k, name in enumerate(names):
        own = pd.read_csv(tmp_path / "clinical" / f"site-{k}.csv", dtype={"site": str})
        assert set(own["site"]) == set(cases["site"][groups == name])
    assert m["max_relative_coef_difference"] < 1e-4  # the target is 5 %
    # The pooled C-index, recomputed from all rows: within-site pairs of the union only.
    params = np.array([m["coefficients"][c] for c in COVARIATES])
    x_all = cases[list(COVARIATES)].to_numpy(float)
    union = PairCounts()
    for x, t, e in site_arrays(cases, groups):
        union = union + pair_counts(t, linear_risk(x, params, x_all.mean(axis=0)), e)
    assert m["cindex_pooled_pairs"] == pytest.approx(union.cindex)
    sites = pd.read_csv(path.parent / "sites.csv", dtype={"site": str})
    assert sorted(sites["site"]) == names and sites["comparable"].sum() == union.comparable
    # KM from the sites whose disclosure policy released life tables (both risk groups of at
    # least 10 patients); the others sent their pair counts only.
    km = json.loads((path.parent / "km.json").read_text())
    released = sites[sites["life_tables"]]
    assert sorted(released["site"]) == m["km_sites"] == km["sites"] and len(released) >= 2
    assert sum(g["n"] for g in km["groups"].values()) == released["patients"].sum()
    assert summary["cases"] == len(cases) + summary["cases_missing_values"]

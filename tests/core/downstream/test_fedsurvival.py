"""Federated KM from summed site life tables equals lifelines on the pooled rows (binned)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test

from hmgdm_core.downstream.fedsurvival import federated_survival_report, life_table, summed_km
from hmgdm_core.downstream.tcga import COVARIATES, group_sites, read_tcga_survival, site_arrays


def test_summed_life_tables_give_the_pooled_kaplan_meier_and_logrank():
    rng = np.random.default_rng(0)
    edges = np.arange(1.0, 41.0)
    groups = {}
    for name, scale in (("low risk", 20.0), ("high risk", 8.0)):
        sites = [(np.ceil(rng.exponential(scale, n)).clip(1, 40), rng.integers(0, 2, n))
                 for n in (30, 50, 20)]  # fmt: skip
        groups[name] = sites
    tables = {g: sum(life_table(t, e, edges) for t, e in s) for g, s in groups.items()}
    fitters, p = summed_km(tables, edges)
    pooled = {g: (np.concatenate([t for t, _ in s]), np.concatenate([e for _, e in s]))
              for g, s in groups.items()}  # fmt: skip
    for g, (t, e) in pooled.items():
        direct = KaplanMeierFitter().fit(t, e).survival_function_at_times(edges).to_numpy()
        assert fitters[g].survival_function_at_times(edges).to_numpy() == pytest.approx(direct)
    (ta, ea), (tb, eb) = pooled["low risk"], pooled["high risk"]
    assert p == pytest.approx(logrank_test(ta, tb, ea, eb).p_value)


def test_report_on_a_real_cohort_matches_lifelines_and_writes_its_files(tmp_path):
    cases, _ = read_tcga_survival(DATA / "tcga_survival" / "tcga_blca_survival.csv")
    sites = group_sites(cases["site"], cases["event"], 10)
    names = sorted(sites.unique())
    m = federated_survival_report(site_arrays(cases, sites), names, tmp_path, covariates=COVARIATES)
    assert m["max_relative_coef_difference"] < 1e-4
    assert 0.5 < m["cindex_pooled_pairs"] < 0.8
    km = json.loads((tmp_path / "km.json").read_text())
    assert sum(g["n"] for g in km["groups"].values()) == m["patients"] == len(cases)
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.json", "sites.csv", "km.png"}

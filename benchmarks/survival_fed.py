"""Federated Cox on real TCGA cohorts split by tissue source site, against pooled lifelines.

For each cohort (one row per patient; covariates age and sex), tissue source sites with fewer
than MIN_EVENTS events are merged into one "other" site (and "other", if still short, into the
qualifying site with the fewest events). Federated Newton (per-site gradient + Hessian sums,
Efron ties, 0 penalizer) is compared with lifelines fitted on the pooled data:
  * site-stratified `CoxPHFitter().fit(..., strata=["site"])` -- the same model, target < 5%;
  * unstratified `CoxPHFitter().fit(...)` -- one baseline hazard for all sites, reported.
C-index: the pooled pair-count C-index (within-site pairs only, what the federation can compute
without moving patients) vs lifelines' C-index on the union of all patients.
The same fit is then run as Flower messages (`hmgdm-server survival-clinical`: each tissue
source site a virtual hospital on the simulation engine, answering `query.cox` with sums);
its coefficients and pooled C-index must equal the in-process ones.
Last output line: one JSON object.

Run: .venv/bin/python benchmarks/survival_fed.py
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from lifelines import CoxPHFitter

from hmgdm_core.downstream.concordance import cindex, linear_risk, pooled_cindex
from hmgdm_core.downstream.fedcox import FederatedCox
from hmgdm_core.downstream.tcga import COVARIATES, group_sites, read_tcga_survival, site_arrays
from server.simulation import simulate_clinical_survival

# The shared data folder sits beside the repo (../shared/data); HMGDM_DATA overrides it.
DATA = (
    Path(os.environ.get("HMGDM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    / "tcga_survival"
)
COHORTS = ("blca", "hnsc", "lusc")
MIN_EVENTS = 10
TARGET = 0.05
CINDEX_KEYS = ("cindex_federated_pairs", "cindex_lifelines_union")


def max_relative_difference(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(value - reference) / np.abs(reference)))


def run_cohort(name: str) -> dict:
    table, summary = read_tcga_survival(DATA / f"tcga_{name}_survival.csv")
    table["fed_site"] = group_sites(table["site"], table["event"], MIN_EVENTS)
    sites = site_arrays(table, table["fed_site"])
    frame = table[[*COVARIATES, "time", "event", "fed_site"]]

    start = time.perf_counter()
    fed = FederatedCox(ties="efron").fit(sites)
    fed_seconds = time.perf_counter() - start
    fed_breslow = FederatedCox(ties="breslow").fit(sites)
    start = time.perf_counter()
    stratified = CoxPHFitter().fit(frame, "time", "event", strata=["fed_site"])
    lifelines_seconds = time.perf_counter() - start
    pooled = CoxPHFitter().fit(frame.drop(columns="fed_site"), "time", "event")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = simulate_clinical_survival(
            DATA / f"tcga_{name}_survival.csv", Path(tmp), min_events=MIN_EVENTS
        )
        flower = json.loads(path.read_text())
    flower_seconds = time.perf_counter() - start
    flower_coef = np.array([flower["coefficients"][c] for c in COVARIATES])

    x, t, e = table[list(COVARIATES)].to_numpy(), table["time"], table["event"]
    return {
        "cohort": name,
        "patients": len(table),
        "events": summary["events"],
        "dropped_missing": summary["cases_missing_values"],
        "tissue_source_sites": int(table["site"].nunique()),
        "federated_sites": int(table["fed_site"].nunique()),
        "rounds": fed.rounds_,
        "coef_federated": fed.params_.tolist(),
        "coef_stratified": stratified.params_.to_list(),
        "coef_pooled": pooled.params_.to_list(),
        "rel_diff_stratified": max_relative_difference(fed.params_, stratified.params_.to_numpy()),
        "rel_diff_breslow_vs_stratified": max_relative_difference(
            fed_breslow.params_, stratified.params_.to_numpy()
        ),
        "rel_diff_pooled": max_relative_difference(fed.params_, pooled.params_.to_numpy()),
        "cindex_federated_pairs": pooled_cindex(fed.pair_counts(sites)),
        "cindex_federated_union": cindex(t, fed.predict_risk(x), e),
        "se_diff_pooled": float(
            np.max(np.abs(fed.params_ - pooled.params_.to_numpy()) / pooled.standard_errors_)
        ),
        "cindex_lifelines_union": cindex(t, linear_risk(x, pooled.params_, x.mean(axis=0)), e),
        "coef_flower": flower_coef.tolist(),
        "rel_diff_flower_stratified": flower["max_relative_coef_difference"],
        "cindex_flower_pairs": flower["cindex_pooled_pairs"],
        "seconds_flower": flower_seconds,
        "seconds_federated": fed_seconds,
        "seconds_lifelines": lifelines_seconds,
    }


def main() -> None:
    results = [run_cohort(name) for name in COHORTS]
    print(f"covariates {list(COVARIATES)}; sites with < {MIN_EVENTS} events merged into 'other'")
    for r in results:
        print(
            f"\n{r['cohort'].upper()}: {r['patients']} patients, {r['events']} events "
            f"({r['dropped_missing']} dropped for missing values), "
            f"{r['tissue_source_sites']} tissue source sites -> {r['federated_sites']} sites, "
            f"{r['rounds']} Newton rounds"
        )
        for label, key in (
            ("federated Newton (Efron)", "coef_federated"),
            ("same, as Flower messages", "coef_flower"),
            ("lifelines stratified by site", "coef_stratified"),
            ("lifelines pooled, unstratified", "coef_pooled"),
        ):
            coefs = ", ".join(f"{c}={v:+.5f}" for c, v in zip(COVARIATES, r[key], strict=True))
            print(f"  {label:32s} {coefs}")
        print(
            f"  max rel. coef diff: vs stratified {r['rel_diff_stratified']:.2e} "
            f"(Breslow ties: {r['rel_diff_breslow_vs_stratified']:.2e}), "
            f"vs unstratified {r['rel_diff_pooled']:.2e} "
            f"(= {r['se_diff_pooled']:.2f} standard errors)"
        )
        print(
            f"  C-index: federated pair counts (within sites) {r['cindex_federated_pairs']:.4f}, "
            f"federated risk on union {r['cindex_federated_union']:.4f}, "
            f"lifelines pooled on union {r['cindex_lifelines_union']:.4f}"
        )
        print(
            f"  time: federated {r['seconds_federated'] * 1e3:.0f} ms, "
            f"lifelines stratified {r['seconds_lifelines'] * 1e3:.0f} ms, "
            f"Flower simulation (start-up included) {r['seconds_flower']:.1f} s"
        )
        print(
            f"  Flower messages: C-index {r['cindex_flower_pairs']:.4f}, max rel. coef diff "
            f"to lifelines stratified {r['rel_diff_flower_stratified']:.2e}"
        )
    worst = {
        r["cohort"]: max(r["rel_diff_stratified"], r["rel_diff_flower_stratified"]) for r in results
    }
    same = all(
        math.isclose(r["cindex_flower_pairs"], r["cindex_federated_pairs"], rel_tol=1e-9)
        for r in results
    )
    summary = {
        "benchmark": "survival_fed",
        "max_rel_coef_diff_stratified": worst,
        "max_rel_coef_diff_unstratified": {r["cohort"]: r["rel_diff_pooled"] for r in results},
        "max_se_diff_unstratified": {r["cohort"]: r["se_diff_pooled"] for r in results},
        "cindex_pairs_vs_union": {
            r["cohort"]: [round(r[k], 4) for k in CINDEX_KEYS] for r in results
        },
        "flower_equals_in_process_cindex": same,
        "seconds_flower": {r["cohort"]: round(r["seconds_flower"], 1) for r in results},
        "target": TARGET,
        "met": same and all(v < TARGET for v in worst.values()),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

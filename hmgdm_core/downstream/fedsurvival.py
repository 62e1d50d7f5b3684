"""Federated survival report on clinical covariates: what each site would send, summed.

Per site: covariate moments, then Cox gradient/Hessian sums per Newton round (`FederatedCox`),
then the concordance pair counts of its own patients and a binned life table (events and
censorings per time bin) of its low- and high-risk patients. The server sums them: a
site-stratified Cox fit, the pooled pair-count C-index (cross-site pairs are not compared) and
Kaplan-Meier curves with a log-rank test from the summed life tables (exact up to the bin
width). No row of any site is pooled; the lifelines fit on the pooled rows is only the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

from hmgdm_core.atomic import save_figure, write_csv, write_json
from hmgdm_core.downstream.concordance import pooled_cindex
from hmgdm_core.downstream.fedcox import FederatedCox, Site
from hmgdm_core.downstream.plots import plot_kaplan_meier

GROUPS = ("low risk", "high risk")


def life_table(time: np.ndarray, event: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(2, bins) counts of events (row 1) and censorings (row 0) per time bin; a time falls in
    the bin whose upper edge is the first >= it, and counts as that edge."""
    b = np.clip(np.searchsorted(edges, time, side="left"), 0, len(edges) - 1)
    table = np.zeros((2, len(edges)), dtype=np.int64)
    np.add.at(table, (np.asarray(event, dtype=int), b), 1)
    return table


def summed_km(
    tables: dict[str, np.ndarray], edges: np.ndarray
) -> tuple[dict[str, KaplanMeierFitter], float]:
    """Kaplan-Meier per group and the log-rank p-value from summed life tables (lifelines,
    each bin edge a duration weighted by its count)."""
    fitters, data = {}, {}
    for name, table in tables.items():
        durations = np.concatenate([edges, edges])
        observed = np.repeat([0, 1], len(edges))
        weights = table.reshape(-1).astype(float)
        keep = weights > 0
        data[name] = (durations[keep], observed[keep], weights[keep])
        label = f"{name} (n={int(weights.sum())})"
        fitters[name] = KaplanMeierFitter().fit(*data[name][:2], weights=data[name][2], label=label)
    (ta, ea, wa), (tb, eb, wb) = data[GROUPS[0]], data[GROUPS[1]]
    test = logrank_test(ta, tb, ea, eb, weights_A=wa, weights_B=wb)
    return fitters, float(test.p_value)


def federated_survival_report(
    sites: Sequence[Site],
    names: Sequence[str],
    out_dir: Path | str,
    *,
    covariates: Sequence[str],
    bin_width: float = 1.0,
) -> dict:
    """Fit, evaluate and plot; writes metrics.json, sites.csv, km.png and km.json in `out_dir`."""
    out_dir = Path(out_dir)
    fed = FederatedCox(ties="efron").fit(sites)
    counts = fed.pair_counts(sites)
    max_time = max(float(np.max(t)) for _, t, _ in sites)
    edges = np.arange(bin_width, max_time + bin_width, bin_width)
    tables = {g: np.zeros((2, len(edges)), dtype=np.int64) for g in GROUPS}
    rows = []
    for name, (x, t, e), c in zip(names, sites, counts, strict=True):
        # Above the pooled-mean hazard = high risk: a threshold every site knows without data.
        high = fed.predict_risk(x) > 0
        tables["low risk"] += life_table(t[~high], e[~high], edges)
        tables["high risk"] += life_table(t[high], e[high], edges)
        rows.append({"site": name, "patients": len(t), "events": int(e.sum()),
                     "cindex": c.cindex, **vars(c)})  # fmt: skip
    fitters, p_value = summed_km(tables, edges)
    reference = _stratified_lifelines(sites, covariates)
    coef = dict(zip(covariates, fed.params_.tolist(), strict=True))
    rel = np.abs(fed.params_ - reference.to_numpy()) / np.abs(reference.to_numpy())
    metrics = {
        "model": "site-stratified Cox (Efron ties), federated Newton on summed site statistics",
        "sites": len(sites),
        "patients": int(sum(len(t) for _, t, _ in sites)),
        "events": int(sum(e.sum() for _, _, e in sites)),
        "newton_rounds": fed.rounds_,
        "coefficients": coef,
        "coefficients_lifelines_pooled_rows": reference.to_dict(),
        "max_relative_coef_difference": float(rel.max()),
        "cindex_pooled_pairs": pooled_cindex(counts),
        "cross_site_pairs": "not compared",
        "logrank_p": p_value,
        "km_bin_width": bin_width,
    }
    km_summary = {
        "split": "risk above vs below the pooled-mean hazard",
        "groups": {
            g: {
                "n": int(tables[g].sum()),
                "events": int(tables[g][1].sum()),
                "median_survival": float(fitters[g].median_survival_time_),
            }
            for g in GROUPS
        },
        "logrank_p": p_value,
    }
    ax = plot_kaplan_meier(fitters, p_value)
    ax.set_title(f"Federated Kaplan-Meier, {len(sites)} sites (log-rank p = {p_value:.2g})")
    write_json(out_dir / "metrics.json", metrics)
    write_csv(out_dir / "sites.csv", pd.DataFrame(rows))
    write_json(out_dir / "km.json", km_summary)
    save_figure(out_dir / "km.png", ax.figure)
    return metrics


def _stratified_lifelines(sites: Sequence[Site], covariates: Sequence[str]) -> pd.Series:
    """The check: lifelines on the pooled rows, one baseline hazard per site, Efron ties."""
    frames = [
        pd.DataFrame(x, columns=list(covariates)).assign(time=t, event=e, site=i)
        for i, (x, t, e) in enumerate(sites)
    ]
    fitter = CoxPHFitter().fit(pd.concat(frames), "time", "event", strata=["site"])
    return fitter.params_

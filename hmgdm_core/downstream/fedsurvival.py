"""Federated survival report on clinical covariates: what each site sends and how it is summed.

Per site: covariate moments, then Cox gradient/Hessian sums per Newton round (`FederatedCox`),
then `evaluate_site`: the concordance pair counts of its own patients and a binned life table
(events and censorings per time bin) of its low- and high-risk patients. The server sums them
(`write_survival_report`): a site-stratified Cox fit, the pooled pair-count C-index (cross-site
pairs are not compared) and Kaplan-Meier curves with a log-rank test from the summed life
tables (exact up to the bin width). No row of any site is pooled; the lifelines fit on the
pooled rows (`lifelines_check`) is only the check, for whoever holds all rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

from hmgdm_core.atomic import save_figure, write_csv, write_json
from hmgdm_core.downstream.concordance import PairCounts, linear_risk, pair_counts, pooled_cindex
from hmgdm_core.downstream.fedcox import FederatedCox, SiteRows
from hmgdm_core.downstream.plots import plot_kaplan_meier
from hmgdm_core.privacy.disclosure import time_bins

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


@dataclass(frozen=True)
class SiteEvaluation:
    """What a site reports on the final model: counts only, no row of its patients.

    `tables` holds, per risk group, the site's life table on the bins `bin_width * (1..k)` up
    to its own last time (the server pads shorter tables with zeros before summing); empty
    when the site's disclosure policy withheld them.
    """

    patients: int
    events: int
    counts: PairCounts
    tables: dict[str, np.ndarray]  # group -> (2, bins) censorings, events


def evaluate_site(
    x: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    params: np.ndarray,
    center: np.ndarray,
    bin_width: float | None,
) -> SiteEvaluation:
    """Pair counts of the model's risks among this site's patients and the life tables of its
    low- and high-risk patients (above the pooled-mean hazard = high, a threshold every site
    knows without data); no life tables when `bin_width` is None (the site withholds them)."""
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=int)
    risk = linear_risk(x, params, center)
    tables = {}
    if bin_width is not None:
        edges = bin_width * np.arange(1, time_bins(time.max(initial=0.0), bin_width) + 1)
        high = risk > 0
        tables = {
            GROUPS[0]: life_table(time[~high], event[~high], edges),
            GROUPS[1]: life_table(time[high], event[high], edges),
        }
    return SiteEvaluation(len(time), int(event.sum()), pair_counts(time, risk, event), tables)


def write_survival_report(
    fed: FederatedCox,
    sites: Mapping[str, SiteEvaluation],
    out_dir: Path | str,
    *,
    covariates: Sequence[str],
    bin_width: float,
) -> dict:
    """The server's report from the fitted model and the sites' evaluations: metrics.json,
    sites.csv, km.json and km.png in `out_dir` (pooled C-index, KM from summed life tables of
    the sites that released them; without any, no KM)."""
    out_dir = Path(out_dir)
    rows = [
        {"site": name, "patients": s.patients, "events": s.events, "cindex": s.counts.cindex,
         **vars(s.counts), "life_tables": bool(s.tables)}
        for name, s in sites.items()
    ]  # fmt: skip
    with_tables = {name: s for name, s in sites.items() if s.tables}
    metrics = {
        "model": "site-stratified Cox (Efron ties), federated Newton on summed site statistics",
        "sites": len(sites),
        "patients": int(sum(s.patients for s in sites.values())),
        "events": int(sum(s.events for s in sites.values())),
        "newton_rounds": fed.rounds_,
        "coefficients": dict(zip(covariates, fed.params_.tolist(), strict=True)),
        "cindex_pooled_pairs": pooled_cindex(s.counts for s in sites.values()),
        "cross_site_pairs": "not compared",
        "km_bin_width": bin_width,
        # A site's disclosure policy may withhold its life tables (e.g. a risk group too small).
        "km_sites": sorted(with_tables),
        "km_patients": int(sum(s.patients for s in with_tables.values())),
        "logrank_p": None,
    }
    write_csv(out_dir / "sites.csv", pd.DataFrame(rows), private=False)
    if with_tables:
        metrics["logrank_p"] = _write_km(with_tables, out_dir, bin_width)
    write_json(out_dir / "metrics.json", metrics, private=False)
    return metrics


def _write_km(sites: Mapping[str, SiteEvaluation], out_dir: Path, bin_width: float) -> float:
    """km.json and km.png from the summed life tables of `sites`; the log-rank p-value."""
    bins = max(e.tables[g].shape[1] for e in sites.values() for g in GROUPS)
    edges = bin_width * np.arange(1, bins + 1)
    tables = {g: np.zeros((2, bins), dtype=np.int64) for g in GROUPS}
    for site in sites.values():
        for g in GROUPS:
            tables[g][:, : site.tables[g].shape[1]] += site.tables[g]
    fitters, p_value = summed_km(tables, edges)
    km_summary = {
        "split": "risk above vs below the pooled-mean hazard",
        "sites": sorted(sites),
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
    write_json(out_dir / "km.json", km_summary, private=False)
    save_figure(out_dir / "km.png", ax.figure, private=False)
    return p_value


def lifelines_check(
    sites: Sequence[SiteRows], covariates: Sequence[str], params: np.ndarray
) -> dict[str, object]:
    """The check, for whoever holds all rows (a simulation, a test): lifelines on the pooled
    rows, one baseline hazard per site, Efron ties, and the largest relative difference."""
    frames = [
        pd.DataFrame(x, columns=list(covariates)).assign(time=t, event=e, site=i)
        for i, (x, t, e) in enumerate(sites)
    ]
    reference = CoxPHFitter().fit(pd.concat(frames), "time", "event", strata=["site"]).params_
    rel = np.abs(np.asarray(params) - reference.to_numpy()) / np.abs(reference.to_numpy())
    return {
        "coefficients_lifelines_pooled_rows": reference.to_dict(),
        "max_relative_coef_difference": float(rel.max()),
    }


def federated_survival_report(
    sites: Sequence[SiteRows],
    names: Sequence[str],
    out_dir: Path | str,
    *,
    covariates: Sequence[str],
    bin_width: float = 1.0,
) -> dict:
    """The whole exchange in one process (tests, benchmarks): fit, evaluate every site, write
    the report, and add the lifelines check on the pooled rows to metrics.json."""
    fed = FederatedCox(ties="efron").fit(sites)
    evaluations = {
        name: evaluate_site(x, t, e, fed.params_, fed.mean_, bin_width)
        for name, (x, t, e) in zip(names, sites, strict=True)
    }
    metrics = write_survival_report(
        fed, evaluations, out_dir, covariates=covariates, bin_width=bin_width
    )
    metrics |= lifelines_check(sites, covariates, fed.params_)
    write_json(Path(out_dir) / "metrics.json", metrics, private=False)
    return metrics

"""Reading a TCGA clinical survival table (one row per diagnostic slide) as one row per patient,
and grouping tissue source sites into federated sites with enough events.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from hmgdm_core.exceptions import LabelError

if TYPE_CHECKING:  # lifelines comes with fedcox; reading a table needs none of it
    from hmgdm_core.downstream.fedcox import SiteRows

COVARIATES = ("age", "is_female")
_COLUMNS = ("case_id", "site", "survival_months", "censorship", *COVARIATES)


def read_tcga_survival(path: Path | str) -> tuple[pd.DataFrame, dict]:
    """One row per case: `case_id, site, time, event, age, is_female`, plus a summary.

    event = 1 - censorship. Cases missing a covariate, time or censorship cannot enter a Cox
    fit; they are removed and counted in the summary (never dropped silently).
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype={"site": str, "case_id": str})
    except FileNotFoundError:
        raise LabelError(f"{path}: survival table not found") from None
    missing = [c for c in _COLUMNS if c not in raw.columns]
    if missing:
        raise LabelError(f"{path}: missing column(s) {missing}")
    cases = raw.loc[:, list(_COLUMNS)].drop_duplicates()
    conflicting = cases["case_id"][cases["case_id"].duplicated()].unique()
    if len(conflicting):
        listed = ", ".join(conflicting[:10])
        raise LabelError(f"{path}: slides of one case disagree on outcome or covariates: {listed}")
    complete = cases.dropna()
    bad = (complete["survival_months"] < 0) | ~complete["censorship"].isin([0, 1])
    if bad.any():
        listed = ", ".join(complete["case_id"][bad][:10])
        raise LabelError(f"{path}: negative time or censorship not 0/1 for cases {listed}")
    table = pd.DataFrame(
        {
            "case_id": complete["case_id"],
            "site": complete["site"],
            "time": complete["survival_months"].astype(float),
            "event": (1 - complete["censorship"]).astype(int),
            **{c: complete[c].astype(float) for c in COVARIATES},
        }
    ).reset_index(drop=True)
    summary = {
        "slides": len(raw),
        "cases": len(cases),
        "cases_missing_values": len(cases) - len(complete),
        "events": int(table["event"].sum()),
    }
    return table, summary


def group_sites(site: pd.Series, event: pd.Series, min_events: int) -> pd.Series:
    """Federated site per row: a tissue source site with >= `min_events` events keeps its name;
    the smaller ones are merged into one "other" site (which, if still short of events, is
    merged into the site with the fewest events that qualified on its own).
    """
    events = event.groupby(site).sum()
    small = events.index[events < min_events]
    grouped = site.where(~site.isin(small), "other")
    large = events[events >= min_events]
    if len(small) and events[small].sum() < min_events and len(large):
        grouped = grouped.replace("other", large.idxmin())
    return grouped


def site_arrays(table: pd.DataFrame, sites: pd.Series) -> list[SiteRows]:
    """(x, time, event) per federated site, covariates in `COVARIATES` order."""
    return [
        (
            part.loc[:, list(COVARIATES)].to_numpy(float),
            part["time"].to_numpy(float),
            part["event"].to_numpy(int),
        )
        for _, part in table.groupby(sites.to_numpy(), sort=True)
    ]

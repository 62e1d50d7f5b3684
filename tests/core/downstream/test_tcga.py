"""Tests of reading the TCGA survival tables per patient and grouping sites by events."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import DATA

from hmgdm_core.downstream.tcga import group_sites, read_tcga_survival, site_arrays
from hmgdm_core.exceptions import LabelError

TCGA = DATA / "tcga_survival"


def test_real_cohort_collapses_to_one_row_per_case():
    raw = pd.read_csv(TCGA / "tcga_brca_survival.csv")
    table, summary = read_tcga_survival(TCGA / "tcga_brca_survival.csv")
    assert table["case_id"].is_unique
    assert summary["cases"] == raw["case_id"].nunique()
    assert summary["cases"] == len(table) + summary["cases_missing_values"]
    assert summary["slides"] == len(raw) > len(table)  # some cases have several slides
    first = raw.drop_duplicates("case_id").set_index("case_id")
    case = table.iloc[0]
    assert case["event"] == 1 - first.loc[case["case_id"], "censorship"]


def test_cases_with_missing_covariates_are_counted_not_hidden():
    table, summary = read_tcga_survival(TCGA / "tcga_luad_survival.csv")
    assert summary["cases_missing_values"] > 0
    assert not table.isna().any().any()


def test_group_sites_merges_small_sites():
    site = pd.Series(list("AAAABBBCCD"))
    # A: 4 events, B: 3, C: 2, D: 1 -> C and D merge into "other" with 3 events
    grouped = group_sites(site, pd.Series([1, 1, 1, 1, 1, 1, 1, 1, 1, 1]), min_events=3)
    assert grouped.tolist() == list("AAAABBB") + ["other"] * 3
    frame = pd.DataFrame({"age": range(10), "is_female": 0, "time": 1.0, "event": 1})
    assert [len(x) for x, _, _ in site_arrays(frame, grouped)] == [4, 3, 3]
    # "other" with too few events (1) joins the qualifying site with fewest events (B)
    sparse = group_sites(site, pd.Series([1, 1, 1, 1, 1, 1, 1, 1, 0, 0]), min_events=3)
    assert sparse.tolist() == list("AAAA") + ["B"] * 6


def test_conflicting_slides_of_a_case_are_an_error(tmp_path):
    path = tmp_path / "cohort.csv"
    path.write_text(
        "case_id,slide_id,age,site,survival_months,censorship,is_female,oncotree_code\n"
        "C1,s1,50,AA,10,0,1,X\nC1,s2,50,AA,12,0,1,X\n"
    )
    with pytest.raises(LabelError, match="disagree on outcome or covariates: C1"):
        read_tcga_survival(path)

"""The server's pooled downstream figures: count-weighted means, summed pair counts."""

from __future__ import annotations

import pytest

from hmgdm_core.downstream.finetune import Task
from server.downstream import pooled_figures, site_figures


def test_classification_pools_count_weighted_and_skips_undefined_metrics():
    sites = {
        "a": {"accuracy": 1.0, "macro-auc": 0.9, "num-examples": 30},
        "b": {"accuracy": 0.5, "num-examples": 10},  # one-class test split: no AUC
    }
    pooled = pooled_figures(Task("classification", ("x", "y")), sites)
    assert pooled["accuracy"] == pytest.approx((30 * 1.0 + 10 * 0.5) / 40)
    assert pooled["macro_auc"] == pytest.approx(0.9) and pooled["slides"] == 40


def test_survival_pools_pair_counts_not_site_cindices():
    a = {"concordant": 9, "discordant": 1, "tied-risk": 0, "comparable": 10, "events": 5,
         "num-examples": 8}  # fmt: skip
    b = {"concordant": 10, "discordant": 80, "tied-risk": 10, "comparable": 100, "events": 20,
         "num-examples": 30}  # fmt: skip
    task = Task("survival")
    pooled = pooled_figures(task, {"a": a, "b": b})
    assert pooled["cindex_pooled_pairs"] == pytest.approx((19 + 5) / 110)
    mean_of_sites = (site_figures(task, a)["cindex"] + site_figures(task, b)["cindex"]) / 2
    assert pooled["cindex_pooled_pairs"] != pytest.approx(mean_of_sites)
    assert pooled["patients"] == 38 and pooled["events"] == 25

"""Federated fine-tuning and evaluation on Flower's simulation engine: two sites, each with its
own labels, a tiny model; the server's pooled figures come from per-site counts only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_MODEL
from region_graphs import random_region_graph

from hmgdm_core.config import load_config
from hmgdm_core.data import graph_dims
from hmgdm_core.downstream.concordance import PairCounts, pair_counts
from hmgdm_core.downstream.finetune import load_slide_net, predict
from hmgdm_core.downstream.splits import patient_folds
from hmgdm_core.graph.cache import SlideGraphWriter, graph_path, load_graph_dir
from hmgdm_core.train import build_model, save_checkpoint
from server.simulation import simulate_downstream

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = 2
FAST = {
    "evaluation.folds": 3,
    "evaluation.fed_rounds": 2,
    "evaluation.finetune.hidden": 8,
    "evaluation.finetune.lr": 0.01,
    "disclosure.min_patients": 1,  # 4 held-out patients a site (the policy: tests/client)
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 one-graph synthetic slides; 'spread' slides have entities 4x further apart."""
    root = tmp_path_factory.mktemp("cohort")
    rows, graphs = [], []
    rng = np.random.default_rng(0)
    for i in range(24):
        spread = i % 2
        g = random_region_graph(12, seed=i, slide_id=f"s{i:02d}")
        g.pos = g.pos * (1 + 3 * spread)
        with SlideGraphWriter(graph_path(root / "graphs", g.slide_id)) as writer:
            writer.add(g)
            writer.commit({"slide_id": g.slide_id})
        graphs.append(g)
        time = float(np.exp(-2 * spread + 0.3 * rng.normal()))
        rows.append({"slide_id": g.slide_id, "time": time, "event": 1})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    cfg = load_config(None, TINY_MODEL)
    save_checkpoint(root / "ckpt.pt", model=build_model(cfg, graph_dims(graphs)), cfg=cfg, epoch=0)
    return root


def test_sites_finetune_on_their_own_labels_and_the_server_pools_their_pair_counts(
    cohort, tmp_path
):
    task = "survival"  # classification runs the same path; its pooling: tests/client
    path = simulate_downstream(
        cohort / "graphs", cohort / "labels.csv", cohort / "ckpt.pt", tmp_path,
        task=task, sites=SITES, overrides=FAST,
    )  # fmt: skip
    result = json.loads(path.read_text())
    assert len(result["sites"]) == SITES and len(result["history"]) == 2
    sites = result["sites"].values()
    # Each site evaluated its own held-out third: 4 of its 12 slides.
    assert [s["num_examples"] for s in sites] == [4] * SITES
    counts = [PairCounts(*(int(s[k]) for k in ("concordant", "discordant", "tied_risk",
                                               "comparable"))) for s in sites]  # fmt: skip
    assert result["pooled"]["comparable"] == sum(c.comparable for c in counts)
    assert result["pooled"]["cindex_pooled_pairs"] == pytest.approx(
        sum(counts, PairCounts()).cindex
    )
    # The same figure from the final model on the union of the sites' held-out patients, with
    # cross-site pairs removed: each site's partition and test fold recomputed here.
    net, got, _ = load_slide_net(path.parent / "finetuned.pt")
    assert got.kind == task
    labels = pd.read_csv(cohort / "labels.csv").set_index("slide_id")
    graphs = {g.slide_id: g for g in load_graph_dir(cohort / "graphs")}
    slides = sorted(graphs)
    union = PairCounts()
    for pid in range(SITES):
        mine = labels.loc[slides[pid::SITES]]
        _, test = patient_folds(mine["event"].to_numpy(), mine.index.to_numpy(), 3, 0)[0]
        rows = mine.iloc[test]
        risk = predict(net, [[graphs[s]] for s in rows.index])[:, 0].double().numpy()
        union = union + pair_counts(rows["time"].to_numpy(), risk, rows["event"].to_numpy())
        # The site kept its per-slide predictions of the last evaluation on its own disk.
        (mine_csv,) = (tmp_path / "sites" / f"site-{pid}" / "downstream").glob("run-*/*.csv")
        pred = pd.read_csv(mine_csv, dtype={"slide_id": str}).set_index("slide_id")
        assert sorted(pred.index) == sorted(rows.index) and (pred["fold"] == "held-out").all()
        assert pred.loc[rows.index, "risk"].to_numpy() == pytest.approx(risk, abs=1e-5)
    assert not list(path.parent.rglob("predictions.csv"))  # the server's run has none
    assert union.comparable == result["pooled"]["comparable"]
    assert union.cindex == pytest.approx(result["pooled"]["cindex_pooled_pairs"])

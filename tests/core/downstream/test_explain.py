"""Importance painting: every entity's cell carries its own importance, brighter = more."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL
from region_graphs import random_region_graph

from hmgdm_core.config import load_config
from hmgdm_core.data import graph_dims
from hmgdm_core.downstream.config import EvalConfig, FinetuneConfig
from hmgdm_core.downstream.explain import (
    Explanation,
    entity_importance,
    importance_map,
    plot_importance,
)
from hmgdm_core.downstream.finetune import Task, collate, make_net
from hmgdm_core.train import build_model


def test_each_entity_cell_is_painted_with_its_importance_and_colours_follow_it():
    rng = np.random.default_rng(0)
    pos = np.array([[10.0, 10.0], [40.0, 12.0], [25.0, 40.0], [45.0, 45.0]])  # µm
    importance = rng.permutation(np.array([0.1, 0.2, 0.3, 0.4]))
    values = importance_map((60, 60), 1.0, pos, importance, radius_um=8.0)
    at = values[pos[:, 1].astype(int), pos[:, 0].astype(int)]  # pixel (row=y, col=x)
    np.testing.assert_array_equal(at, importance)
    assert np.isnan(values[0, 59])  # far from every centroid: unpainted
    # The figure's overlay maps those values through its colour map monotonically.
    thumb = np.full((60, 60, 3), 255, np.uint8)
    table = {"x_um": pos[:, 0], "y_um": pos[:, 1], "importance": importance, "tile": 0}
    fig = plot_importance(thumb, 1.0, Explanation(pd.DataFrame(table), "x", "attention"), 8.0)
    overlay = fig.axes[1].get_images()[1]
    rgba = overlay.to_rgba(overlay.get_array())[pos[:, 1].astype(int), pos[:, 0].astype(int)]
    brightness = rgba[:, :3].sum(axis=1)  # inferno: brighter = higher value
    assert list(np.argsort(brightness)) == list(np.argsort(importance))


def test_attention_sums_to_one_and_gradient_importance_explains_the_output():
    graphs = [random_region_graph(15, seed=s, slide_id="a") for s in (1, 2)]
    cfg = load_config(None, TINY_MODEL)
    backbone = build_model(cfg, graph_dims(graphs))
    small = EvalConfig(finetune=FinetuneConfig(hidden=8))
    net = make_net(backbone, Task("survival"), small, seed=0)
    att = entity_importance(net, Task("survival"), graphs, "attention").table
    assert len(att) == 30 and np.isclose(att["importance"].sum(), 1.0)
    grad = entity_importance(net, Task("survival"), graphs, "gradient").table["importance"]
    # Scaling one entity's embedding by (1 + eps) changes the risk by ~eps * its importance.
    top = int(np.argmax(np.abs(grad.to_numpy())))
    batch, owner = collate([graphs])
    with torch.no_grad():
        entities = net.backbone.node_embeddings(batch)
        slide = owner[batch.batch]
        base = net.pool_and_head(entities, slide)[0][0, 0]
        bumped = entities.clone()
        bumped[top] *= 1.001
        delta = net.pool_and_head(bumped, slide)[0][0, 0] - base
    assert float(delta) == pytest.approx(0.001 * grad.iloc[top], rel=0.05)

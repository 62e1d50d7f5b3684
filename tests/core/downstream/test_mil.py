"""Tests of gated-attention MIL pooling: per-slide softmax, the tile graph, and learning a
slide label that one key tile determines."""

from __future__ import annotations

import pytest
import torch

from hmgdm_core.downstream.mil import AttentionMIL, GatedAttentionPool, tile_knn_graph


def key_tile_bags(n_slides: int, tiles: int, seed: int):
    """Each slide: `tiles` noise tiles; one key tile (marker dim 1 = 1) whose dim 0 sign is
    the slide label. Noise tiles carry random signs in dim 0, so mean pooling cannot tell."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_slides * tiles, 6, generator=g) * 0.5
    x[:, 0] = torch.randint(0, 2, (n_slides * tiles,), generator=g) * 2.0 - 1.0
    x[:, 1] = 0.0
    label = torch.randint(0, 2, (n_slides,), generator=g)
    key = torch.arange(n_slides) * tiles + torch.randint(0, tiles, (n_slides,), generator=g)
    x[key, 1] = 1.0
    x[key, 0] = label * 2.0 - 1.0
    batch = torch.arange(n_slides).repeat_interleave(tiles)
    return x, batch, label, key


def test_attention_is_a_softmax_within_each_slide():
    torch.manual_seed(0)
    pool = GatedAttentionPool(5, 8)
    x, batch = torch.randn(9, 5), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    slides, attention = pool(x, batch=batch)
    assert slides.shape == (3, 8)
    torch.testing.assert_close(torch.zeros(3).index_add_(0, batch, attention), torch.ones(3))
    # pooling slide 1 alone gives the same embedding as pooling it inside the batch
    alone, _ = pool(x[3:5])
    torch.testing.assert_close(alone[0], slides[1])


def test_knn_graph_stays_within_slides():
    g = torch.Generator().manual_seed(1)
    pos = torch.rand(11, 2, generator=g) * 100
    batch = torch.tensor([0] * 6 + [1] * 3 + [2] * 2)
    edges = tile_knn_graph(pos, batch, k=3)
    assert (batch[edges[0]] == batch[edges[1]]).all()
    assert (edges[0] != edges[1]).all()
    out_degree = torch.bincount(edges[1], minlength=11)
    assert (out_degree[:6] >= 3).all()  # each tile of the 6-tile slide got its 3 neighbours
    assert (out_degree[9:] == 1).all()  # a 2-tile slide: each tile has only the other one
    # the nearest tile of node 0 within its slide is among its neighbours
    d = torch.cdist(pos[:6], pos[:6])[0]
    d[0] = float("inf")
    assert int(d.argmin()) in edges[0][edges[1] == 0].tolist()


def train(model: AttentionMIL, x, batch, label, pos=None, steps: int = 150):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x, label, batch=batch, pos=pos).backward()
        opt.step()
    return model.eval()


def test_learns_key_tile_label_and_attends_to_it():
    torch.manual_seed(0)
    x, batch, label, _ = key_tile_bags(64, 12, seed=0)
    model = train(AttentionMIL(GatedAttentionPool(6, 16), 2), x, batch, label)
    x_test, batch_test, label_test, key_test = key_tile_bags(64, 12, seed=1)
    with torch.no_grad():
        logits, attention = model(x_test, batch=batch_test)
    accuracy = (logits.argmax(1) == label_test).float().mean()
    assert accuracy >= 0.9
    key_weight = attention[key_test]
    assert key_weight.mean() > 0.5  # vs 1/12 for uniform attention
    top = attention.view(64, 12).argmax(1) + torch.arange(64) * 12
    assert (top == key_test).float().mean() >= 0.9


def test_tile_graph_flag_trains_and_needs_positions():
    torch.manual_seed(0)
    x, batch, label, _ = key_tile_bags(32, 8, seed=2)
    pos = torch.rand(len(x), 2, generator=torch.Generator().manual_seed(3)) * 1000
    model = AttentionMIL(GatedAttentionPool(6, 16, knn=4), 2)
    before = model.loss(x, label, batch=batch, pos=pos).item()
    train(model, x, batch, label, pos=pos, steps=60)
    after = model.loss(x, label, batch=batch, pos=pos).item()
    assert after < 0.5 * before
    with pytest.raises(ValueError, match="needs tile positions"):
        model(x, batch=batch)

"""Region graphs on real tiles: the Data contract, core/margin, mask, caps, kNN, windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.segmentation import slic as skimage_slic

from hmgdm_core.config import GraphConfig
from hmgdm_core.exceptions import MissingDependencyError
from hmgdm_core.graph.region import edge_attr_names, region_graph, x_names

MPP = 0.495  # Kather 2016
CFG = GraphConfig()


def _check_contract(g, cfg: GraphConfig) -> None:
    n, ei = g.num_nodes, g.edge_index
    assert g.x.dtype == torch.float32 and g.x.shape == (n, len(x_names(cfg)))
    assert g.win.dtype == torch.uint8 and g.win.shape == (n, 3, cfg.window_size, cfg.window_size)
    assert ei.dtype == torch.int64 and ei.shape[0] == 2
    assert g.edge_attr.dtype == torch.float32
    assert g.edge_attr.shape == (ei.shape[1], len(edge_attr_names(cfg)))
    assert g.pos.dtype == torch.float32 and g.pos.shape == (n, 2)
    assert g.tile_origin.shape == (1, 2)
    assert torch.isfinite(g.x).all() and torch.isfinite(g.edge_attr).all()
    assert not (ei[0] == ei[1]).any(), "self-loop"
    pairs = ei.T.tolist()
    assert len(set(map(tuple, pairs))) == len(pairs), "duplicate edge"
    assert {tuple(p) for p in pairs} == {(b, a) for a, b in pairs}, "not symmetric"
    # Both directions of an edge carry the same descriptors.
    back = {(a, b): i for i, (a, b) in enumerate(pairs)}
    rev = torch.tensor([back[(b, a)] for a, b in pairs])
    assert torch.equal(g.edge_attr, g.edge_attr[rev])


def _degree(g) -> torch.Tensor:
    return torch.bincount(g.edge_index[0], minlength=g.num_nodes)


def test_real_tile_graph_follows_the_contract(kather_tile):
    g = region_graph(kather_tile, array_mpp=MPP, cfg=CFG, origin_um=(1000.0, 2000.0))
    _check_contract(g, CFG)
    expected = (150 * MPP) ** 2 / CFG.entity_area_um2
    assert 0.6 * expected <= g.num_nodes <= 1.4 * expected
    assert (_degree(g) >= 1).all()
    assert g.tile_origin.tolist() == [[1000.0, 2000.0]]
    lo, hi = torch.tensor([1000.0, 2000.0]), torch.tensor([1000.0, 2000.0]) + 150 * MPP
    assert ((g.pos >= lo) & (g.pos <= hi)).all()
    assert "edge_win" not in g  # off by default


def test_node_count_follows_entity_area_at_1_mpp(data_dir):
    path = sorted((data_dir / "lc25000_lung" / "lung_aca").glob("*.jpeg"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    g = region_graph(rgb, array_mpp=1.0, cfg=CFG)
    expected = rgb.shape[0] * rgb.shape[1] / CFG.entity_area_um2
    assert 0.6 * expected <= g.num_nodes <= 1.4 * expected
    _check_contract(g, CFG)


def test_node_count_on_textured_tissue_tracks_skimage(data_dir):
    """On dense textured tissue compactness 10 lets colour win, and SLIC merges fragments into
    fewer, larger entities than the target; scikit-image's SLIC does the same."""
    path = data_dir / "bracs_rois" / "images" / "283_dcis_4.png"
    rgb = np.asarray(Image.open(path).convert("RGB"))[:400, :400]
    mpp, area = 0.25, 25.0  # a 20 px seeding grid, 400 seeds
    g = region_graph(rgb, array_mpp=mpp, cfg=CFG.model_copy(update={"entity_area_um2": area}))
    theirs = skimage_slic(rgb, n_segments=400, compactness=CFG.compactness).max()
    assert 0.75 * theirs <= g.num_nodes <= 1.25 * theirs
    assert g.num_nodes >= 0.4 * 400
    _check_contract(g, CFG)


def test_entities_outside_the_core_are_dropped(kather_tile):
    full = region_graph(kather_tile, array_mpp=MPP, cfg=CFG)
    core = (30, 40, 120, 130)
    g = region_graph(kather_tile, array_mpp=MPP, cfg=CFG, core=core)
    y = full.pos[:, 1] / MPP
    x = full.pos[:, 0] / MPP
    inside = (y >= 30) & (y < 120) & (x >= 40) & (x < 130)
    # Same superpixels, so the core graph holds exactly the full graph's core entities.
    assert g.num_nodes == int(inside.sum()) < full.num_nodes
    torch.testing.assert_close(g.pos, full.pos[inside])
    _check_contract(g, CFG)


def test_background_never_becomes_an_entity(kather_tile):
    mask = np.zeros((150, 150), bool)
    mask[:, :60] = True
    g = region_graph(kather_tile, array_mpp=MPP, cfg=CFG, mask=mask)
    assert (g.pos[:, 0] < 60 * MPP).all()
    expected = 150 * 60 * MPP**2 / CFG.entity_area_um2
    assert 0.6 * expected <= g.num_nodes <= 1.4 * expected
    # Entity windows sample the image, so a masked entity's area stays within the mask.
    assert (g.x[:, x_names(CFG).index("area_um2")].sum() / MPP**2).round() == mask.sum()
    assert region_graph(kather_tile, array_mpp=MPP, cfg=CFG, mask=~np.ones_like(mask)) is None


def test_entity_cap_keeps_those_nearest_the_core_centre(kather_tile):
    full = region_graph(kather_tile, array_mpp=MPP, cfg=CFG)
    g = region_graph(kather_tile, array_mpp=MPP, cfg=CFG.model_copy(update={"max_entities": 10}))
    d = ((full.pos / MPP - 75) ** 2).sum(1)
    nearest = torch.sort(torch.argsort(d)[:10]).values
    torch.testing.assert_close(g.pos, full.pos[nearest])


def test_knn_edges_and_the_edge_cap(kather_tile):
    g = region_graph(kather_tile, array_mpp=MPP, cfg=CFG.model_copy(update={"knn": 4}))
    _check_contract(g, CFG)
    assert (_degree(g) >= 4).all()
    base = region_graph(kather_tile, array_mpp=MPP, cfg=CFG)
    assert g.edge_index.shape[1] > base.edge_index.shape[1]
    cap = g.num_nodes + 5
    capped = region_graph(kather_tile, array_mpp=MPP, cfg=CFG.model_copy(update={"max_edges": cap}))
    assert capped.edge_index.shape[1] == 2 * cap
    assert (_degree(capped) >= 1).all()


def test_edge_windows_sit_on_the_shared_boundary(kather_tile):
    cfg = CFG.model_copy(update={"edge_windows": True, "window_size": 16})
    g = region_graph(kather_tile, array_mpp=MPP, cfg=cfg)
    assert g.edge_win.dtype == torch.uint8
    assert g.edge_win.shape == (g.edge_index.shape[1], 3, 16, 16)
    # Both directions of an edge share a window.
    pairs = g.edge_index.T.tolist()
    back = {(a, b): i for i, (a, b) in enumerate(pairs)}
    rev = torch.tensor([back[(b, a)] for a, b in pairs])
    assert torch.equal(g.edge_win, g.edge_win[rev])


def test_origin_only_shifts_positions(kather_tile):
    a = region_graph(kather_tile, array_mpp=MPP, cfg=CFG)
    b = region_graph(kather_tile, array_mpp=MPP, cfg=CFG, origin_um=(500.0, -20.0))
    torch.testing.assert_close(b.pos - a.pos, torch.tensor([500.0, -20.0]).expand_as(a.pos))
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)


def test_cnn_features_say_which_package_is_missing(kather_tile, tmp_path):
    cfg = CFG.model_copy(update={"cnn_weights": tmp_path / "resnet.pt"})
    with pytest.raises(MissingDependencyError, match="torchvision"):
        region_graph(kather_tile, array_mpp=MPP, cfg=cfg)

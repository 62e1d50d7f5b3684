"""Graph archives: round trip, lazy dataset, atomic writes, clear errors on damaged files."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.graph.cache import (
    GraphDataset,
    SlideGraphWriter,
    graph_path,
    load_graph_dir,
    load_slide_graphs,
    read_graph_meta,
)


def _graph(n: int, seed: int) -> Data:
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(n - 1)
    ei = torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
    return Data(
        x=torch.randn(n, 5, generator=g),
        win=torch.randint(0, 255, (n, 3, 4, 4), dtype=torch.uint8, generator=g),
        edge_index=ei,
        edge_attr=torch.randn(ei.shape[1], 2, generator=g),
        pos=torch.rand(n, 2, generator=g) * 100,
        tile_origin=torch.tensor([[0.0, 0.0]]),
    )


def _meta(slide_id: str, config_hash: str = "abc") -> dict:
    return {
        "slide_id": slide_id,
        "config_hash": config_hash,
        "graph_config": {},
        "x_names": list("abcde"),
        "edge_attr_names": ["d", "l"],
    }


def _write(tmp_path, slide_id, sizes, config_hash="abc"):
    with SlideGraphWriter(graph_path(tmp_path, slide_id)) as w:
        for i, n in enumerate(sizes):
            w.add(_graph(n, i))
        w.commit(_meta(slide_id, config_hash))
    return w


def test_round_trip_preserves_every_field(tmp_path):
    w = _write(tmp_path, "s1", [4, 7])
    assert (w.n_graphs, w.n_nodes, w.n_edges) == (2, 11, 9)
    graphs, meta = load_slide_graphs(graph_path(tmp_path, "s1"))
    assert meta["n_graphs"] == 2 and meta["x_names"] == list("abcde")
    for i, (got, n) in enumerate(zip(graphs, [4, 7], strict=True)):
        want = _graph(n, i)
        for key in ("x", "win", "edge_index", "edge_attr", "pos", "tile_origin"):
            assert torch.equal(got[key], want[key]), key
        assert got.slide_id == "s1" and got.tile_index == i


def test_dataset_reads_lazily_and_filters_slides(tmp_path):
    _write(tmp_path, "a", [3, 4])
    _write(tmp_path, "b", [5])
    ds = GraphDataset(tmp_path)
    assert len(ds) == 3 and [g.num_nodes for g in ds] == [3, 4, 5]
    assert [g.slide_id for g in GraphDataset(tmp_path, slide_ids=["b"])] == ["b"]
    assert len(load_graph_dir(tmp_path)) == 3
    assert read_graph_meta(tmp_path)["edge_attr_names"] == ["d", "l"]


def test_interrupted_write_leaves_previous_archive_intact(tmp_path):
    _write(tmp_path, "s", [3])
    before = graph_path(tmp_path, "s").read_bytes()
    with pytest.raises(KeyboardInterrupt), SlideGraphWriter(graph_path(tmp_path, "s")) as w:
        w.add(_graph(9, 0))
        raise KeyboardInterrupt
    assert graph_path(tmp_path, "s").read_bytes() == before
    assert list((tmp_path / "graphs").iterdir()) == [graph_path(tmp_path, "s")]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(GraphDataError, match="no graphs found"):
        load_graph_dir(tmp_path)
    bad = graph_path(tmp_path, "bad")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a zip")
    with pytest.raises(GraphDataError, match=r"bad\.pt: not a readable graph archive"):
        load_graph_dir(tmp_path)


def test_mixed_configs_are_refused(tmp_path):
    _write(tmp_path, "a", [3], config_hash="one")
    _write(tmp_path, "b", [3], config_hash="two")
    with pytest.raises(GraphDataError, match="2 different configs"):
        read_graph_meta(tmp_path)


def test_stale_temp_of_a_dead_writer_is_removed(tmp_path):
    from hmgdm_core.graph.cache import remove_stale_temps

    graphs = tmp_path / "graphs"
    graphs.mkdir()
    dead = graphs / ".s.pt.999999999.tmp"  # no process has this pid
    live = graphs / f".t.pt.{__import__('os').getpid()}.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and not dead.exists()

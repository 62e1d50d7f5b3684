"""Whole-slide builds on real data: graph sanity, SVS vs PNG agreement, resume, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hmgdm_core.config import GraphConfig, TissueConfig
from hmgdm_core.graph.cache import graph_path, load_slide_graphs
from hmgdm_core.graph.manifest import read_manifest
from hmgdm_core.graph.runner import build_graphs

pytestmark = pytest.mark.slow

# Larger entities keep these real-slide builds to seconds; the maths is the same at any size.
CFG = GraphConfig(entity_area_um2=400.0, tile_size=384)


@pytest.fixture(scope="module")
def svs_build(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("svs")
    results = build_graphs(
        [data_dir / "slides" / "cmu-1-small-region.svs"], out, CFG, show_progress=False
    )
    return out, results


def test_real_slide_graphs_are_sane(svs_build):
    out, results = svs_build
    (res,) = results
    assert res.status == "done", res.error
    graphs, meta = load_slide_graphs(graph_path(out, res.slide_id))
    assert len(graphs) == res.n_graphs > 5
    tile_area = (CFG.tile_size * CFG.target_mpp) ** 2
    for g in graphs:
        ei = g.edge_index
        assert g.num_nodes <= CFG.max_entities
        # A full tissue tile holds tile_area / entity_area entities; a partial one fewer.
        assert 2 <= g.num_nodes <= 2 * tile_area / CFG.entity_area_um2
        assert not (ei[0] == ei[1]).any(), "self-loop"
        pairs = set(map(tuple, ei.T.tolist()))
        assert pairs == {(b, a) for a, b in pairs}, "edges not symmetric"
        assert torch.isfinite(g.x).all() and torch.isfinite(g.edge_attr).all()
        assert g.x.shape[1] == len(meta["x_names"])
        assert g.win.dtype == torch.uint8 and g.win.shape[1:] == (3, 32, 32)
        # Entities lie inside their tile (positions are in slide µm).
        lo = g.tile_origin[0] + CFG.tile_margin * CFG.target_mpp
        assert (g.pos >= lo - 1e-3).all() and (
            g.pos <= lo + CFG.tile_size * CFG.target_mpp + 1e-3
        ).all()
    isolated = sum(
        int((torch.bincount(g.edge_index[0], minlength=g.num_nodes) == 0).sum()) for g in graphs
    )
    assert isolated <= 0.02 * res.n_nodes


def test_svs_and_png_of_the_same_pixels_give_matching_graphs(svs_build, data_dir, tmp_path):
    import openslide

    _, (res,) = svs_build
    with openslide.OpenSlide(data_dir / "slides" / "cmu-1-small-region.svs") as osr:
        mpp = float(osr.properties["openslide.mpp-x"])
        rgb = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
    png = tmp_path / "cmu-1-small-region.png"
    Image.fromarray(rgb).save(png)
    (res_png,) = build_graphs([png], tmp_path / "png", CFG, scan_mpp=mpp, show_progress=False)
    assert res_png.status == "done", res_png.error
    assert res_png.n_graphs == res.n_graphs
    assert abs(res_png.n_nodes - res.n_nodes) <= 0.03 * res.n_nodes


def test_rerun_skips_done_slides_and_config_change_rebuilds(svs_build, data_dir):
    out, (res,) = svs_build
    path = graph_path(out, res.slide_id)
    mtime = path.stat().st_mtime_ns
    (again,) = build_graphs(
        [data_dir / "slides" / "cmu-1-small-region.svs"], out, CFG, show_progress=False
    )
    assert again.status == "skipped" and path.stat().st_mtime_ns == mtime
    assert read_manifest(out)[res.slide_id].status == "done"
    changed = CFG.model_copy(update={"tissue": TissueConfig(min_tile_fraction=0.9)})
    (rebuilt,) = build_graphs(
        [data_dir / "slides" / "cmu-1-small-region.svs"], out, changed, show_progress=False
    )
    assert rebuilt.status == "done" and rebuilt.n_graphs < res.n_graphs
    assert read_manifest(out)[res.slide_id].config_hash == changed.stable_hash()


def test_bad_inputs_fail_alone_with_a_reason(tmp_path, data_dir):
    good = data_dir / "kather2016_tiles" / "01_TUMOR"
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes((data_dir / "slides" / "cmu-1-small-region.svs").read_bytes()[:50_000])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    white = tmp_path / "white.png"
    Image.fromarray(np.full((300, 300, 3), 245, np.uint8)).save(white)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((3, 3, 3), [150, 60, 140], np.uint8)).save(tiny)
    missing = tmp_path / "missing.svs"
    results = build_graphs(
        [good, truncated, text, white, tiny, missing],
        tmp_path / "out",
        CFG,
        scan_mpp=0.495,
        show_progress=False,
    )
    by_id = {r.slide_id: r for r in results}
    assert sum(r.status == "done" for r in results) == 3  # the three real Kather tiles
    for bad in ("truncated", "notes", "white", "tiny", "missing"):
        r = by_id[bad]
        assert r.status == "error" and str(tmp_path) in r.error and "\n" not in r.error, r
    assert "tissue" in by_id["white"].error
    assert "no such file" in by_id["missing"].error
    manifest = read_manifest(tmp_path / "out")
    assert {k for k, r in manifest.items() if r.status == "error"} == {
        "truncated",
        "notes",
        "white",
        "tiny",
        "missing",
    }
    assert not list((tmp_path / "out" / "graphs").glob(".*"))


def test_parallel_workers_build_the_same_graphs(tmp_path, data_dir):
    tiles = data_dir / "kather2016_tiles" / "02_STROMA"
    one = build_graphs([tiles], tmp_path / "w1", CFG, scan_mpp=0.495, show_progress=False)
    two = build_graphs(
        [tiles], tmp_path / "w2", CFG, scan_mpp=0.495, workers=2, show_progress=False
    )

    def key(results):
        return sorted((r.slide_id, r.status, r.n_graphs, r.n_nodes, r.n_edges) for r in results)

    assert key(one) == key(two) and len(one) == 3
    for r in one:
        a, _ = load_slide_graphs(graph_path(tmp_path / "w1", r.slide_id))
        b, _ = load_slide_graphs(graph_path(tmp_path / "w2", r.slide_id))
        assert all(torch.equal(x.x, y.x) for x, y in zip(a, b, strict=True))


def _drop_build_key(archive) -> None:
    """Rewrite `archive` as builds before build keys existed wrote it."""
    import json
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["meta.json"])
    del meta["build_key"]
    members["meta.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)


def test_every_input_that_changes_a_graph_rebuilds_it(tmp_path, data_dir, monkeypatch):
    """Rerunning into one cache after each change gives exactly what a fresh build gives."""
    from hmgdm_core.graph import build

    src = sorted((data_dir / "kather2016_tiles" / "01_TUMOR").glob("*.tif"))[0]
    tile = tmp_path / "in" / "t.tif"
    tile.parent.mkdir()
    tile.write_bytes(src.read_bytes())
    slides_csv = tmp_path / "slides.csv"
    slides_csv.write_text(f"slide_id,path,mpp\nt,{tile},0.3\n")
    cache = tmp_path / "cache"

    def run(out, inputs=(tile,), cfg=CFG, mpp=0.5):
        (res,) = build_graphs(list(inputs), out, cfg, scan_mpp=mpp, show_progress=False)
        assert res.status in ("done", "skipped"), res.error
        return res, [g.x for g in load_slide_graphs(graph_path(out, "t"))[0]]

    first, _ = run(cache)
    assert run(cache)[0].status == "skipped"
    flipped = np.asarray(Image.open(src).convert("RGB"))[::-1].copy()
    changes = {
        "--mpp": {"mpp": 0.25},
        "slides.csv mpp": {"inputs": (slides_csv,)},
        "graph config": {"cfg": CFG.model_copy(update={"entity_area_um2": 200.0})},
        "slide bytes": {},
        "builder version": {},
    }
    for i, (what, change) in enumerate(changes.items()):
        if what == "slide bytes":
            Image.fromarray(flipped).save(tile)
        if what == "builder version":
            monkeypatch.setattr(build, "BUILDER_VERSION", build.BUILDER_VERSION + 1)
        res, graphs = run(cache, **change)
        assert res.status == "done", what
        _, fresh = run(tmp_path / f"fresh{i}", **change)
        assert len(graphs) == len(fresh) and all(
            torch.equal(a, b) for a, b in zip(graphs, fresh, strict=True)
        ), what
        assert run(cache, **change)[0].status == "skipped", what
        if what == "--mpp":  # the case: 0.25 µm/px is a different graph, not "skipped"
            assert res.n_nodes != first.n_nodes
    assert (
        read_manifest(cache)["t"].mpp == 0.5 and read_manifest(cache)["t"].mpp_source == "override"
    )


def test_caches_from_before_build_keys_and_relative_ids_are_reused(tmp_path, data_dir):
    """A site upgrading keeps its cache: archives without a build key and stem ids still count."""
    src = sorted((data_dir / "kather2016_tiles" / "01_TUMOR").glob("*.tif"))[0]
    tile = tmp_path / "slides" / "2024" / "t.tif"
    tile.parent.mkdir(parents=True)
    tile.write_bytes(src.read_bytes())
    cache = tmp_path / "cache"
    (old,) = build_graphs([tile], cache, CFG, scan_mpp=0.5, show_progress=False)  # id: the stem
    assert old.slide_id == "t"
    _drop_build_key(graph_path(cache, "t"))
    (again,) = build_graphs([tile.parents[1]], cache, CFG, scan_mpp=0.5, show_progress=False)
    assert (again.slide_id, again.status) == ("t", "skipped")
    (other,) = build_graphs([tile.parents[1]], cache, CFG, scan_mpp=0.25, show_progress=False)
    assert (other.slide_id, other.status) == ("t", "done")
    # A rescanned slide (new bytes, same place) is rebuilt in place, not beside its old graphs.
    Image.fromarray(np.asarray(Image.open(src).convert("RGB"))[::-1].copy()).save(tile)
    (rescanned,) = build_graphs([tile.parents[1]], cache, CFG, scan_mpp=0.25, show_progress=False)
    assert (rescanned.slide_id, rescanned.status) == ("t", "done")
    assert [p.name for p in (cache / "graphs").rglob("*.pt")] == ["t.pt"]
    # A fresh cache names the same slide by its path below the folder.
    (fresh,) = build_graphs(
        [tile.parents[1]], tmp_path / "new", CFG, scan_mpp=0.5, show_progress=False
    )
    assert fresh.slide_id == "2024/t" and graph_path(tmp_path / "new", "2024/t").is_file()


def test_stain_normalisation_makes_two_labs_stainings_of_a_slide_agree(tmp_path, data_dir):
    """The same tissue stained by two labs: normalised graphs agree far better in colour."""
    from hmgdm_core.section import hash_values
    from hmgdm_core.studies.partition import stain_shift

    src = sorted((data_dir / "kather2016_tiles" / "01_TUMOR").glob("*.tif"))[1]
    rgb = np.asarray(Image.open(src).convert("RGB"))
    for lab in (0, 1):
        Image.fromarray(stain_shift(rgb, lab + 7, 0.35)).save(tmp_path / f"lab{lab}.png")
    colour = slice(0, 3)  # r_mean, g_mean, b_mean

    def mean_colour(cfg: GraphConfig, lab: int) -> np.ndarray:
        out = tmp_path / f"{cfg.stain_norm}{lab}"
        (res,) = build_graphs(
            [tmp_path / f"lab{lab}.png"], out, cfg, scan_mpp=0.495, show_progress=False
        )
        assert res.status == "done", res.error
        (g,), meta = load_slide_graphs(graph_path(out, res.slide_id))
        assert (meta["stain"] is None) == (cfg.stain_norm == "none")
        return g.x[:, colour].mean(0).numpy()

    raw_gap = np.abs(mean_colour(CFG, 0) - mean_colour(CFG, 1)).mean()
    norms = [CFG.model_copy(update={"stain_norm": m}) for m in ("macenko", "reinhard")]
    for norm in norms:
        norm_gap = np.abs(mean_colour(norm, 0) - mean_colour(norm, 1)).mean()
        assert norm_gap < 0.3 * raw_gap, (norm.stain_norm, raw_gap, norm_gap)
    # Without normalisation the config hash is the one from before the option existed (and
    # before graph.mpp was named target_mpp); each normaliser has its own cache key.
    old = CFG.model_dump(mode="json")
    del old["stain_norm"]
    old["mpp"] = old.pop("target_mpp")
    hashes = {CFG.stable_hash(), *(norm.stable_hash() for norm in norms)}
    assert CFG.stable_hash() == hash_values(old) and len(hashes) == 3

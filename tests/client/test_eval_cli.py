"""`evaluate classify --method finetune` and `explain` end to end on real Kather 2016 tiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import pytest
from conftest import DATA, TINY_MODEL
from PIL import Image
from typer.testing import CliRunner

from client.cli import app
from hmgdm_core.config import load_config
from hmgdm_core.graph.cache import load_graph_dir
from hmgdm_core.train import build_model, graph_dims, save_checkpoint

KATHER = DATA / "kather2016_tiles"
CLASSES = {"01_TUMOR": "tumour", "03_COMPLEX": "tumour", "02_STROMA": "other", "04_LYMPHO": "other"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    cmd = [str(Path(sys.executable).with_name("hmgdm-client")), "build-graphs",
           *(str(KATHER / c) for c in CLASSES), "--out", str(root / "graphs"), "--mpp", "0.495",
           "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    graphs = load_graph_dir(root / "graphs")
    cfg = load_config(None, TINY_MODEL)
    save_checkpoint(root / "ckpt.pt", model=build_model(cfg, graph_dims(graphs)), cfg=cfg, epoch=0)
    rows = [
        {"slide_id": p.stem, "label": label}
        for folder, label in CLASSES.items()
        for p in sorted((KATHER / folder).glob("*.tif"))
    ]
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    (root / "eval.toml").write_text(
        "[evaluation]\nfolds = 2\nval_fraction = 0.25\n"
        "[evaluation.finetune]\nepochs = 3\nhidden = 8\n"
    )
    return {"root": root, "graphs": root / "graphs", "ckpt": root / "ckpt.pt"}


def test_finetune_writes_the_probe_outputs_and_a_model_that_explain_paints(site, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ft"
    res = runner.invoke(app, [
        "evaluate", "classify", "--graphs", str(site["graphs"]), "--checkpoint", str(site["ckpt"]),
        "--labels", str(site["root"] / "labels.csv"), "--out", str(out),
        "--config", str(site["root"] / "eval.toml"), "--method", "finetune",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["other", "tumour"] and "fine-tuned" in metrics["probe"]
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 2 and (folds["n_test"] > 0).all()
    assert (out / "confusion.png").stat().st_size > 1000
    assert (out / "roc.png").stat().st_size > 1000
    pred = pd.read_csv(out / "predictions.csv")
    labels = pd.read_csv(site["root"] / "labels.csv")
    assert sorted(pred["slide_id"]) == sorted(labels["slide_id"])
    assert set(pred["fold"]) == {0, 1} and set(pred["prediction"]) <= {"other", "tumour"}
    assert np.allclose(pred["p_other"] + pred["p_tumour"], 1)

    slide = next(iter(sorted((KATHER / "01_TUMOR").glob("*.tif")))).stem
    png = tmp_path / "explain.png"
    res = runner.invoke(app, [
        "explain", slide, "--graphs", str(site["graphs"]), "--checkpoint", str(out / "model.pt"),
        "--out", str(png),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    entities = pd.read_csv(png.with_suffix(".csv"))
    n_nodes = sum(g.num_nodes for g in load_graph_dir(site["graphs"]) if g.slide_id == slide)
    assert len(entities) == n_nodes and entities["importance"].sum() == pytest.approx(1.0)
    assert png.stat().st_size > 1000
    # The same importances, per entity outline, for QuPath.
    collection = geojson.loads(png.with_suffix(".geojson").read_text())
    assert collection.is_valid and len(collection["features"]) == n_nodes
    importance = [f["properties"]["measurements"]["importance"] for f in collection["features"]]
    assert importance == pytest.approx(entities["importance"].tolist())
    top = max(collection["features"], key=lambda f: f["properties"]["measurements"]["importance"])
    assert top["properties"]["classification"]["name"] == "importance 5/5"


def test_export_writes_entity_outlines_and_draws_them(site, tmp_path):
    slide = next(iter(sorted((KATHER / "04_LYMPHO").glob("*.tif")))).stem
    out, png = tmp_path / "s.geojson", tmp_path / "s.png"
    res = CliRunner().invoke(
        app,
        [
            "export",
            slide[:12],
            "--graphs",
            str(site["graphs"]),
            "--out",
            str(out),
            "--color-by",
            "Haematoxylin OD mean",
            "--png",
            str(png),
        ],
    )  # fmt: skip  (a unique prefix is not a slide id: refused below, then the full id)
    assert res.exit_code == 1 and "no graph archive" in res.output
    args = ["export", slide, "--graphs", str(site["graphs"]), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--color-by", "Haematoxylin OD mean", "--png", str(png)])
    assert res.exit_code == 0, res.output
    collection = geojson.loads(out.read_text())
    assert collection.is_valid
    assert {f["geometry"]["type"] for f in collection["features"]} == {"Polygon"}
    assert len({f["properties"]["classification"]["name"] for f in collection["features"]}) == 5
    with Image.open(png) as im:
        assert im.size[0] >= 140  # the 150 px tile at the graphs' 0.5 µm/px
    res = CliRunner().invoke(app, [*args, "--color-by", "nope"])
    assert res.exit_code == 1 and "no measurement 'nope'" in res.output


def test_explain_refuses_a_pretraining_checkpoint_and_a_bad_method(site, tmp_path):
    runner = CliRunner()
    slide = next(iter(sorted((KATHER / "02_STROMA").glob("*.tif")))).stem
    base = ["explain", slide, "--graphs", str(site["graphs"]), "--out", str(tmp_path / "x.png")]
    res = runner.invoke(app, [*base, "--checkpoint", str(site["ckpt"])])
    assert res.exit_code == 1 and "not a fine-tuned model" in res.output
    res = runner.invoke(app, [*base, "--checkpoint", str(site["ckpt"]), "--method", "shap"])
    assert res.exit_code == 1 and "auto, attention or gradient" in res.output
    assert not (tmp_path / "x.png").exists()


def test_probe_reports_the_raw_descriptor_baseline_on_the_same_folds(site, tmp_path):
    out = tmp_path / "probe"
    res = CliRunner().invoke(app, [
        "evaluate", "classify", "--graphs", str(site["graphs"]), "--checkpoint", str(site["ckpt"]),
        "--labels", str(site["root"] / "labels.csv"), "--out", str(out),
        "--config", str(site["root"] / "eval.toml"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "raw entity descriptors (mean-pooled), same probe and folds" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    raw = metrics["baselines"]["raw_descriptors_mean"]["accuracy"]
    assert 0.0 <= raw["mean"] <= 1.0 and raw["mean"] != metrics["metrics"]["accuracy"]["mean"]
    assert "raw_descriptors_mean_std" in metrics["baselines"]
    # The probe and its baselines average 3 fold assignments (the default), fine-tuning 1.
    folds = pd.read_csv(out / "folds.csv")
    assert metrics["repeats"] == 3 and folds["repeat"].tolist() == [0, 0, 1, 1, 2, 2]
    assert "2 folds x 3 assignments" in res.output
    curve = pd.read_csv(out / "label_efficiency.csv")  # same patients for every feature set
    assert set(curve["features"]) == {"encoder", "raw_descriptors_mean", "raw_descriptors_mean_std"}
    full = curve[(curve["features"] == "encoder") & (curve["share"] == 1.0)]
    assert full["accuracy_mean"].item() == pytest.approx(metrics["metrics"]["accuracy"]["mean"])
    assert "label efficiency, encoder: accuracy" in res.output
    assert (out / "label_efficiency.png").stat().st_size > 1000

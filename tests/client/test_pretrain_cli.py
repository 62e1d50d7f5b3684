"""`hmgdm-client pretrain` / `embed` end to end on a tiny synthetic graph cache."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from region_graphs import random_region_graph
from typer.testing import CliRunner

from client.cli import app
from hmgdm_core.atomic import load_torch
from hmgdm_core.graph.cache import SlideGraphWriter, graph_path

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.toml"
runner = CliRunner()


def _cache(root: Path, slides=("a", "b"), bad=None) -> Path:
    for s, slide in enumerate(slides):
        with SlideGraphWriter(graph_path(root, slide)) as writer:
            for t in range(2):
                g = random_region_graph(25 + 5 * t, seed=10 * s + t)
                if bad == "nan" and s == 1:
                    g.x[0, 0] = float("nan")
                writer.add(g)
            writer.commit({"slide_id": slide, "config_hash": "test"})
    return root


def test_pretrain_then_embed_writes_run_files_and_one_row_per_slide(tmp_path):
    graphs = _cache(tmp_path / "cache")
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--graphs",
            str(graphs),
            "--out",
            str(run),
            "--config",
            str(DEBUG),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["stage"] for r in rows] == ["autoencoder", "diffusion"]
    assert float(rows[-1]["graphs_per_s"]) > 0 and (run / "loss.png").exists()
    # The same figures as TensorBoard scalars, one step per epoch, per stage.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard")).Reload()
    for epoch, row in enumerate(rows):
        (event,) = board.Scalars(f"{row['stage']}/loss")
        assert (event.step, event.value) == (epoch, pytest.approx(float(row["loss"]), rel=1e-6))

    out = tmp_path / "emb.csv"
    nodes = tmp_path / "nodes.pt"
    result = runner.invoke(
        app,
        [
            "embed",
            "--graphs",
            str(graphs),
            "--checkpoint",
            str(run / "last.pt"),
            "--out",
            str(out),
            "--nodes",
            str(nodes),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(out) as fh:
        table = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in table] == ["a", "b"]
    # slide_id + the "layers_std" readout: mean and std of the input block and 2 layers of 32
    assert len(table[0]) == 1 + 2 * 3 * 32
    node_rows = load_torch(nodes)
    assert [r["emb"].shape[0] for r in node_rows] == [25, 30, 25, 30]


@pytest.mark.parametrize("case", ["empty", "nan", "bad_config"])
def test_pretrain_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    graphs = tmp_path / "cache"
    graphs.mkdir()
    if case != "empty":
        _cache(graphs, bad="nan" if case == "nan" else None)
    config = DEBUG
    if case == "bad_config":
        config = tmp_path / "bad.toml"
        config.write_text("[model]\nhiden = 3\n")
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--graphs",
            str(graphs),
            "--out",
            str(run),
            "--config",
            str(config),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert {"empty": "no graphs", "nan": "NaN", "bad_config": "hiden"}[case] in errors[0]
    assert not run.exists()


def test_embed_refuses_a_checkpoint_built_for_other_features(tmp_path):
    graphs = _cache(tmp_path / "cache")
    run = tmp_path / "run"
    runner.invoke(
        app,
        [
            "pretrain",
            "--graphs",
            str(graphs),
            "--out",
            str(run),
            "--config",
            str(DEBUG),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    other = tmp_path / "other"
    with SlideGraphWriter(graph_path(other, "c")) as writer:
        writer.add(random_region_graph(20, seed=3, dx=5))
        writer.commit({"slide_id": "c", "config_hash": "other"})
    out = tmp_path / "emb.csv"
    result = runner.invoke(
        app,
        [
            "embed",
            "--graphs",
            str(other),
            "--checkpoint",
            str(run / "last.pt"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2 and "do not match the checkpoint" in result.output
    assert not out.exists()


def test_pretrain_with_labels_logs_a_probe_against_the_random_twin(tmp_path):
    slides = [f"s{i}" for i in range(8)]
    graphs = _cache(tmp_path / "cache", slides=slides)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{s},c{i % 2}\n" for i, s in enumerate(slides)))
    config = tmp_path / "cfg.toml"
    config.write_text(DEBUG.read_text() + "\n[evaluation]\nfolds = 2\n")
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        ["pretrain", "--graphs", str(graphs), "--out", str(run), "--config", str(config),
         "--labels", str(labels), "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "probe accuracy" in result.output and "context share" in result.output
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3  # debug: 1 autoencoder + 2 diffusion epochs, each probed
    assert all(0.0 <= float(r["probe_acc"]) <= 1.0 for r in rows)
    # One reference for the whole run: the probe of the encoder at its random init.
    assert len({r["probe_random_twin"] for r in rows}) == 1

"""Training loop, pretrain runs with exact resume, checkpoints and bad-input errors."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TINY_MODEL
from region_graphs import random_region_graph

from hmgdm_core import pretrain as pretrain_mod
from hmgdm_core.config import load_config
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments, validate_graphs
from hmgdm_core.exceptions import CheckpointError, GraphDataError
from hmgdm_core.pretrain import pretrain
from hmgdm_core.train import (
    build_model,
    eval_loss,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    train_steps,
)

TINY = {
    **TINY_MODEL,
    "train.batch_size": 4,
    "train.autoencoder_epochs": 2,
    "train.epochs": 2,
}
CPU = torch.device("cpu")


def _graphs(n=6):
    return [random_region_graph(20 + 4 * i, seed=i, slide_id=f"s{i % 3}") for i in range(n)]


def test_moments_summed_across_sites_give_pooled_stats():
    graphs = _graphs()
    a, b = feature_moments(graphs[:2]), feature_moments(graphs[2:])
    pooled = stats_from_moments({k: a[k] + b[k] for k in a})
    x = torch.cat([g.x for g in graphs])
    assert torch.allclose(pooled.x_mean, x.mean(0), atol=1e-5)
    assert torch.allclose(pooled.x_std, x.std(0, unbiased=False), atol=1e-5)


def test_train_steps_counts_and_eval_loss_improves_after_training():
    graphs = _graphs()
    cfg = load_config(overrides=TINY)
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    gen = torch.Generator().manual_seed(0)
    before = eval_loss(
        model,
        graphs,
        cfg.train,
        stage="autoencoder",
        device=CPU,
        generator=torch.Generator().manual_seed(1),
    )
    opt = make_optimizer(model, cfg.train, "autoencoder")
    out = train_steps(
        model, opt, graphs, cfg.train, stage="autoencoder", epochs=5.0, device=CPU, generator=gen
    )
    assert out["num_steps"] == 10 and out["num_graphs"] == 30  # 5 passes of 6 graphs, batch 4
    after = eval_loss(
        model,
        graphs,
        cfg.train,
        stage="autoencoder",
        device=CPU,
        generator=torch.Generator().manual_seed(1),
    )
    assert after["loss"] < before["loss"]
    with pytest.raises(ValueError):
        train_steps(model, opt, graphs, cfg.train, stage="autoencoder", device=CPU, generator=gen)


def test_scheduler_warms_up_then_decays_to_the_floor():
    cfg = load_config(overrides={"train.warmup_fraction": 0.1, "train.min_lr_fraction": 0.1}).train
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=0.01) and lrs[50] < lrs[10]


def test_resume_continues_exactly(tmp_path, monkeypatch):
    graphs = _graphs()
    cfg = load_config(overrides=TINY)
    full = pretrain(graphs, cfg, tmp_path / "full", device=CPU)

    calls = {"n": 0}
    real_write = pretrain_mod.write_metrics

    def interrupt_after_two_epochs(run_dir, rows):
        real_write(run_dir, rows)
        calls["n"] += 1
        if calls["n"] == 3:  # inside stage 2, after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_mod, "write_metrics", interrupt_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        pretrain(graphs, cfg, tmp_path / "split", device=CPU)
    monkeypatch.setattr(pretrain_mod, "write_metrics", real_write)
    resumed = pretrain(graphs, cfg, tmp_path / "split", device=CPU, resume=True)
    for key, value in full.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-6), key
    with open(tmp_path / "split" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["stage"] for r in rows] == ["autoencoder"] * 2 + ["diffusion"] * 2
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0
    # Every epoch is scored on held-out slides; stage 2 also reports the context share.
    assert all(float(r["eval_loss"]) > 0 for r in rows)
    assert [r["context_share"] == "" for r in rows] == [True, True, False, False]


def test_eval_loss_reports_the_context_share_in_stage_2_only():
    graphs = _graphs()
    cfg = load_config(overrides=TINY)
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    kwargs = dict(device=CPU, generator=torch.Generator().manual_seed(1))
    diffusion = eval_loss(model, graphs, cfg.train, stage="diffusion", **kwargs)
    gain = diffusion["context_gain"]
    assert diffusion["context_share"] != 0 and gain * diffusion["context_share"] > 0
    assert "target_var" not in diffusion
    assert "context_share" not in eval_loss(model, graphs, cfg.train, stage="autoencoder", **kwargs)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    graphs = _graphs()
    cfg = load_config(overrides={**TINY, "train.autoencoder_epochs": 0, "train.epochs": 1})
    pretrain(graphs, cfg, tmp_path, device=CPU)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        pretrain(graphs, cfg, tmp_path, device=CPU)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_checkpoint_round_trip_and_incompatible_config(tmp_path):
    graphs = _graphs()
    cfg = load_config(overrides=TINY)
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    save_checkpoint(tmp_path / "c.pt", model=model, cfg=cfg, epoch=3)
    ckpt = load_checkpoint(tmp_path / "c.pt", cfg=cfg)
    assert ckpt.epoch == 3 and ckpt.model.dims == model.dims
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt.model.state_dict()[key])
    other = load_config(overrides={**TINY, "model.hidden": 32})
    with pytest.raises(CheckpointError, match=r"different \[model\] config"):
        load_checkpoint(tmp_path / "c.pt", cfg=other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("case", ["empty", "one_node", "nan_x", "nan_edge", "mixed_dims"])
def test_bad_graphs_give_one_line_errors(case):
    graphs = _graphs(3)
    if case == "empty":
        graphs = []
    elif case == "one_node":
        graphs[1] = random_region_graph(1, seed=9)
    elif case == "nan_x":
        graphs[2].x[0, 0] = float("nan")
    elif case == "nan_edge":
        graphs[0].edge_attr[3, 1] = float("inf")
    else:
        graphs[1] = random_region_graph(20, seed=9, dx=5)
    with pytest.raises(GraphDataError) as err:
        validate_graphs(graphs, "cache")
    assert "\n" not in str(err.value) and str(err.value).startswith("cache")


def test_raw_slide_features_pool_every_entity_of_a_slide():
    from hmgdm_core.pretrain import raw_slide_features

    graphs = _graphs()  # slides s0, s1, s2, two region graphs each
    names, feats = raw_slide_features(graphs, std=True)
    assert names == ["s0", "s1", "s2"]
    x = torch.cat([g.x for g in graphs if g.slide_id == "s1"])
    dim = x.shape[1]
    assert torch.allclose(feats[1, :dim], x.mean(0), atol=1e-5)
    assert torch.allclose(feats[1, dim:], x.std(0, unbiased=False), atol=1e-4)
    assert raw_slide_features(graphs, std=False)[1].shape == (3, dim)


def test_eval_loss_is_held_out_without_stain_jitter():
    """train.stain_jitter augments training batches only: the held-out loss stays comparable."""
    graphs = _graphs()
    cfg = load_config(overrides=TINY)
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    losses = [
        eval_loss(
            model,
            graphs,
            cfg.train.model_copy(update={"stain_jitter": jitter}),
            stage="autoencoder",
            device=CPU,
            generator=torch.Generator().manual_seed(1),
        )["loss"]
        for jitter in (0.0, 0.3)
    ]
    assert losses[0] == losses[1]

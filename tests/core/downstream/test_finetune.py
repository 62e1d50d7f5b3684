"""Fine-tuning (encoder + attention pooling + head) and the deep Cox head, cross-validated on
seeded synthetic slides whose classes / hazards differ only in how entities are spread out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from region_graphs import random_region_graph

from hmgdm_core.config import load_config
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments
from hmgdm_core.downstream.config import EvalConfig, FinetuneConfig
from hmgdm_core.downstream.finetune import (
    Task,
    class_weights,
    fit_early_stopping,
    inner_split,
    load_slide_net,
    make_optimizer,
    predict,
    targets_tensor,
    task_loss,
)
from hmgdm_core.downstream.finetune_cv import DeepCoxCV, FinetuneCV
from hmgdm_core.exceptions import CheckpointError
from hmgdm_core.train import build_model

EVAL = EvalConfig(
    folds=3,
    finetune=FinetuneConfig(
        epochs=20, patience=4, hidden=16, lr=1e-2, encoder_lr=1e-2, head_epochs=0, batch_slides=8
    ),
)


def tuned(**finetune) -> EvalConfig:
    """EVAL with some of its fine-tuning settings changed."""
    return EVAL.model_copy(update={"finetune": EVAL.finetune.model_copy(update=finetune)})


def spread_cohort(spread: np.ndarray, seed: int = 0) -> list[list]:
    """One bag of two region graphs per slide; entity spacing scaled by 1 + 3 * spread."""
    bags = []
    for i, s in enumerate(spread):
        bag = [
            random_region_graph(12, seed=seed * 1000 + 2 * i + t, slide_id=f"s{i}") for t in (0, 1)
        ]
        for g in bag:
            g.pos = g.pos * (1 + 3 * float(s))
        bags.append(bag)
    return bags


def backbone_for(bags):
    cfg = load_config(None, TINY_MODEL)
    graphs = [g for bag in bags for g in bag]
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    return model, cfg


@pytest.fixture(scope="module")
def classes():
    y = np.array(["dense", "spread"] * 15)
    bags = spread_cohort((y == "spread").astype(float))
    return bags, y


def test_finetuning_learns_separable_classes_and_not_shuffled_ones(classes, tmp_path):
    bags, y = classes
    backbone, cfg = backbone_for(bags)
    patients = np.arange(len(y)) // 2  # two slides per patient
    cv = FinetuneCV(backbone, cfg, EVAL).fit(bags, y, patients)
    assert cv.metrics_["accuracy"]["mean"] >= 0.9
    shuffled = np.random.default_rng(1).permutation(y)
    assert (
        FinetuneCV(backbone, cfg, EVAL).fit(bags, shuffled, patients).metrics_["accuracy"]["mean"]
        <= 0.7
    )

    files = cv.write(tmp_path)
    summary = json.loads(files["metrics"].read_text())
    assert "fine-tuned" in summary["probe"] and summary["classes"] == ["dense", "spread"]
    assert (cv.folds_["best_epoch"] < cv.folds_["epochs_run"]).all()
    # One fold assignment although [evaluation] repeats is 3: each fold fine-tunes the encoder.
    assert EVAL.repeats == 3 and summary["repeats"] == 1
    assert cv.folds_["repeat"].eq(0).all() and len(cv.folds_) == EVAL.folds
    # The written model is the all-rows net: reloading it predicts exactly what it predicted.
    net, task, _ = load_slide_net(files["model"])
    assert task.classes == ("dense", "spread")
    assert torch.allclose(predict(net, bags[:4]), predict(cv.model_, bags[:4]), atol=1e-6)


def test_early_stopping_returns_the_epoch_with_the_lowest_validation_loss(classes):
    bags, y = classes
    backbone, _ = backbone_for(bags)
    task = Task("classification", ("dense", "spread"))
    index = np.searchsorted(task.classes, y)
    cfg = tuned(epochs=8, patience=8)
    net, info = fit_early_stopping(backbone, bags, index, np.arange(len(y)), task, cfg, seed=3)
    val_losses = [h["val_loss"] for h in info["history"]]
    assert info["best_epoch"] == int(np.argmin(val_losses))
    assert len(set(np.round(val_losses, 6))) > 1  # the choice was not trivial
    # Recompute on the same held-out slides (same split seed): the kept weights give the min.
    train, val = inner_split(index, np.arange(len(y)), cfg, 3)
    weight = class_weights(index[train], 2)  # the recorded loss weights classes as in training
    outputs = predict(net, [bags[i] for i in val])
    loss = task_loss(outputs, targets_tensor(task, index)[val], task, weight)
    assert float(loss) == pytest.approx(min(val_losses), rel=1e-5)


def test_deep_cox_head_ranks_a_known_hazard_and_not_shuffled_times(tmp_path):
    rng = np.random.default_rng(0)
    spread = rng.uniform(0, 1, 36)
    time = np.exp(-2 * spread + 0.3 * rng.normal(size=36))  # log-risk 2 * spread, small noise
    event = (rng.uniform(size=36) < 0.85).astype(int)
    bags = spread_cohort(spread, seed=1)
    backbone, cfg = backbone_for(bags)
    patients = np.arange(36)
    cox = tuned(batch_slides=16)
    cv = DeepCoxCV(backbone, cfg, cox).fit(bags, time, event, patients)
    assert cv.metrics_["cindex_pooled"] > 0.75
    shuffled = DeepCoxCV(backbone, cfg, cox).fit(bags, rng.permutation(time), event, patients)
    assert abs(shuffled.metrics_["cindex_pooled"] - 0.5) < 0.15
    files = cv.write(tmp_path)
    assert {"metrics", "folds", "km_plot", "km", "model"} <= set(files)
    assert load_slide_net(files["model"])[1].kind == "survival"


def test_a_pretraining_checkpoint_is_not_a_fine_tuned_model(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "hmgdm-checkpoint/1"}, path)
    with pytest.raises(CheckpointError, match="not a fine-tuned model"):
        load_slide_net(path)


def test_head_sees_standardised_entities_and_the_encoder_waits_for_the_head(classes):
    from torch_geometric.data import Batch

    bags, y = classes
    backbone, _ = backbone_for(bags)
    task = Task("classification", ("dense", "spread"))
    index = np.searchsorted(task.classes, y)
    start = {k: v.clone() for k, v in backbone.state_dict().items() if k.startswith("encoder.")}

    def fit(epochs: int, head_epochs: int):
        cfg = tuned(epochs=epochs, patience=epochs, head_epochs=head_epochs, encoder_lr=1e-3)
        return fit_early_stopping(backbone, bags, index, np.arange(len(y)), task, cfg)[0], cfg

    lp, cfg = fit(epochs=2, head_epochs=2)  # both epochs on the frozen encoder
    assert all(torch.equal(lp.backbone.state_dict()[k], v) for k, v in start.items())
    # The head's input statistics are those of the training rows' entity embeddings.
    train, _ = inner_split(index, np.arange(len(y)), cfg, 0)
    with torch.no_grad():
        e = backbone.node_embeddings(Batch.from_data_list([g for i in train for g in bags[i]]))
    torch.testing.assert_close(lp.input_mean, e.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp.input_std, e.std(0), rtol=1e-4, atol=1e-5)
    assert [g["lr"] for g in make_optimizer(lp, cfg).param_groups] == [1e-2, 1e-3]

    ft, _ = fit(epochs=1, head_epochs=0)  # one epoch, kept: the encoder trained in it
    assert any(not torch.equal(ft.backbone.state_dict()[k], v) for k, v in start.items())

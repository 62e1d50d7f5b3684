"""Cross-validated fine-tuning: the probes' patient-grouped folds, metrics and files, with a
SlideNet trained per fold instead of a probe (classification, and the deep Cox head).

Rows are slides given as bags of region graphs; each fold's model early-stops on patients
held out of its own training rows, never on the test fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hmgdm_core.config import HmgdmConfig
from hmgdm_core.downstream.classify import ProbeCV
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.downstream.finetune import (
    Bag,
    SlideNet,
    Task,
    fit_early_stopping,
    predict,
    save_slide_net,
)
from hmgdm_core.downstream.survival import SurvivalCV
from hmgdm_core.model.hmgdm import HMGDM


def bag_rows(bags: Sequence[Bag]) -> np.ndarray:
    """Bags as a 1-D object array, so folds can index them like embedding rows."""
    rows = np.empty(len(bags), dtype=object)
    for i, bag in enumerate(bags):
        rows[i] = list(bag)
    return rows


class _FineTuned:
    """What both fine-tuning CVs share: the backbone, per-fit training records, the model file."""

    config: EvalConfig

    def __init__(
        self, backbone: HMGDM, backbone_cfg: HmgdmConfig, config: EvalConfig | None = None
    ) -> None:
        self.config = config or EvalConfig()
        self.backbone, self.backbone_cfg = backbone, backbone_cfg
        self.training_: list[dict] = []

    @property
    def description(self) -> str:
        trained = "encoder + head" if self.config.finetune.train_encoder else "head only"
        return (
            f"gated-attention pooling over entities + MLP head, fine-tuned ({trained}), "
            f"early stopping on {self.config.val_fraction:.0%} of training patients"
        )

    def _rows(self, x: Sequence[Bag]) -> np.ndarray:
        return bag_rows(x)

    def _train(self, bags: np.ndarray, y: np.ndarray, groups: np.ndarray, task: Task) -> SlideNet:
        seed = self.config.seed + len(self.training_)
        net, info = fit_early_stopping(
            self.backbone, list(bags), y, groups, task, self.config, seed
        )
        self.training_.append(info)
        return net

    def _record_epochs(self) -> None:
        # The last fit is the all-rows model; the ones before it are the folds, in order.
        folds = self.training_[-(len(self.folds_) + 1) : -1]
        self.folds_["best_epoch"] = [t["best_epoch"] for t in folds]
        self.folds_["epochs_run"] = [t["epochs_run"] for t in folds]

    def _write_model(self, files: dict[str, Path], out_dir: Path | str, task: Task) -> dict:
        model_path = Path(out_dir) / "model.pt"
        files["model"] = save_slide_net(
            model_path, self.model_, self.backbone_cfg, task, self.config
        )
        return files


class FinetuneCV(_FineTuned, ProbeCV):
    """ProbeCV's folds and outputs with a fine-tuned SlideNet per fold; `fit(bags, y, groups)`.

    Also fitted: `training_` (best epoch and loss history of every fit) and `model_`, the net
    trained on all rows, written as `model.pt` for `hmgdm-client explain`.
    """

    def __init__(
        self, backbone: HMGDM, backbone_cfg: HmgdmConfig, config: EvalConfig | None = None
    ) -> None:
        # One fold assignment, the first: every fold fine-tunes the encoder, and repeating the
        # assignment would multiply that cost.
        one = (config or EvalConfig()).model_copy(update={"repeats": 1})
        super().__init__(backbone, backbone_cfg, one)

    def fit(self, x: Sequence[Bag], y, groups) -> FinetuneCV:
        super().fit(x, y, groups)
        self._record_epochs()
        return self

    @property
    def task(self) -> Task:
        return Task("classification", tuple(str(c) for c in self.classes_))

    def _fit_model(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> SlideNet:
        return self._train(x, np.searchsorted(self.classes_, y), groups, self.task)

    def _proba(self, model: SlideNet, x: np.ndarray) -> np.ndarray:
        return torch.softmax(predict(model, list(x)), dim=1).double().numpy()

    def write(self, out_dir: Path | str, slide_ids: Sequence[str] | None = None) -> dict[str, Path]:
        """ProbeCV's files plus `model.pt` (the all-rows fine-tuned model)."""
        return self._write_model(super().write(out_dir, slide_ids), out_dir, self.task)


class DeepCoxCV(_FineTuned, SurvivalCV):
    """SurvivalCV's folds and outputs with a deep Cox head (Breslow partial NLL) per fold."""

    task = Task("survival")

    def fit(self, x: Sequence[Bag], time, event, groups) -> DeepCoxCV:
        super().fit(x, time, event, groups)
        self._record_epochs()
        return self

    def _fit_model(
        self, x: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray
    ) -> SlideNet:
        return self._train(x, np.stack([time, event], axis=1), groups, self.task)

    def _risk(self, model: SlideNet, x: np.ndarray) -> np.ndarray:
        return predict(model, list(x))[:, 0].double().numpy()

    def write(self, out_dir: Path | str, slide_ids: Sequence[str] | None = None) -> dict[str, Path]:
        """SurvivalCV's files plus `model.pt` (the all-rows deep Cox model)."""
        return self._write_model(super().write(out_dir, slide_ids), out_dir, self.task)

"""Typed settings of downstream evaluation (folds, seeds, probe and Cox hyper-parameters)."""

from __future__ import annotations

from pydantic import Field, field_validator

from hmgdm_core.section import Section


class FinetuneConfig(Section):
    """Fine-tuning of the encoder with gated-attention pooling and a head (LP-FT)."""

    epochs: int = Field(30, ge=1, description="max epochs of fine-tuning per fold")
    patience: int = Field(5, ge=1, description="epochs without a better val loss")
    lr: float = Field(
        3e-3, gt=0, description="AdamW learning rate of the attention pooling and head"
    )
    encoder_lr: float = Field(
        3e-4, gt=0, description="AdamW learning rate of the encoder, once it trains (LP-FT)"
    )
    head_epochs: int = Field(
        5, ge=0, description="epochs of head-only training before the encoder trains too (LP-FT)"
    )
    batch_slides: int = Field(16, ge=1, description="slides per fine-tuning step")
    hidden: int = Field(64, ge=4, description="width of attention pooling and head")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in pooling and head")
    train_encoder: bool = Field(True, description="train the GNN encoder (else the head only)")
    max_tiles: int = Field(16, ge=1, description="tiles sampled per slide per step")
    max_nodes: int = Field(500, ge=2, description="entities sampled per tile per step")


class EvalConfig(Section):
    """Cross-validation, probe and fine-tuning settings of classification and survival."""

    folds: int = Field(5, ge=2, description="k of the patient-grouped k-fold")
    seed: int = Field(0, description="seed of the (first) fold assignment")
    repeats: int = Field(
        3,
        ge=1,
        description="fold assignments (seeds `seed`, `seed`+1, ...) the classification probe, "
        "its raw-descriptor baselines and label-efficiency curve average over; fine-tuning and "
        "survival use the first",
    )
    probe_c: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probe")
    probe_max_iter: int = Field(2000, ge=10, description="solver iterations of the probe")
    penalizer: float = Field(0.1, ge=0, description="L2 penalizer of the Cox probe (lifelines)")
    pca_components: int = Field(8, ge=1, description="PCA dimensions fed to the Cox probe")
    val_fraction: float = Field(0.2, gt=0, lt=0.5, description="patients held out for early stop")
    label_shares: list[float] = Field(
        [0.1, 0.25, 0.5, 1.0],
        description="shares of each training fold's patients the label-efficiency curve trains "
        "the probe on ([] skips it)",
    )
    label_draws: int = Field(3, ge=1, description="seeded patient draws per share and fold")
    fed_rounds: int = Field(5, ge=1, description="rounds of federated fine-tuning (FedAvg)")
    fed_local_epochs: int = Field(1, ge=1, description="local epochs per site per round")
    finetune: FinetuneConfig = Field(
        FinetuneConfig(), description="fine-tuning ([evaluation.finetune])"
    )

    @field_validator("label_shares")
    @classmethod
    def _shares(cls, shares: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in shares):
            raise ValueError(f"each share must be in (0, 1], got {shares}")
        return sorted(set(shares))

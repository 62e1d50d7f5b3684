"""Config sections for the H-MGDM model, its diffusion process and local training.

Defaults are small enough for a laptop CPU; `configs/debug.toml` is smaller still. The official
code's values (hidden 256, depth 3, T 1000, lr 1e-4, batch 32) are noted where they differ.
Defaults are the best design measured by `benchmarks/probe.py`; `configs/paper.toml` is the
paper's design (model/README.md: every departure, why, and its measured figures).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hmgdm_core.section import Section


class ModelConfig(Section):
    """Architecture of the stage-1 entity autoencoder and the stage-2 encoder/decoder."""

    latent_dim: int = Field(64, ge=1, description="stage-1 latent size per entity")
    edge_latent_dim: int = Field(8, ge=1, description="stage-1 latent size per edge")
    ae_hidden: int = Field(64, ge=4, description="stage-1 MLP width")
    use_windows: bool = Field(True, description="feed instance windows to the entity autoencoder")
    window_channels: int = Field(16, ge=1, description="conv width of the window encoder")
    window_recon: Literal["pooled", "pixels"] = Field(
        "pixels", description="stage 1 reconstructs windows 8x8 average-pooled or as pixels"
    )
    window_invariance: float = Field(
        0.0,
        ge=0,
        description="weight of a VICReg term making window features invariant to rotation, "
        "flips and stain (0 = off)",
    )
    kl_weight: float = Field(1e-3, ge=0, description="KL term weight of the entity VAE")
    hidden: int = Field(128, ge=8, description="GNN / decoder width (official: 256)")
    encoder_layers: int = Field(3, ge=1, description="GNN layers; also the decoder block count")
    conv: Literal["gine", "gatv2"] = Field("gine", description="GNN layer: GINE or GATv2")
    heads: int = Field(4, ge=1, description="attention heads in decoder and GATv2")
    self_attn_layers: int = Field(
        0, ge=0, description="Transformer layers before the decode blocks (paper: 2)"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in GNN and decoder")
    pos_frequencies: int = Field(8, ge=1, description="sinusoid frequencies per centroid axis")
    pos_scale_um: float = Field(200.0, gt=0, description="longest positional wavelength in µm")
    skip_connections: bool = Field(True, description="U-shaped skip; off = every block reads L")
    edge_latents: bool = Field(True, description="reconstruct masked edge latents too")
    readout: Literal["mean", "layers", "layers_std"] = Field(
        "layers_std",
        description="graph embedding: mean of the last layer; means of input + every layer; "
        "or those means and standard deviations",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


class DiffusionConfig(Section):
    """Dynamic entity masking and the DDPM noise process on masked latents."""

    timesteps: int = Field(1000, ge=1, le=10_000, description="DDPM steps T")
    schedule: Literal["sigmoid", "cosine"] = Field(
        "cosine", description="beta schedule (paper: sigmoid)"
    )
    beta_start: float = Field(1e-7, gt=0, lt=1, description="sigmoid schedule first beta")
    beta_end: float = Field(2e-3, gt=0, lt=1, description="sigmoid schedule last beta")
    prediction: Literal["x0", "epsilon"] = Field("x0", description="what the decoder predicts")
    mask_ratio: tuple[float, float] = Field((0.5, 0.7), description="ratio drawn per graph")
    fixed_mask_ratio: bool = Field(False, description="ablation: always the range midpoint")
    fixed_timestep: int | None = Field(None, ge=0, description="ablation: one noise level")
    masking: Literal["random", "bfs", "mixed"] = Field(
        "mixed", description="masked-subgraph shape: random, connected (BFS) or a coin per graph"
    )
    bfs_seeds: int = Field(4, ge=1, description="BFS seeds per graph for connected masking")
    edge_loss_weight: float = Field(1.0, ge=0, description="weight of the edge-latent loss")
    standardise_latents: bool = Field(
        True, description="noise and predict latents standardised to unit variance per batch"
    )
    timestep_range: tuple[float, float] = Field(
        (0.8, 1.0), description="timesteps drawn uniformly from this share of T (high = harder)"
    )
    encoder_input: Literal["visible", "mask_token"] = Field(
        "mask_token",
        description="encoder reads the visible subgraph (paper) or the whole graph with masked "
        "entities as a learned token (GraphMAE)",
    )
    node_loss: Literal["mse", "sce"] = Field(
        "sce", description="masked-node loss: MSE or scaled cosine error (GraphMAE)"
    )
    sce_gamma: float = Field(2.0, ge=1, description="exponent of the scaled cosine error")
    invariance_weight: float = Field(
        0.0,
        ge=0,
        description="weight of a VICReg term between the encoder states of two random views "
        "(rotation/flip, 30% of entities hidden) of each graph (0 = off)",
    )
    teacher_weight: float = Field(
        0.0,
        ge=0,
        description="weight of predicting an EMA teacher encoder's states of the masked "
        "entities from the unmasked graph (GraphMAE2 latent targets; needs mask_token; 0 = off)",
    )
    teacher_momentum: float = Field(
        0.99, ge=0, lt=1, description="EMA momentum of the teacher per stage-2 step"
    )

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        lo, hi = self.mask_ratio
        if not 0 < lo <= hi < 1:
            raise ValueError(f"mask_ratio must satisfy 0 < lo <= hi < 1, got {self.mask_ratio}")
        if self.fixed_timestep is not None and self.fixed_timestep >= self.timesteps:
            raise ValueError("fixed_timestep must be < timesteps")
        lo, hi = self.timestep_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"timestep_range must satisfy 0 <= lo < hi <= 1, got {lo, hi}")
        if self.teacher_weight > 0 and self.encoder_input != "mask_token":
            raise ValueError("teacher_weight > 0 needs encoder_input = 'mask_token'")
        return self


class TrainConfig(Section):
    """Optimisation of both stages; also what a federated client runs each round."""

    seed: int = Field(0, description="seeds model init, batches, masks and noise")
    autoencoder_epochs: int = Field(6, ge=0, description="stage-1 epochs before diffusion")
    epochs: int = Field(10, ge=1, description="stage-2 (diffusion) epochs")
    batch_size: int = Field(16, ge=1, description="graphs per step (official: 32)")
    max_nodes: int = Field(2000, ge=2, description="bigger graphs: connected subgraph sampled")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (official: 1e-4)")
    betas: tuple[float, float] = Field((0.95, 0.999), description="AdamW betas")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps warming up")
    min_lr_fraction: float = Field(0.1, ge=0, le=1, description="cosine floor, share of peak")
    grad_clip: float = Field(10.0, gt=0, description="gradient norm clip (official: 10)")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="local pretrain: share of slides held out for the loss and context share",
    )
    stain_jitter: float = Field(
        0.0, ge=0, le=0.5, description="H&E jitter of instance windows per graph (0 = off)"
    )

"""Building the model, the one training loop (local pretrain and federated client), checkpoints.

`train_steps` is the single step loop; `pretrain` wraps it with epochs, stage switching,
checkpoints, metrics and resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch_geometric.data import Batch, Data

from hmgdm_core.atomic import load_torch, save_torch
from hmgdm_core.config import HmgdmConfig, stored_config
from hmgdm_core.data import (
    FeatureStats,
    GraphDims,
    feature_moments,
    graph_dims,
    make_batch,
    stats_from_moments,
)
from hmgdm_core.exceptions import CheckpointError, ConfigError
from hmgdm_core.model.autoencoder import EntityVAE
from hmgdm_core.model.config import TrainConfig
from hmgdm_core.model.decoder import MaskedGraphDecoder
from hmgdm_core.model.diffusion import NoiseSchedule
from hmgdm_core.model.encoder import CentroidEncoding, GraphEncoder
from hmgdm_core.model.hmgdm import HMGDM, Stage, Standardiser

__all__ = [  # the API the federated client calls; data helpers re-exported for one import
    "BatchStep",
    "Checkpoint",
    "FeatureStats",
    "GraphDims",
    "Step",
    "build_model",
    "eval_loss",
    "feature_moments",
    "graph_dims",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "model_objective",
    "proximal",
    "resolve_device",
    "save_checkpoint",
    "stats_from_moments",
    "train_steps",
]

CHECKPOINT_FORMAT = "hmgdm-checkpoint/1"
STAGE_PREFIXES = {
    "autoencoder": ("autoencoder.",),
    "diffusion": ("encoder.", "decoder.", "projector.", "predictor."),
}


def build_model(cfg: HmgdmConfig, dims: GraphDims) -> HMGDM:
    """The full model for graphs of `dims`, initialised deterministically from `cfg.train.seed`."""
    m, d = cfg.model, cfg.diffusion
    use_edges = m.edge_latents and dims.edge_dim > 0
    window = dims.window if m.use_windows else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        vae = EntityVAE(
            in_dim=dims.x_dim,
            latent_dim=m.latent_dim,
            hidden=m.ae_hidden,
            window=window,
            channels=m.window_channels,
            kl_weight=m.kl_weight,
            recon=m.window_recon,
            invariance_weight=m.window_invariance,
        )
        edge_vae = (
            EntityVAE(
                in_dim=dims.edge_dim,
                latent_dim=m.edge_latent_dim,
                hidden=m.ae_hidden,
                window=window if dims.edge_windows else 0,
                channels=m.window_channels,
                kl_weight=m.kl_weight,
            )
            if use_edges
            else None
        )
        pos = CentroidEncoding(frequencies=m.pos_frequencies, scale_um=m.pos_scale_um)
        edge_latent = m.edge_latent_dim if use_edges else 0
        encoder = GraphEncoder(
            in_dim=m.latent_dim + pos.out_dim,
            edge_dim=edge_latent,
            hidden=m.hidden,
            num_layers=m.encoder_layers,
            conv=m.conv,
            heads=m.heads,
            dropout=m.dropout,
            mask_token_dims=(m.latent_dim, max(edge_latent, 1))
            if d.encoder_input == "mask_token"
            else None,
        )
        decoder = MaskedGraphDecoder(
            latent_dim=m.latent_dim,
            edge_latent_dim=edge_latent,
            pos_dim=pos.out_dim,
            hidden=m.hidden,
            num_blocks=m.encoder_layers,
            heads=m.heads,
            self_attn_layers=m.self_attn_layers,
            conv=m.conv,
            dropout=m.dropout,
            skip_connections=m.skip_connections,
            own_state=d.encoder_input == "mask_token",
        )
        model = HMGDM(
            autoencoder=vae,
            edge_autoencoder=edge_vae,
            encoder=encoder,
            decoder=decoder,
            schedule=NoiseSchedule.from_config(
                schedule=d.schedule, timesteps=d.timesteps, start=d.beta_start, end=d.beta_end
            ),
            pos_encoding=pos,
            standardiser=Standardiser(x_dim=dims.x_dim, edge_dim=dims.edge_dim),
            mask_ratio=d.mask_ratio,
            fixed_ratio=d.fixed_mask_ratio,
            masking=d.masking,
            bfs_seeds=d.bfs_seeds,
            fixed_timestep=d.fixed_timestep,
            prediction=d.prediction,
            edge_loss_weight=d.edge_loss_weight,
            readout=m.readout,
            standardise_latents=d.standardise_latents,
            timestep_range=d.timestep_range,
            encoder_input=d.encoder_input,
            node_loss=d.node_loss,
            sce_gamma=d.sce_gamma,
            invariance_weight=d.invariance_weight,
            teacher_weight=d.teacher_weight,
            teacher_momentum=d.teacher_momentum,
        )
    model.dims = dims
    return model


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch on this machine")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: expected auto, cpu or cuda")
    return torch.device(name)


def stage_parameters(model: HMGDM, stage: Stage) -> list[torch.nn.Parameter]:
    """The parameters a stage trains (stage 1: autoencoders; stage 2: encoder + decoder)."""
    prefixes = STAGE_PREFIXES[stage]
    return [p for name, p in model.named_parameters() if name.startswith(prefixes)]


def make_optimizer(model: HMGDM, cfg: TrainConfig, stage: Stage) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        stage_parameters(model, stage), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup over `warmup_fraction` of the steps, then cosine down to `min_lr_fraction`."""
    warmup = max(1, round(cfg.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it, fp16 otherwise; nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _fp16(device: torch.device, cfg: TrainConfig) -> bool:
    return device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()


def _batches(graphs: Sequence[Data], batch_size: int, generator: torch.Generator):
    """Index lists without end: passes over a fresh permutation each, a pass's last may be short."""
    order: list[int] = []
    while True:
        if not order:
            order = torch.randperm(len(graphs), generator=generator).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        yield [graphs[i] for i in chunk]


Objective = Callable[[Batch], dict[str, torch.Tensor]]


def model_objective(model: HMGDM, *, stage: Stage, generator: torch.Generator) -> Objective:
    """The model's own training objective for `stage`: loss terms of a batch ("loss" minimised)."""
    return functools.partial(model.loss, stage=stage, generator=generator)


def proximal(objective: Objective, model: nn.Module, names: Iterable[str], mu: float) -> Objective:
    """FedProx: `objective` + mu/2 * ||w - w_global||^2 over the parameters `names`, anchored at
    their current values (the global weights a round starts from)."""
    names = set(names)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}

    def loss(batch: Batch) -> dict[str, torch.Tensor]:
        terms = objective(batch)
        prox = sum((p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor)
        terms["loss"] = terms["loss"] + 0.5 * mu * prox
        terms["proximal"] = torch.as_tensor(prox).detach()
        return terms

    return loss


class Step(Protocol):
    """How one optimiser step draws its data and applies its gradient (plain, or DP-SGD).

    Called with the objective and optimiser, it returns the step's loss terms and their weight
    (what the step averaged over); `weight_name` says what that weight counts.
    """

    weight_name: str

    def steps_for(self, epochs: float) -> int: ...

    def __call__(
        self, objective: Objective, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, float], int]: ...


class BatchStep:
    """The plain step: a batch of graphs, one backward pass, gradient-norm clipping, AMP."""

    weight_name = "num_graphs"

    def __init__(
        self,
        graphs: Sequence[Data],
        cfg: TrainConfig,
        *,
        device: torch.device,
        generator: torch.Generator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.graphs, self.cfg, self.device, self.generator = graphs, cfg, device, generator
        self.scaler = scaler or torch.amp.GradScaler("cuda", enabled=_fp16(device, cfg))
        self._chunks = _batches(graphs, cfg.batch_size, generator)

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * math.ceil(len(self.graphs) / self.cfg.batch_size)))

    def __call__(
        self, objective: Objective, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, float], int]:
        chunk = next(self._chunks)
        batch = make_batch(
            chunk, self.cfg.max_nodes, self.generator, stain_jitter=self.cfg.stain_jitter
        ).to(self.device)
        with _autocast(self.device, self.cfg.amp):
            terms = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        return {k: float(v.detach()) for k, v in terms.items()}, len(chunk)


def train_steps(
    model: HMGDM,
    optimizer: torch.optim.Optimizer,
    graphs: Sequence[Data],
    cfg: TrainConfig,
    *,
    stage: Stage,
    steps: int | None = None,
    epochs: float | None = None,
    device: torch.device,
    generator: torch.Generator,
    progress: bool = False,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    step: Step | None = None,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Run `steps` optimiser steps (or `epochs` passes) of `stage`; mean loss terms and counts.

    The one training loop: `step` (default `BatchStep` over `graphs`) decides how a step draws
    and applies its batch, e.g. patient-level DP-SGD; `objective` (default the model's loss)
    what it minimises, e.g. with FedProx's `proximal` term.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps= or epochs=")
    step = step or BatchStep(graphs, cfg, device=device, generator=generator, scaler=scaler)
    objective = objective or model_objective(model, stage=stage, generator=generator)
    steps = step.steps_for(epochs) if steps is None else steps
    model.to(device).train()
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    with _progress(progress, steps, stage) as live:
        task = live.add_task(stage, total=steps, loss=float("nan")) if live else None
        for _ in range(steps):
            terms, weight = step(objective, optimizer)
            if stage == "diffusion" and isinstance(model, HMGDM):
                model.update_teacher()
            if scheduler is not None:
                scheduler.step()
            for key, value in terms.items():
                # A DP step may draw no patient: its loss is undefined, and weighs nothing.
                sums[key] = sums.get(key, 0.0) + (value * weight if weight else 0.0)
            seen += weight
            if live:
                live.update(task, advance=1, loss=sums.get("loss", math.nan) / max(seen, 1))
    seconds = time.perf_counter() - start
    out = {key: value / seen if seen else math.nan for key, value in sums.items()}
    return out | {
        step.weight_name: float(seen),
        "num_steps": float(steps),
        "seconds": seconds,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }


def _progress(enabled: bool, steps: int, stage: str):
    if not enabled:
        return contextlib.nullcontext()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from hmgdm_core.log import console

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@torch.no_grad()
def eval_loss(
    model: HMGDM,
    graphs: Sequence[Data],
    cfg: TrainConfig,
    *,
    stage: Stage,
    device: torch.device,
    generator: torch.Generator,
) -> dict[str, float]:
    """Mean masked-reconstruction (or stage-1) loss terms over held-out `graphs`.

    Stage 2 adds the context diagnostic: `context_share` = (loss with another graph's encoder
    states - loss with the true ones) / variance of the masked targets (zeroed states when
    only one graph is held out). Near 0, the decoder
    denoises without using the encoder, and stage 2 cannot be teaching the encoder much.
    """
    model.to(device).eval()
    sums: dict[str, float] = {}
    starts = list(range(0, len(graphs), cfg.batch_size))
    if len(starts) > 1 and len(graphs) - starts[-1] == 1:
        starts.pop()  # no batch of one graph: the context swap needs another graph
    for i, end in zip(starts, [*starts[1:], len(graphs)], strict=True):
        chunk = graphs[i:end]
        # No stain jitter: an augmentation of training batches would make held-out losses
        # noisier and incomparable across jitter settings.
        batch = make_batch(chunk, cfg.max_nodes, generator).to(device)
        with _autocast(device, cfg.amp):
            terms = model.loss(
                batch, stage=stage, generator=generator, diagnose=stage == "diffusion"
            )
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
    out = {key: value / len(graphs) for key, value in sums.items()}
    if "context_gain" in out:  # a ratio of means: small batches do not dominate
        out["context_share"] = out["context_gain"] / max(out.pop("target_var"), 1e-12)
    return out | {"num_graphs": float(len(graphs))}


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model plus everything needed to resume."""

    model: HMGDM
    cfg: HmgdmConfig
    epoch: int
    optimizer: dict | None
    scheduler: dict | None
    rng: dict
    extra: dict


def save_checkpoint(
    path: Path,
    *,
    model: HMGDM,
    cfg: HmgdmConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    extra: dict | None = None,
) -> None:
    """Write a self-describing checkpoint atomically (config, graph dims, feature stats inside)."""
    save_torch(
        {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.model_dump(mode="json"),
            "dims": dataclasses.asdict(model.dims),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "epoch": epoch,
            "rng": {
                "torch": torch.get_rng_state(),
                "generator": generator.get_state() if generator is not None else None,
            },
            "extra": extra or {},
        },
        Path(path),
    )


def read_checkpoint(path: Path, fmt: str, what: str, *, trust: bool = False) -> dict:
    """The saved dict of format `fmt`, read without running code from the file (`load_torch`);
    a one-line CheckpointError naming the file otherwise. `trust` is `--trust-checkpoint`."""
    blob = load_torch(path, trust=trust)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise CheckpointError(f"{path}: {what}")
    return blob


def load_checkpoint(
    path: Path, *, cfg: HmgdmConfig | None = None, trust: bool = False
) -> Checkpoint:
    """Rebuild the model from a checkpoint; with `cfg`, its model sections must match."""
    path = Path(path)
    blob = read_checkpoint(
        path,
        CHECKPOINT_FORMAT,
        f"not an hmgdm checkpoint (format {CHECKPOINT_FORMAT})",
        trust=trust,
    )
    stored = HmgdmConfig.model_validate(stored_config(blob["config"]))
    if cfg is not None:
        for section in ("model", "diffusion"):
            if getattr(cfg, section) != getattr(stored, section):
                raise CheckpointError(
                    f"{path}: written with a different [{section}] config; "
                    "use the checkpoint's config or start a new run"
                )
    model = build_model(stored, GraphDims(**blob["dims"]))
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the stored config: {first}") from None
    return Checkpoint(
        model=model,
        cfg=stored,
        epoch=int(blob["epoch"]),
        optimizer=blob["optimizer"],
        scheduler=blob["scheduler"],
        rng=blob["rng"],
        extra=blob["extra"],
    )


def check_graph_dims(model: HMGDM, graphs: Sequence[Data], source: str) -> None:
    """A CheckpointError when the graphs' feature sizes differ from the model's."""
    dims = graph_dims(graphs)
    if dims != model.dims:
        raise CheckpointError(
            f"{source}: graph features {dims} do not match the checkpoint's "
            f"{model.dims}; rebuild graphs with the checkpoint's graph config"
        )

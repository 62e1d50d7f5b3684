"""DP-SGD with the patient as the privacy unit: Poisson sampling of patients, one clipped
gradient per patient, Gaussian noise once per step (`PatientDPStep`, a step strategy of the one
training loop). Works with any `nn.Module` and objective.

opacus' per-sample hooks treat each node row of a PyG batch as a sample (wrong unit), so
per-patient gradients come from a plain loop; opacus supplies the noise and the layer checks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from opacus.optimizers.optimizer import _generate_noise
from opacus.validators import ModuleValidator
from torch import Tensor, nn

import hmgdm_core.privacy._opacus  # noqa: F401  (drops the log handler opacus adds)
from hmgdm_core.privacy.accountant import Mechanism
from hmgdm_core.privacy.errors import PrivacyError

B = TypeVar("B")
G = TypeVar("G")
# Layers opacus flags only because its per-sample hooks cannot handle them.
_HOOK_ONLY = (nn.MultiheadAttention, nn.RNNBase)


def private_generator(
    seed: int | None = None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator for DP noise and sampling, seeded from OS entropy unless `seed` is given.

    The guarantee assumes nobody can predict the noise or the sample: never seed it from a
    config value the server or other sites know.
    """
    gen = torch.Generator(device=device)
    return gen.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)


def poisson_patients(
    patient_ids: Sequence[str], rate: float, generator: torch.Generator
) -> list[str]:
    """Each patient independently with probability `rate` (the sample may be empty)."""
    if not 0 < rate <= 1:
        raise PrivacyError(f"Poisson sampling rate must be in (0, 1], got {rate}")
    keep = torch.rand(len(patient_ids), generator=generator, device=generator.device) < rate
    return [patient_ids[i] for i in keep.nonzero().view(-1).tolist()]


def group_by_patient(
    graphs: Sequence[G], patients: Mapping[str, str] | None = None
) -> dict[str, list[G]]:
    """Graphs grouped by patient (`patients`: slide_id -> patient_id; unmapped slide = patient)."""
    patients = patients or {}
    groups: dict[str, list[G]] = {}
    for g in graphs:
        slide = str(g.slide_id)
        groups.setdefault(patients.get(slide, slide), []).append(g)
    return dict(sorted(groups.items()))


def check_model(model: nn.Module) -> None:
    """Refuse layers that would leak outside the clipped, noised gradient.

    opacus' validators flag BatchNorm and InstanceNorm with running stats: they mix examples
    and their buffers are shared un-noised. Its advice to swap MultiheadAttention, LSTM and
    GRU for its DP layers only concerns its hooks, which the per-patient loop does not use.
    """
    bad = [
        f"{name or type(model).__name__} ({type(module).__name__}): {err}"
        for name, module in model.named_modules()
        if not isinstance(module, _HOOK_ONLY)
        for err in ModuleValidator.VALIDATORS.get(type(module), _no_errors)(module)
    ]
    if bad:
        raise PrivacyError(
            "model has layers DP-SGD cannot protect; replace them (e.g. BatchNorm -> GroupNorm "
            "or LayerNorm) and retrain from scratch: " + "; ".join(bad)
        )


def _no_errors(_: nn.Module) -> list:
    return []


def dp_step(
    optimizer: torch.optim.Optimizer,
    patient_batches: Sequence[B],
    loss_fn: Callable[[B], Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """One DP-SGD step over the optimiser's parameters.

    Each entry of `patient_batches` is everything one patient contributes this step and
    `loss_fn(entry)` its loss, so a patient yields one gradient, clipped to `clip_norm`. The sum
    gets N(0, (noise_multiplier * clip_norm)^2) noise and is divided by `expected_batch_size`
    (not by the drawn count, which would reveal how many patients were sampled).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not params:
        raise PrivacyError("the optimiser has no trainable parameters")
    total = params[0].new_zeros(sum(p.numel() for p in params))  # (num_params,)
    losses, clipped = [], 0
    for entry in patient_batches:
        loss = loss_fn(entry)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        )
        norm = flat.norm()
        # The same factor as opacus' clipping: min(1, C / (norm + 1e-6)).
        factor = (clip_norm / (norm + 1e-6)).clamp(max=1.0)
        total.add_(flat * factor)
        losses.append(float(loss.detach()))
        clipped += int(factor < 1)
    total.add_(_generate_noise(noise_multiplier * clip_norm, total, generator=generator))
    total.div_(expected_batch_size)
    for p, g in zip(params, total.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n = len(losses)
    return {
        "loss": sum(losses) / n if n else math.nan,
        "num_patients": float(n),
        "clipped_fraction": clipped / n if n else math.nan,
    }


class PatientDPStep:
    """Patient-level DP-SGD as the step of `hmgdm_core.train.train_steps`: Poisson-sample
    patients at the mechanism's rate, one clipped gradient per patient, noise once per step.

    `batch(items)` turns one patient's items into what the objective reads. The mechanism is
    the only source of noise, clipping and rate; `generator` must be private (`private_generator`).
    """

    weight_name = "num_patient_samples"

    def __init__(
        self,
        patients: Mapping[str, Sequence[G]],
        mechanism: Mechanism,
        batch: Callable[[Sequence[G]], B],
        *,
        generator: torch.Generator,
    ) -> None:
        self.patients, self.mechanism, self.batch = patients, mechanism, batch
        self.ids, self.generator = list(patients), generator

    def steps_for(self, epochs: float) -> int:
        return self.mechanism.steps_for(epochs)

    def __call__(
        self, objective: Callable[[B], dict[str, Tensor]], optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, float], int]:
        m = self.mechanism
        chosen = poisson_patients(self.ids, m.sample_rate, self.generator)
        out = dp_step(
            optimizer,
            [self.patients[i] for i in chosen],
            lambda items: objective(self.batch(items))["loss"],
            clip_norm=m.clip_norm,
            noise_multiplier=m.noise_multiplier,
            expected_batch_size=m.sample_rate * len(self.ids),
            generator=self.generator,
        )
        return {"loss": out["loss"], "clipped_fraction": out["clipped_fraction"]}, len(chosen)

"""A study's TOML: cohort, the grid (sites x partitions x regimes x noise x seeds), training
budget, probe protocol and simulation resources. Unknown keys are refused with their name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from hmgdm_core.config import GraphConfig, parse_section, read_toml
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.section import Section
from hmgdm_core.studies.partition import dirichlet_partition, iid_partition, quantity_partition

Regime = Literal[
    "local", "centralized", "fedavg", "fedprox", "central_dp", "local_dp",
    "random_init", "graphmae", "raw",
]  # fmt: skip
FEDERATED: tuple[Regime, ...] = ("fedavg", "fedprox", "central_dp", "local_dp")
DP_REGIMES: tuple[Regime, ...] = ("central_dp", "local_dp")
# Regimes a clinical-covariate survival cohort (no images) can run: Cox alone per site,
# pooled, or federated Newton (hmgdm_core.downstream.fedcox).
SURVIVAL_REGIMES: tuple[Regime, ...] = ("local", "centralized", "fedavg")


class CohortConfig(Section):
    """Which data a study runs on and how much of it."""

    kind: Literal["synthetic", "lc25000", "tcga"] = "synthetic"
    per_class: int = Field(20, ge=2, description="synthetic: images per class")
    images: int = Field(300, ge=6, description="lc25000: about this many images, whole groups")
    tcga_cohort: str = Field("lusc", description="tcga: tcga_<name>_survival.csv")
    min_events: int = Field(10, ge=1, description="tcga: merge tissue source sites below this")
    graph: GraphConfig | None = Field(
        None, description="entity graphs; default: the cohort's (synthetic: one per cell)"
    )


class PartitionSpec(Section):
    """How the cohort is dealt to sites, and whether sites' stains differ."""

    kind: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, quantity)")
    stain: float = Field(0.0, ge=0, description="per-site H&E optical-density shift (std, log)")
    stain_model: Literal["hed", "beer_lambert"] = Field(
        "hed",
        description="how a site's stains differ: hed = skimage HED scaled (clips negative "
        "stain), beer_lambert = linear in optical density, stain vectors turned too",
    )
    stain_norm: Literal["none", "macenko", "reinhard"] = Field(
        "none", description="sites normalise stains before building graphs (graph.stain_norm)"
    )

    @property
    def name(self) -> str:
        base = self.kind if self.kind == "iid" else f"{self.kind}{self.alpha:g}"
        if self.stain:
            model = "" if self.stain_model == "hed" else f"-{self.stain_model}"
            base = f"{base}+stain{self.stain:g}{model}"
        return base if self.stain_norm == "none" else f"{base}+{self.stain_norm}"

    def assign(self, labels: np.ndarray, sites: int, seed: int) -> np.ndarray:
        """Site index per item."""
        if self.kind == "dirichlet":
            return dirichlet_partition(labels, sites, self.alpha, seed)
        if self.kind == "quantity":
            return quantity_partition(len(labels), sites, self.alpha, seed)
        return iid_partition(len(labels), sites, seed)


class TrainingBudget(Section):
    """The same optimiser steps for every regime: a round is `local_steps` steps at a site."""

    stage1_rounds: int = Field(1, ge=1)
    stage2_rounds: int = Field(2, ge=1)
    local_steps: int = Field(5, ge=1)
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    clip_norm: float = Field(1.0, gt=0, description="DP clipping (per patient / per site update)")
    delta: float = Field(1e-5, gt=0, lt=1)
    model: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="hmgdm config overrides, e.g. 'model.hidden' = 32"
    )

    @property
    def ae_steps(self) -> int:
        return self.stage1_rounds * self.local_steps

    @property
    def diffusion_steps(self) -> int:
        return self.stage2_rounds * self.local_steps


class Resources(Section):
    """What one virtual site gets from Ray (Flower's backend client-resources / init-args)."""

    num_cpus: int = Field(1, ge=1, description="CPUs per virtual site (Flower 1.42: integer)")
    num_gpus: float = Field(0.0, ge=0, description="GPU share per site (0.25: 4 sites per GPU)")
    ray_cpus: int | None = Field(
        None, ge=1, description="CPUs Ray may use on this machine (default: all)"
    )
    ray_gpus: int | None = Field(None, ge=0, description="GPUs Ray may use (default: all)")

    def flower(self) -> dict:
        """The `options.backend` table of a Flower simulation connection."""
        backend: dict = {"client-resources": {"num-cpus": self.num_cpus, "num-gpus": self.num_gpus}}
        init = {"num-cpus": self.ray_cpus, "num-gpus": self.ray_gpus}
        if any(v is not None for v in init.values()):
            backend["init-args"] = {k: v for k, v in init.items() if v is not None}
        return backend


class StudyConfig(Section):
    """One study: every combination of the lists below is a cell, run once per seed."""

    name: str = "study"
    cohort: CohortConfig = CohortConfig()
    sites: list[int] = Field([3], min_length=1)
    partitions: list[PartitionSpec] = Field([PartitionSpec()], min_length=1)
    regimes: list[Regime] = Field(["local", "centralized", "fedavg"], min_length=1)
    noise: list[float] = Field([1.0], min_length=1, description="DP noise multipliers")
    seeds: list[int] = Field([0], min_length=1)
    training: TrainingBudget = TrainingBudget()
    probe: EvalConfig = EvalConfig()
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if any(s < 1 for s in self.sites):
            raise ValueError("sites must all be >= 1")
        if any(n <= 0 for n in self.noise):
            raise ValueError("noise multipliers must be > 0")
        if self.cohort.kind == "tcga":
            other = [r for r in self.regimes if r not in SURVIVAL_REGIMES]
            if other:
                raise ValueError(
                    f"the tcga cohort has no images; regimes {other} need them "
                    f"(use {list(SURVIVAL_REGIMES)})"
                )
        return self


def load_study(path: Path | str) -> StudyConfig:
    """Read and validate a study TOML; a one-line ConfigError naming the file and key."""
    path = Path(path)
    return parse_section(StudyConfig, read_toml(path, "study config"), path)

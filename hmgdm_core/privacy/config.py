"""The [privacy] config section: which DP mode, its noise and clipping, budget and validation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.section import Section

Mode = Literal["none", "central", "client_central", "local_dp"]
CENTRAL_MODES = ("central", "client_central")  # the server adds noise; one site is the unit
# Central DP needs an unweighted mean: sites send this metric as 1 and the strategy weights by it.
UNIFORM_WEIGHT_KEY = "dp-weight"


class PrivacyConfig(Section):
    """Differential privacy of a run.

    `central`: the server clips each site's update and adds noise (server trusted).
    `client_central`: sites clip, the server adds noise (server never sees unclipped updates).
    `local_dp`: each site runs DP-SGD with the patient as the privacy unit (server untrusted).
    """

    mode: Mode = Field(
        "none", description="none, central, client_central or local_dp (see docs/privacy.md)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    max_epsilon: float | None = Field(
        None, gt=0, description="a site refuses rounds that would exceed this epsilon"
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="opacus accountant")
    # Local DP-SGD (mode = local_dp); the unit is one patient.
    noise_multiplier: float = Field(1.0, gt=0, description="DP-SGD noise std / clip_norm")
    clip_norm: float = Field(1.0, gt=0, description="per-patient gradient norm bound")
    patients_per_step: float = Field(8.0, gt=0, description="expected patients per DP-SGD step")
    sample_rate: float | None = Field(
        None, gt=0, le=1, description="Poisson rate per patient; overrides patients_per_step"
    )
    graphs_per_patient: int = Field(
        4, ge=1, description="graphs drawn from a sampled patient per step (cost, not privacy)"
    )
    noise_seed: int | None = Field(
        None, description="tests only: a known seed lets anyone who knows it remove the noise"
    )
    # Central modes: one site's update is the unit.
    central_noise_multiplier: float = Field(1.0, gt=0, description="noise std / central_clip_norm")
    central_clip_norm: float = Field(1.0, gt=0, description="bound on one site's update norm")
    adaptive_clipping: bool = Field(False, description="adapt central_clip_norm to a quantile")
    target_clipped_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive clipping: share of updates left unclipped"
    )
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive clipping learning rate")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive clipping count noise; default central_noise_multiplier"
    )
    # Server-side protections independent of DP.
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="drop replies whose update norm exceeds this (needs individual updates)",
    )
    secure_aggregation: bool = Field(False, description="SecAgg+: the server sees only the sum")
    # SecAgg+ (Flower's protocol): sites mask a quantised, weighted update; see docs/privacy.md.
    secagg_clipping_range: float = Field(
        1.0, gt=0, description="weighted update coordinates are clipped to +-this, then quantised"
    )
    secagg_quantization_range: int = Field(
        2**22, ge=2, description="integer levels per coordinate (precision 2 * range / levels)"
    )
    secagg_max_weight: float = Field(
        1000.0, gt=0, description="largest site weight (graphs); 1 in central modes (equal weights)"
    )
    secagg_share_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the round's sites each site sends key shares to"
    )
    secagg_threshold: float = Field(
        0.67, gt=0, le=1, description="share of those key shares needed to unmask (min 2 sites)"
    )

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.noise_seed is not None and self.mode == "none":
            raise ValueError("noise_seed only applies when a DP mode is on")
        return self

    def rate_for(self, num_patients: int) -> float:
        """Poisson sampling rate of one patient at a site with `num_patients` patients."""
        if num_patients < 1:
            raise PrivacyError("DP-SGD needs at least one patient at this site; found none")
        if self.sample_rate is not None:
            return self.sample_rate
        return min(1.0, self.patients_per_step / num_patients)

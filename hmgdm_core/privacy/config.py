"""Privacy settings, split along the trust boundary: the run's [privacy] (the server's: DP mode,
central DP, SecAgg+, update validation) and a site's own [local_dp], which only that site's file
sets: the run config has no local-DP section, so no server can change a site's noise or budget.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.section import Section

Mode = Literal["none", "central", "client_central", "local_dp"]
Accountant = Literal["rdp", "prv"]
CENTRAL_MODES = ("central", "client_central")  # the server adds noise; one site is the unit
# Central DP needs an unweighted mean: sites send this metric as 1 and the strategy weights by it.
UNIFORM_WEIGHT_KEY = "dp-weight"


class LocalDP(Section):
    """This site's patient-level DP-SGD (`[local_dp]` of the site's own file, passed to
    `hmgdm-client join --privacy-config`): noise, clipping, sampling and the site's budget."""

    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    max_epsilon: float | None = Field(
        None, gt=0, description="the site refuses rounds that would exceed this epsilon"
    )
    accountant: Accountant = Field("rdp", description="opacus accountant")
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

    def rate_for(self, num_patients: int) -> float:
        """Poisson sampling rate of one patient at a site with `num_patients` patients."""
        if num_patients < 1:
            raise PrivacyError("DP-SGD needs at least one patient at this site; found none")
        if self.sample_rate is not None:
            return self.sample_rate
        return min(1.0, self.patients_per_step / num_patients)


class CentralDP(Section):
    """Central DP (modes central, client_central): one site's update is the unit."""

    noise_multiplier: float = Field(1.0, gt=0, description="noise std / clip_norm")
    clip_norm: float = Field(1.0, gt=0, description="bound on one site's update norm")
    adaptive_clipping: bool = Field(False, description="adapt clip_norm to a quantile")
    target_clipped_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive clipping: share of updates left unclipped"
    )
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive clipping learning rate")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive clipping count noise; default noise_multiplier"
    )


class SecAgg(Section):
    """SecAgg+ (Flower's protocol): sites mask a quantised, weighted update; the server learns
    only the sum (see docs/privacy.md)."""

    enabled: bool = Field(False, description="SecAgg+: the server sees only the sum")
    clipping_range: float = Field(
        1.0, gt=0, description="weighted update coordinates are clipped to +-this, then quantised"
    )
    quantization_range: int = Field(
        2**22, ge=2, description="integer levels per coordinate (precision 2 * range / levels)"
    )
    max_weight: float = Field(
        1000.0, gt=0, description="largest site weight (graphs); 1 in central modes (equal weights)"
    )
    share_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the round's sites each site sends key shares to"
    )
    threshold: float = Field(
        0.67, gt=0, le=1, description="share of those key shares needed to unmask (min 2 sites)"
    )


class UpdateValidation(Section):
    """Server-side checks of every site's update, independent of DP."""

    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="drop replies whose update norm exceeds this (needs individual updates)",
    )


class PrivacyConfig(Section):
    """Differential privacy of a run, as the server runs it.

    `central`: the server clips each site's update and adds noise (server trusted).
    `client_central`: sites clip, the server adds noise (server never sees unclipped updates).
    `local_dp`: each site runs DP-SGD with the patient as the privacy unit (server untrusted),
    under the [local_dp] of its own file; `delta`, `max_epsilon` and `accountant` here are the
    run's central guarantee.
    """

    mode: Mode = Field(
        "none", description="none, central, client_central or local_dp (see docs/privacy.md)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the central (epsilon, delta)")
    max_epsilon: float | None = Field(
        None, gt=0, description="central DP: the run stops before exceeding this epsilon"
    )
    accountant: Accountant = Field("rdp", description="opacus accountant of central DP")
    central: CentralDP = Field(CentralDP(), description="[privacy.central]")
    secagg: SecAgg = Field(SecAgg(), description="[privacy.secagg]")
    validation: UpdateValidation = Field(UpdateValidation(), description="[privacy.validation]")

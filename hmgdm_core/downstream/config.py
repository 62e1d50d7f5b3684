"""Typed settings of downstream evaluation (folds, seeds, probe and Cox hyper-parameters)."""

from __future__ import annotations

from pydantic import Field

from hmgdm_core.section import Section


class EvalConfig(Section):
    """Cross-validation and probe settings shared by classification and survival evaluation."""

    folds: int = Field(5, ge=2, description="k of the patient-grouped k-fold")
    seed: int = Field(0, description="seed of the fold assignment")
    probe_c: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probe")
    probe_max_iter: int = Field(2000, ge=10, description="solver iterations of the probe")
    penalizer: float = Field(0.1, ge=0, description="L2 penalizer of the Cox probe (lifelines)")
    pca_components: int = Field(8, ge=1, description="PCA dimensions fed to the Cox probe")

"""The [privacy] section: unknown keys rejected, sampling rate, test-only noise seed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hmgdm_core.privacy.config import PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="noise_multipler"):
        PrivacyConfig(noise_multipler=1.0)
    with pytest.raises(ValidationError, match="noise_multiplier"):
        PrivacyConfig(mode="local_dp", noise_multiplier=0.0)
    with pytest.raises(ValidationError, match="noise_seed"):
        PrivacyConfig(noise_seed=3)


def test_sampling_rate_from_patients_per_step_or_explicit():
    cfg = PrivacyConfig(mode="local_dp", patients_per_step=8)
    assert cfg.rate_for(80) == 0.1 and cfg.rate_for(4) == 1.0
    assert PrivacyConfig(mode="local_dp", sample_rate=0.02).rate_for(80) == 0.02
    with pytest.raises(PrivacyError, match="at least one patient"):
        cfg.rate_for(0)

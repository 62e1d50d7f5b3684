"""The [privacy] and [local_dp] sections: unknown keys rejected, local-DP knobs only in a
site's own [local_dp], sampling rate."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hmgdm_core.privacy.config import LocalDP, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="noise_multipler"):
        LocalDP(noise_multipler=1.0)
    with pytest.raises(ValidationError, match="noise_multiplier"):
        LocalDP(noise_multiplier=0.0)
    # The run's [privacy] (the server's) has no local-DP knob to set.
    for knob in ("noise_seed", "noise_multiplier", "clip_norm", "patients_per_step"):
        with pytest.raises(ValidationError, match=knob):
            PrivacyConfig(**{knob: 3})


def test_sampling_rate_from_patients_per_step_or_explicit():
    cfg = LocalDP(patients_per_step=8)
    assert cfg.rate_for(80) == 0.1 and cfg.rate_for(4) == 1.0
    assert LocalDP(sample_rate=0.02).rate_for(80) == 0.02
    with pytest.raises(PrivacyError, match="at least one patient"):
        cfg.rate_for(0)

"""Epsilon from opacus' accountants: the known anchor, step-by-step agreement, noise search."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from hmgdm_core.privacy.accountant import compose, epsilon, noise_for_budget


def test_rdp_anchor_measured_independently():
    assert epsilon([(1.0, 0.01, 1000)], delta=1e-5) == pytest.approx(2.1014, abs=1e-4)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_history_matches_an_opacus_accountant_stepped_one_step_at_a_time(kind):
    history = [(1.1, 0.02, 150), (1.1, 0.02, 50), (0.8, 0.05, 100)]
    reference = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=rate)
    expected = reference.get_epsilon(delta=1e-5)
    assert epsilon(history, delta=1e-5, accountant=kind) == pytest.approx(expected, abs=1e-6)


def test_compose_merges_equal_neighbours_and_drops_empty_rounds():
    assert compose([(1.0, 0.1, 5), (1.0, 0.1, 0), (1.0, 0.1, 3), (2.0, 0.1, 1)]) == [
        (1.0, 0.1, 8),
        (2.0, 0.1, 1),
    ]
    assert epsilon([], delta=1e-5) == 0.0


def test_noise_for_budget_stays_within_the_target():
    sigma = noise_for_budget(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=400)
    spent = epsilon([(sigma, 0.05, 400)], delta=1e-5)
    assert 2.95 <= spent <= 3.0


def test_importing_the_privacy_code_leaves_the_root_logger_alone():
    """opacus' import-time basicConfig would print every Flower log line twice in app processes."""
    import subprocess
    import sys

    code = (
        "import logging, hmgdm_core.privacy.accountant, hmgdm_core.privacy.dpsgd, opacus;"
        "print(len(logging.getLogger().handlers))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"

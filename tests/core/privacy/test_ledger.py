"""The site's privacy ledger: opacus-exact epsilon, atomic JSON, fixed settings, budget stop."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from hmgdm_core.privacy.accountant import epsilon
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted, PrivacyError
from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger

CFG = LocalDP(noise_multiplier=1.2, clip_norm=0.5, patients_per_step=5)


def test_ledger_epsilon_equals_opacus_after_rounds_and_survives_reload(tmp_path):
    path = tmp_path / LEDGER_NAME
    reference = RDPAccountant()
    for rnd, (patients, steps) in enumerate([(50, 30), (50, 20), (100, 25)], start=1):
        ledger = PrivacyLedger.open(path, CFG, num_patients=patients)
        ledger.record(rnd, steps, patients=patients).save(path)
        for _ in range(steps):
            reference.step(noise_multiplier=1.2, sample_rate=5 / patients)
    ledger = PrivacyLedger.load(path)
    assert ledger.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), abs=1e-6)
    blob = json.loads(path.read_text())
    assert blob["steps"] == 75 and blob["rounds"] == 3 and blob["unit"] == "patient"
    assert [e["sample_rate"] for e in blob["history"]] == [0.1, 0.1, 0.05]
    assert blob["clip_norm"] == 0.5 and blob["mechanism"] == "local_dp"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_NAME]  # no temp files left


def test_budget_stops_at_the_first_round_that_would_exceed_it(tmp_path):
    path, steps = tmp_path / LEDGER_NAME, 40
    after = [epsilon([(1.2, 0.1, steps * r)], delta=1e-5) for r in (1, 2, 3, 4)]
    cfg = CFG.model_copy(update={"max_epsilon": (after[2] + after[3]) / 2})
    trained = []
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon") as err:
        for rnd in range(1, 10):
            ledger = PrivacyLedger.open(path, cfg, num_patients=50)
            ledger.check_budget(steps)
            ledger.record(rnd, steps, patients=50).save(path)
            trained.append(rnd)
    assert trained == [1, 2, 3]
    assert err.value.spent == pytest.approx(after[2]) and err.value.projected == pytest.approx(
        after[3]
    )
    assert PrivacyLedger.load(path).rounds == 3
    PrivacyLedger.open(path, CFG, num_patients=50).check_budget(steps)  # no max set: never refused


def test_changing_delta_or_accountant_of_an_existing_ledger_is_refused(tmp_path):
    path = tmp_path / LEDGER_NAME
    PrivacyLedger.open(path, CFG, num_patients=10).record(1, 5, patients=10).save(path)
    for change in ({"delta": 1e-6}, {"accountant": "prv"}):
        with pytest.raises(PrivacyError, match=next(iter(change))):
            PrivacyLedger.open(path, CFG.model_copy(update=change), num_patients=10)


def test_corrupt_or_missing_ledger_is_a_privacy_error(tmp_path):
    with pytest.raises(PrivacyError, match="no privacy ledger"):
        PrivacyLedger.load(tmp_path / LEDGER_NAME)
    (tmp_path / LEDGER_NAME).write_text('{"format": "something else"}')
    with pytest.raises(PrivacyError, match="not a readable privacy ledger"):
        PrivacyLedger.load(tmp_path / LEDGER_NAME)

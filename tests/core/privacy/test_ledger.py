"""The site's privacy ledger: opacus-exact epsilon, atomic JSON, fixed settings, budget stop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from hmgdm_core.privacy.accountant import epsilon
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted, PrivacyError
from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger, spend

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


def test_a_round_is_in_the_ledger_before_it_trains_and_leaves_it_if_training_fails(tmp_path):
    path = tmp_path / LEDGER_NAME
    with spend(path, CFG, num_patients=50, server_round=1, steps=30) as ledger:
        assert PrivacyLedger.load(path).rounds == 1 == ledger.rounds  # before any step
    failing = spend(path, CFG, num_patients=50, server_round=2, steps=30)
    with pytest.raises(RuntimeError, match="out of memory"), failing:
        assert PrivacyLedger.load(path).rounds == 2
        raise RuntimeError("out of memory")
    assert [e.round for e in PrivacyLedger.load(path).history] == [1]


# Each process: wait for the start signal, then spend one round that "trains" for a second.
RACER = """
import sys, time
from pathlib import Path
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted
from hmgdm_core.privacy.ledger import spend

ledger, go = Path(sys.argv[1]), Path(sys.argv[2])
cfg = LocalDP.model_validate_json(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
try:
    with spend(ledger, cfg, num_patients=50, server_round=1, steps=40):
        time.sleep(1.0)
    print("trained")
except PrivacyBudgetExhausted:
    print("refused")
"""


@pytest.mark.integration
def test_two_processes_sharing_a_ledger_cannot_both_spend_the_last_budget(tmp_path):
    path, go = tmp_path / LEDGER_NAME, tmp_path / "go"
    one, two = (epsilon([(1.2, 0.1, 40 * r)], delta=1e-5) for r in (1, 2))
    cfg = CFG.model_copy(update={"max_epsilon": (one + two) / 2})  # room for one round only
    cmd = [sys.executable, "-c", RACER, str(path), str(go), cfg.model_dump_json()]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        go.touch()
        outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert outcomes == ["refused", "trained"]
    ledger = PrivacyLedger.load(path)
    assert ledger.rounds == 1 and ledger.epsilon == pytest.approx(one)

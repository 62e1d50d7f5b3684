"""A site's `privacy_ledger.json`: what it released under local DP, epsilon spent so far, budget.

A round is written to the ledger (atomically, fsynced) before its training starts, under an
exclusive lock that is held until the round ends, and taken back out only when training failed
(then nothing of it left the site). Two processes sharing a ledger (two SuperNodes on one state
directory) therefore take turns and can never both spend the same remaining budget; a crash can
over-count spent epsilon but never under-count it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hmgdm_core.atomic import write_json
from hmgdm_core.privacy.accountant import Mechanism, PrivacyAccountant
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.errors import PrivacyError

log = logging.getLogger(__name__)

LEDGER_NAME = "privacy_ledger.json"
FORMAT = "hmgdm-privacy-ledger/1"
# Changing any of these mid-ledger would make the spent epsilon meaningless or hide spending.
_FIXED = ("mechanism", "unit", "accountant", "delta")


@dataclasses.dataclass(frozen=True)
class RoundEntry:
    """One training round: its DP-SGD parameters and the cumulative epsilon after it."""

    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    patients: int
    epsilon: float
    recorded: str


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
    """Cumulative local-DP spending of one site; `noise_multiplier`/`sample_rate` are current."""

    accountant: str
    delta: float
    max_epsilon: float | None
    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    history: tuple[RoundEntry, ...] = ()
    mechanism: str = "local_dp"
    unit: str = "patient"

    @classmethod
    def open(cls, path: Path | str, cfg: LocalDP, *, num_patients: int) -> PrivacyLedger:
        """The ledger at `path` with the current settings of `cfg` (a new one when missing)."""
        fresh = cls(
            accountant=cfg.accountant,
            delta=cfg.delta,
            max_epsilon=cfg.max_epsilon,
            clip_norm=cfg.clip_norm,
            noise_multiplier=cfg.noise_multiplier,
            sample_rate=cfg.rate_for(num_patients),
        )
        path = Path(path)
        if not path.exists():
            return fresh
        stored = cls.load(path)
        for key in _FIXED:
            if getattr(stored, key) != getattr(fresh, key):
                raise PrivacyError(
                    f"{path}: {key} is {getattr(stored, key)!r} in the ledger but "
                    f"{getattr(fresh, key)!r} in [local_dp]; keep it, or move the ledger aside "
                    "only if this site's data has never been used under it"
                )
        return dataclasses.replace(fresh, history=stored.history)

    @classmethod
    def load(cls, path: Path | str) -> PrivacyLedger:
        path = Path(path)
        try:
            blob = json.loads(path.read_text())
            if blob.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            fields = {f.name for f in dataclasses.fields(cls)}
            history = tuple(RoundEntry(**entry) for entry in blob["history"])
            return cls(
                **{k: v for k, v in blob.items() if k in fields and k != "history"}, history=history
            )
        except FileNotFoundError:
            raise PrivacyError(
                f"{path}: no privacy ledger; this site has not trained under DP"
            ) from None
        except (ValueError, TypeError, KeyError) as err:
            raise PrivacyError(
                f"{path}: not a readable privacy ledger ({err}); restore it from a "
                "backup, never delete it"
            ) from None

    @property
    def dp_sgd(self) -> Mechanism:
        """The DP-SGD mechanism of the next round: what the DP step reads, nothing else."""
        return Mechanism(self.noise_multiplier, self.clip_norm, self.sample_rate)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.history)

    @property
    def rounds(self) -> int:
        return len(self.history)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at `delta` (0 before the first round)."""
        return self.history[-1].epsilon if self.history else 0.0

    def privacy_accountant(self) -> PrivacyAccountant:
        """The rounds so far as the one accountant of site and central DP."""
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.history]
        return PrivacyAccountant(
            delta=self.delta, max_epsilon=self.max_epsilon, accountant=self.accountant,
            history=history, setting="[local_dp] max_epsilon",
        )  # fmt: skip

    def projected_epsilon(self, next_round_steps: int) -> float:
        """Epsilon after `next_round_steps` more steps at the current noise and rate."""
        return self.privacy_accountant().projected_epsilon(self.dp_sgd, next_round_steps)

    def check_budget(self, next_round_steps: int) -> None:
        """Raise PrivacyBudgetExhausted when the next round would exceed `max_epsilon`."""
        self.privacy_accountant().check_budget(self.dp_sgd, next_round_steps)

    def record(self, server_round: int, steps: int, *, patients: int) -> PrivacyLedger:
        """A new ledger with one more round at the current settings."""
        entry = RoundEntry(
            round=server_round,
            steps=steps,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            patients=patients,
            epsilon=self.projected_epsilon(steps),
            recorded=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return dataclasses.replace(self, history=(*self.history, entry))

    def to_dict(self) -> dict[str, Any]:
        blob = dataclasses.asdict(self)
        return {
            "format": FORMAT,
            **blob,
            "steps": self.steps,
            "rounds": self.rounds,
            "epsilon": self.epsilon,
        }

    def save(self, path: Path | str) -> Path:
        """Write the ledger atomically (readers see the old or the new file, never half)."""
        return write_json(path, self.to_dict())


@contextlib.contextmanager
def spend(
    path: Path | str, cfg: LocalDP, *, num_patients: int, server_round: int, steps: int
) -> Iterator[PrivacyLedger]:
    """Reserve one round of `steps` DP-SGD steps: lock the ledger, refuse the round if it would
    pass `max_epsilon` (PrivacyBudgetExhausted), record it and save, then yield the ledger for
    the training. If the training raises, the round is removed again; the lock is released
    when the block ends."""
    path = Path(path)
    with _locked(path):
        before = PrivacyLedger.open(path, cfg, num_patients=num_patients)
        before.check_budget(steps)
        ledger = before.record(server_round, steps, patients=num_patients)
        ledger.save(path)
        try:
            yield ledger
        except BaseException:
            before.save(path)  # the round never trained: nothing of it can have left the site
            raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (its `.lock` file beside it) across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "%s is in use by another process (two SuperNodes sharing a state directory?); "
                "waiting for its round to end",
                path,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

"""Typed privacy errors: an incompatible model or setting, and an exhausted privacy budget."""

from __future__ import annotations

from hmgdm_core.exceptions import HmgdmError


class PrivacyError(HmgdmError):
    """A privacy setting, model or ledger cannot give the guarantee that was asked for."""


class PrivacyBudgetExhausted(PrivacyError):
    """Training the next round would spend more epsilon than the site's `max_epsilon` allows."""

    def __init__(
        self,
        *,
        spent: float,
        projected: float,
        max_epsilon: float,
        delta: float,
        setting: str = "max_epsilon",
    ) -> None:
        super().__init__(
            f"privacy budget exhausted: epsilon spent {spent:.4f}, the next round would reach "
            f"{projected:.4f} > max_epsilon {max_epsilon:g} (delta {delta:g}); this site stops "
            f"training; raise {setting} only if your data-protection officer agrees"
        )
        self.spent, self.projected = spent, projected
        self.max_epsilon, self.delta = max_epsilon, delta

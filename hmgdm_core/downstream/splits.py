"""Patient-grouped, stratified, seeded k-fold splits (one or several fold assignments): no
patient is ever on both sides."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from hmgdm_core.exceptions import LabelError

Fold = tuple[np.ndarray, np.ndarray]


def patient_folds(
    strata: ArrayLike, groups: ArrayLike, n_folds: int = 5, seed: int = 0
) -> list[Fold]:
    """(train, test) row indices of a k-fold grouped by patient and stratified on `strata`.

    `strata` is the class per row (classification) or the event indicator (survival); `groups`
    the patient (or LC25000 `group_id`) per row.
    """
    strata, groups = np.asarray(strata), np.asarray(groups)
    if strata.shape != groups.shape or strata.ndim != 1:
        raise ValueError(f"strata {strata.shape} and groups {groups.shape}: need equal 1-D shapes")
    # Imported here: the ClientApp imports this module on every Flower message (one process
    # each), and scikit-learn would add about a second to each of them.
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise LabelError(f"only {n_groups} patients, fewer than {n_folds} folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(strata)), strata, groups))


class RepeatedFold(NamedTuple):
    """One fold of one of several fold assignments: its train and test rows."""

    repeat: int  # which assignment (seeded `seed + repeat`)
    fold: int
    train: np.ndarray
    test: np.ndarray


def repeated_patient_folds(
    strata: ArrayLike, groups: ArrayLike, n_folds: int = 5, seed: int = 0, repeats: int = 1
) -> list[RepeatedFold]:
    """Every fold of `repeats` `patient_folds` assignments seeded `seed`, `seed + 1`, ..., in
    order: one assignment alone moved a probe's LC25000 accuracy 2-5 points, enough to flip a
    ranking, so comparisons average over several."""
    return [
        RepeatedFold(r, k, train, test)
        for r in range(repeats)
        for k, (train, test) in enumerate(patient_folds(strata, groups, n_folds, seed + r))
    ]

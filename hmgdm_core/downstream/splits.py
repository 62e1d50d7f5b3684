"""Patient-grouped, stratified, seeded k-fold splits: no patient is ever on both sides."""

from __future__ import annotations

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

"""Statistical disclosure control at a site: the fewest patients any released aggregate may
describe (small-cell rule), how finely survival times may be binned, how many statistics queries
a run may ask, and how far a new risk-group split must be from those already released.

The site sets this in its own `[disclosure]` section; the server cannot change it. Pure checks
plus `ReleaseLog`, the site's record of what it has released (a JSON file in its state dir).
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import Field

from hmgdm_core.atomic import write_json
from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.section import Section

LOG_NAME = "disclosure_log.json"
FORMAT = "hmgdm-disclosure-log/1"


class DisclosureConfig(Section):
    """What statistics about a site's patients may say; owned by the site.

    A deployed site takes it from its own TOML (`hmgdm-client join --privacy-config FILE`), or
    these defaults without one; never from the run config the server sends. Simulated sites
    (the operator's own partitions) use the run config's.
    """

    min_patients: int = Field(
        10, ge=1, description="fewest patients behind any released aggregate (small-cell rule)"
    )
    min_bin_width: float = Field(
        1.0,
        gt=0,
        description="narrowest life-table time bin, in the clinical table's unit (TCGA: months); "
        "a requested width must be a whole multiple of it",
    )
    max_bins: int = Field(600, ge=1, le=100_000, description="most time bins per life table")
    max_queries_per_run: int = Field(
        2, ge=1, description="answers per run to each statistics query (moments, Cox evaluation)"
    )
    max_newton_steps: int = Field(
        60, ge=1, description="Cox gradient/Hessian queries answered per run"
    )
    max_evaluations_per_run: int = Field(
        1000, ge=1, description="evaluation queries (held-out loss or metrics) answered per run"
    )
    max_splits: int = Field(
        2,
        ge=1,
        description="distinct risk-group splits of one clinical table ever released as life "
        "tables; with two, no combination of releases isolates fewer than min_patients",
    )


class DisclosureRefused(PrivacyError):
    """A query would release an aggregate the site's disclosure policy does not allow."""


def require_patients(count: int, what: str, policy: DisclosureConfig) -> None:
    """Refuse an aggregate over fewer than `min_patients` patients."""
    if count < policy.min_patients:
        raise DisclosureRefused(
            f"{what} would describe {count} patient(s); this site's [disclosure] min_patients "
            f"is {policy.min_patients}"
        )


def bin_count(bin_width: float, max_time: float, policy: DisclosureConfig) -> int:
    """How many life-table bins of `bin_width` cover (0, max_time], checked before any is built.

    A width must be finite, a whole multiple of `min_bin_width` (so that tables of several
    widths never combine into finer bins) and give at most `max_bins` bins.
    """
    if not math.isfinite(bin_width) or bin_width <= 0:
        raise DisclosureRefused(f"time-bin width {bin_width!r} is not a positive number")
    multiple = bin_width / policy.min_bin_width
    if multiple < 1 - 1e-9 or abs(multiple - round(multiple)) > 1e-6 * multiple:
        raise DisclosureRefused(
            f"time-bin width {bin_width:g} is not a whole multiple of this site's "
            f"[disclosure] min_bin_width {policy.min_bin_width:g}"
        )
    bins = time_bins(max_time, bin_width)
    if bins > policy.max_bins:
        raise DisclosureRefused(
            f"time-bin width {bin_width:g} needs {bins} bins; [disclosure] max_bins is "
            f"{policy.max_bins}"
        )
    return bins


def time_bins(max_time: float, bin_width: float) -> int:
    """Bins of `bin_width` that cover (0, max_time] (at least one)."""
    return max(1, math.ceil(max_time / bin_width)) if max_time > 0 else 1


def check_split(high: np.ndarray, earlier: list[np.ndarray], policy: DisclosureConfig) -> bool:
    """Whether life tables of the split `high` (bool per patient) may be released, given the
    splits of the same table released before. Returns True for a repeat (nothing new).

    Each group must be empty or hold `min_patients`; so must every cell of the new split
    crossed with each earlier one (else subtracting two releases isolates those few patients,
    e.g. by shifting the risk threshold past one patient); and at most `max_splits` distinct
    splits are ever released (with more, sums of releases can isolate a patient again).
    """
    k = policy.min_patients

    def cells(*sizes: int) -> list[int]:  # the non-empty ones below k
        return [int(s) for s in sizes if 0 < s < k]

    if small := cells(high.sum(), (~high).sum()):
        raise DisclosureRefused(f"a risk group of {small[0]} patient(s) (< {k})")
    for old in earlier:
        if np.array_equal(old, high) or np.array_equal(old, ~high):
            return True
    if len(earlier) >= policy.max_splits:
        raise DisclosureRefused(
            f"{len(earlier)} risk-group splits of this table released already "
            f"([disclosure] max_splits)"
        )
    for old in earlier:
        if small := cells(*(np.sum(a & b) for a in (high, ~high) for b in (old, ~old))):
            raise DisclosureRefused(
                f"this split differs from an earlier one by {small[0]} patient(s) (< {k})"
            )
    return False


class ReleaseLog:
    """What a site has answered: queries per run and kind, and the life-table splits of each
    clinical table. One JSON file in the site's state dir, locked while it is read and updated
    (several SuperNodes may share a state dir), rewritten atomically before a reply leaves."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @contextmanager
    def _open(self) -> Iterator[dict]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = {"format": FORMAT, "runs": {}, "splits": {}}
            if self.path.exists():
                data = json.loads(self.path.read_text())
                if data.get("format") != FORMAT:
                    raise PrivacyError(f"{self.path}: not an hmgdm disclosure log")
            yield data
            write_json(self.path, data)

    def count(self, run: str, kind: str, limit: int) -> int:
        """Record one more `kind` query of `run`; refuse (and record nothing) past `limit`."""
        with self._open() as data:
            counts = data["runs"].setdefault(str(run), {})
            if counts.get(kind, 0) >= limit:
                raise DisclosureRefused(
                    f"run {run} asked for {kind} more than {limit} time(s) ([disclosure] limit)"
                )
            counts[kind] = counts.get(kind, 0) + 1
            return counts[kind]

    def release_split(self, table: str, high: np.ndarray, policy: DisclosureConfig) -> None:
        """Refuse a split of `table` that `check_split` does not allow; record a new one."""
        with self._open() as data:
            splits = data["splits"].setdefault(table, [])
            earlier = [_unpack(s, len(high)) for s in splits]
            if not check_split(high, earlier, policy):
                splits.append(np.packbits(high).tobytes().hex())


def _unpack(hex_bits: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_bits), dtype=np.uint8))[:n].astype(bool)

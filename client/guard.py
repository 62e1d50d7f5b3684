"""What a site checks before it answers the server: every value the server sent (run keys by
pattern, choices and numbers within bounds, arrays of the right shape, the run's config within
this site's limits, no simulation-only keys at a deployed site), and its disclosure policy with
its release log (`Guard`; the policy is the site's own, `client.site.Site.disclosure`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from client.records import SIM_GRAPHS_DIR, SIM_SITES, unpack_config
from hmgdm_core.exceptions import HmgdmError
from hmgdm_core.federation_config import Stage
from hmgdm_core.privacy.disclosure import DisclosureConfig, ReleaseLog, require_patients

if TYPE_CHECKING:
    from flwr.app import ConfigRecord

    from hmgdm_core.config import HmgdmConfig

# A run key names the site's private checkpoint file: no separators, no dots.
RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class RefusedRequest(HmgdmError):
    """A value the server sent is malformed, out of bounds, or not allowed at a real site."""


def run_key(value: object) -> str:
    """The server's run key, which names a file in the site's state dir, checked by pattern."""
    key = str(value)
    if not RUN_KEY.fullmatch(key):
        raise RefusedRequest(f"run key {key[:80]!r} does not match {RUN_KEY.pattern}")
    return key


def choice(value: object, allowed: tuple[str, ...], what: str) -> str:
    if str(value) not in allowed:
        raise RefusedRequest(f"{what} {str(value)[:80]!r} is not one of {allowed}")
    return str(value)


def bounded(value: object, what: str, low: float, high: float) -> float:
    """A finite number in [low, high] (bools and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RefusedRequest(f"{what} is not a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise RefusedRequest(f"{what} {value!r} is outside [{low:g}, {high:g}]")
    return float(value)


def finite_vector(value: np.ndarray, what: str, size: int, *, positive: bool = False) -> np.ndarray:
    """A server-sent array of shape (size,), all finite (and > 0 when `positive`)."""
    if value.shape != (size,) or not np.isfinite(value).all():
        raise RefusedRequest(f"{what} must be {size} finite numbers, got shape {value.shape}")
    if positive and not (value > 0).all():
        raise RefusedRequest(f"{what} must be positive")
    return value


# The most a server may ask of a site's machine per message (config key -> largest value).
LIMITS = {
    "federation.local_epochs": 1000,
    "federation.local_steps": 100_000,
    "train.batch_size": 4096,
    "train.max_nodes": 100_000,
    "model.hidden": 4096,
    "model.ae_hidden": 4096,
    "model.latent_dim": 4096,
    "model.window_channels": 1024,
    "model.encoder_layers": 64,
    "model.self_attn_layers": 64,
    "model.heads": 64,
    "evaluation.fed_local_epochs": 1000,
    "evaluation.finetune.batch_slides": 4096,
    "evaluation.finetune.max_tiles": 4096,
    "evaluation.finetune.max_nodes": 100_000,
    "evaluation.finetune.hidden": 4096,
}


def request_config(record: ConfigRecord) -> HmgdmConfig:
    """The run's config as the server sent it: a valid HmgdmConfig within `LIMITS`."""
    from pydantic import ValidationError

    try:
        cfg = unpack_config(record)
    except (KeyError, ValueError, ValidationError) as err:
        raise RefusedRequest(f"the message's config is not a valid hmgdm config: {err}") from None
    for dotted, limit in LIMITS.items():
        value = functools.reduce(getattr, dotted.split("."), cfg)
        if value is not None and value > limit:
            raise RefusedRequest(f"{dotted} = {value} exceeds this site's limit {limit}")
    return cfg


def server_round(record: ConfigRecord) -> int:
    return int(bounded(record.get("server-round"), "server-round", 0, 1_000_000))


def request_stage(record: ConfigRecord) -> Stage:
    return choice(record.get("stage"), get_args(Stage), "stage")  # type: ignore[return-value]


def refuse_sim_keys(run_config: Mapping[str, Any]) -> None:
    """A deployed site refuses a run whose config sets simulation-only keys: they name the
    operator's data (paths, partitions, faults), never a real site's."""
    if keys := sorted(k for k in (SIM_SITES, SIM_GRAPHS_DIR) if run_config.get(k)):
        raise RefusedRequest(f"run-config keys {keys} are for simulated sites only")


@dataclass(frozen=True)
class Guard:
    """The disclosure checks of one message: the site's policy, the run asking and the site's
    release log (`client.site.Site.guard`)."""

    policy: DisclosureConfig
    run: str
    log: ReleaseLog

    def patients(self, count: int, what: str) -> None:
        require_patients(count, what, self.policy)

    def query(self, kind: str, limit: int | None = None) -> None:
        """Count one `kind` query of this run; refused past the limit (default: per run)."""
        self.log.count(self.run, kind, limit or self.policy.max_queries_per_run)

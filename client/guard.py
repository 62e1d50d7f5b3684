"""What a site checks before it answers the server: every value the server sent (run key,
sizes, arrays, simulation-only keys), and its disclosure policy and release log, which a
deployed site takes from its own file (never from the run config the server sends) and a
simulated site from the operator's run config.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np

from client.privacy import PRIVACY_CONFIG_KEY
from hmgdm_core.exceptions import HmgdmError
from hmgdm_core.federation_config import Stage
from hmgdm_core.privacy.disclosure import (
    LOG_NAME,
    DisclosureConfig,
    ReleaseLog,
    require_patients,
)

if TYPE_CHECKING:
    from flwr.app import ConfigRecord, Context

    from hmgdm_core.config import HmgdmConfig

STATE_KEY = "state-dir"
SIM_STATE_DIR = "sim-state-dir"  # run config: where simulated sites keep their state
SIM_PREFIX = "sim-"  # run-config keys only simulated sites (the operator's own) may read
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
    "evaluation.finetune_batch_slides": 4096,
    "evaluation.finetune_max_tiles": 4096,
    "evaluation.finetune_max_nodes": 100_000,
    "evaluation.finetune_hidden": 4096,
}


def request_config(record: ConfigRecord) -> HmgdmConfig:
    """The run's config as the server sent it: a valid HmgdmConfig within `LIMITS`."""
    from pydantic import ValidationError

    from client.records import unpack_config

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


def sim_value(context: Context, key: str) -> str:
    """A simulation-only run-config value; refused at a real site, whose data the server must
    never point at (paths, partitions, faults)."""
    if not key.startswith(SIM_PREFIX):
        raise ValueError(f"{key} is not a simulation-only key")
    value = str(context.run_config.get(key, "") or "")
    if value and deployed(context):
        raise RefusedRequest(f"run-config key {key!r} is for simulated sites only")
    return value


def refuse_sim_keys(context: Context) -> None:
    """A real site refuses a run whose config sets any simulation-only key."""
    if deployed(context):
        keys = sorted(k for k, v in context.run_config.items() if k.startswith(SIM_PREFIX) and v)
        if keys:
            raise RefusedRequest(f"run-config keys {keys} are for simulated sites only")


def deployed(context: Context) -> bool:
    """A real SuperNode: only Flower's simulation engine gives a node a partition id (a node's
    config is its own; the server cannot set it)."""
    return "partition-id" not in context.node_config


def site_state_dir(context: Context) -> Path:
    """This site's private state: checkpoints, privacy ledger, release log."""
    if deployed(context):
        if STATE_KEY not in context.node_config:
            raise HmgdmError("this SuperNode has no 'state-dir'; start it with `hmgdm-client join`")
        return Path(str(context.node_config[STATE_KEY]))
    pid = int(context.node_config["partition-id"])
    return Path(sim_value(context, SIM_STATE_DIR) or "sim_sites") / f"site-{pid}"


def site_disclosure(context: Context) -> DisclosureConfig:
    """The [disclosure] this site answers under."""
    from hmgdm_core.config import load_config, parse_config_text

    if deployed(context):
        path = context.node_config.get(PRIVACY_CONFIG_KEY)
        return load_config(Path(str(path))).disclosure if path else DisclosureConfig()
    text = str(context.run_config.get("config-toml", ""))
    return parse_config_text(text, "run config 'config-toml'").disclosure


@dataclass(frozen=True)
class Guard:
    """The checks of one message: the policy, the run it belongs to and the site's log."""

    policy: DisclosureConfig
    run: str
    log: ReleaseLog

    @classmethod
    def from_context(cls, context: Context) -> Guard:
        log = ReleaseLog(site_state_dir(context) / LOG_NAME)
        return cls(site_disclosure(context), str(context.run_id), log)

    def patients(self, count: int, what: str) -> None:
        require_patients(count, what, self.policy)

    def query(self, kind: str, limit: int | None = None) -> None:
        """Count one `kind` query of this run; refused past the limit (default: per run)."""
        self.log.count(self.run, kind, limit or self.policy.max_queries_per_run)

"""The run config a run is submitted with, typed once: one model per run mode (`mode` picks it).

The important knobs are flat Flower keys (`FLAT_KEYS`) a Flower user overrides with
`flwr run . --run-config 'stage2-rounds=20'`; the rest of the hmgdm config comes from a TOML file
(`config-file`, relative to the app) or, from `hmgdm-server`, as JSON (`config`). A flat key left
at its default (pyproject.toml's [tool.flwr.app.config] holds the config's own defaults) does
not override that config.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from client.records import SIM_SITES, SimulatedSites
from hmgdm_core.config import HmgdmConfig, load_config, parse_section, with_overrides
from hmgdm_core.exceptions import ConfigError

APP_ROOT = Path(__file__).resolve().parents[1]

# Flat run config key -> the HmgdmConfig field it sets.
FLAT_KEYS = {
    "stage1-rounds": "federation.stage1_rounds",
    "stage2-rounds": "federation.stage2_rounds",
    "min-sites": "federation.min_sites",
    "min-replies": "federation.min_replies",
    "strategy": "federation.strategy",
    "local-epochs": "federation.local_epochs",
    "finetune-rounds": "evaluation.fed_rounds",
    "lr": "train.lr",
    "batch-size": "train.batch_size",
    "seed": "train.seed",
    "privacy-mode": "privacy.mode",
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Run(BaseModel):
    """What every run mode reads: its hmgdm config, where it writes, its simulated sites."""

    # Flower's run config holds every mode's keys (their defaults from pyproject.toml).
    model_config = ConfigDict(
        extra="ignore", frozen=True, alias_generator=_kebab, populate_by_name=True
    )

    cfg: HmgdmConfig
    run_dir: Path
    sim: SimulatedSites | None = None


class PretrainRun(_Run):
    """Federated pretraining: stage-1 then stage-2 rounds (server/pretraining.py)."""

    mode: Literal["pretrain"] = "pretrain"
    resume: bool = False


class DownstreamRun(_Run):
    """Federated fine-tuning and evaluation of a pretrained checkpoint (server/downstream.py)."""

    mode: Literal["downstream"]
    checkpoint: Path
    task: Literal["classification", "survival"]
    classes: tuple[str, ...] = ()

    @field_validator("classes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return tuple(c for c in value.split(",") if c) if isinstance(value, str) else value

    @field_validator("classes")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any("," in c or not c for c in value):
            raise ValueError(f"class names must be non-empty without commas: {list(value)}")
        return value


class SurvivalRun(_Run):
    """Federated Cox on the sites' clinical tables (server/cox.py)."""

    mode: Literal["survival-clinical"]
    km_bin_width: float = Field(1.0, gt=0)


RunConfig = Annotated[PretrainRun | DownstreamRun | SurvivalRun, Field(discriminator="mode")]
_RUN = TypeAdapter(RunConfig)


@functools.cache
def flat_defaults() -> dict[str, Any]:
    """Each flat key's default: the config's own (pyproject.toml declares the same values)."""
    defaults = HmgdmConfig()
    out = {}
    for key, dotted in FLAT_KEYS.items():
        section, name = dotted.split(".")
        out[key] = getattr(getattr(defaults, section), name)
    return out


def hmgdm_config(run_config: Mapping[str, Any]) -> HmgdmConfig:
    """The run's HmgdmConfig: `config` (JSON), or `config-file` (TOML), or the defaults; then
    every flat key that differs from its default (the config's own)."""
    text, file = str(run_config.get("config", "")), str(run_config.get("config-file", ""))
    if text and file:
        raise ConfigError("the run config sets both 'config' and 'config-file'; pass one")
    defaults = flat_defaults()
    flat = {
        field: run_config[key]
        for key, field in FLAT_KEYS.items()
        if key in run_config and run_config[key] != defaults.get(key)
    }
    if not text:
        return load_config(APP_ROOT / file if file else None, flat)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"run config 'config' is not valid JSON: {err}") from None
    return parse_section(HmgdmConfig, with_overrides(data, flat), "run config 'config'")


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The typed run of `run_config` (Flower's Context.run_config); a one-line ConfigError
    naming the bad key otherwise."""
    cfg = hmgdm_config(run_config)
    data = {
        **run_config,
        "mode": run_config.get("mode") or "pretrain",
        "cfg": cfg,
        "run-dir": run_config.get("run-dir") or cfg.federation.run_dir,
        "sim": SimulatedSites.from_run_config(run_config),
    }
    try:
        return _RUN.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"][1:]) or "mode"
        raise ConfigError(f"run config: invalid value for '{key}': {first['msg']}") from None


def submission(
    cfg: HmgdmConfig, *, sim: SimulatedSites | None = None, **fields: Any
) -> dict[str, Any]:
    """The run config `hmgdm-server` submits: the whole config as JSON, the mode's own keys
    (`run_dir=...`, `mode="downstream"`, ...) by their Flower names, simulated sites if any."""
    out = {"config": cfg.model_dump_json(), **{_kebab(k): _flower(v) for k, v in fields.items()}}
    if sim is not None:
        out[SIM_SITES] = sim.model_dump_json()
    return out


def _flower(value: Any) -> Any:
    """A value as a Flower run config holds it (str, int, float, bool)."""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value) if isinstance(value, Path) else value

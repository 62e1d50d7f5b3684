"""The wire format, written once for both sides: every message name and record key, model
state as ArrayRecords, scalar results as MetricRecords, the run's HmgdmConfig as a ConfigRecord
string (JSON), and what simulated sites read from the run config (`SimulatedSites`, JSON).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from pydantic import Field, field_validator

from hmgdm_core.config import HmgdmConfig, parse_section
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.disclosure import DisclosureConfig
from hmgdm_core.section import Section

NUM_EXAMPLES = "num-examples"  # the weight FedAvg-style strategies read from each reply
SHARED = "arrays"  # parameters the strategy averages (the strategies' default key)
FROZEN = "frozen"  # global parameters a site must use this round but does not send back
CONFIG_KEY = "hmgdm-config"
PACKED = "packed:"  # an ArrayRecord key holding several tensors: "packed:" + [[name, shape], ...]
# SecAgg+ rounds carry unnamed legacy arrays: the names (shared, then frozen) travel in the config.
SECAGG_NAMES = "secagg-names"  # JSON list of all array names, in order
SECAGG_NUM_SHARED = "secagg-num-shared"  # how many of them (first) are trained and summed
# Pretraining's first message: input sizes and feature moments (routed to @app.query("stats")).
QUERY_STATS = "query.stats"
# Downstream messages (routed to @app.query("entity_moments"), @app.train("finetune") and
# @app.evaluate("downstream")).
QUERY_ENTITY_MOMENTS = "query.entity_moments"
TRAIN_FINETUNE = "train.finetune"
EVALUATE_DOWNSTREAM = "evaluate.downstream"
# Federated Cox on clinical tables (@app.query("cox")): config `phase`, arrays in COX_ARRAYS.
QUERY_COX = "query.cox"
COX_ARRAYS = "cox"
# Run config keys: what the virtual sites of a simulation read instead of a node config (JSON),
# and its one flat knob for a Flower user: the graph cache they split.
SIM_SITES, SIM_GRAPHS_DIR = "sim", "sim-graphs-dir"
Fault = Literal["nan", "shape", "huge", "liar", "stats"]


class SimulatedSites(Section):
    """What the virtual sites of a simulation read (run config `sim`, JSON): the operator who
    simulates holds every site's data. A deployed site never reads it (it has a node config)."""

    graphs_dir: Path | None = Field(None, description="one graph cache split among the sites")
    state_dir: Path = Field(Path("sim_sites"), description="site-K/ holds virtual site K's state")
    labels: Path | None = Field(None, description="one labels CSV; each site uses its own slides")
    labels_id_column: str = "slide_id"
    labels_patient_column: str = "patient_id"
    clinical_dir: Path | None = Field(None, description="site-K.csv: virtual site K's table")
    names: tuple[str, ...] = Field((), description="site names in reports, by partition id")
    faults: dict[int, Fault] = Field(
        {}, description='partition -> corrupted train replies, or a spec "1:liar,2:nan,3:shape"'
    )
    local_dp: LocalDP | None = Field(None, description="every virtual site's own [local_dp]")
    disclosure: DisclosureConfig = Field(
        DisclosureConfig(), description="every virtual site's own [disclosure]"
    )

    @field_validator("faults", mode="before")
    @classmethod
    def _parse_faults(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        out: dict[int, str] = {}
        for item in filter(None, (s.strip() for s in value.split(","))):
            pid, _, kind = item.partition(":")
            if not pid.isdigit() or kind not in Fault.__args__:
                raise ValueError(f"'{item}' is not PARTITION:{'|'.join(Fault.__args__)}")
            out[int(pid)] = kind
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SimulatedSites | None:
        """The run's simulated sites, or None when the run config has none (a deployment)."""
        text = str(run_config.get(SIM_SITES, "") or "")
        graphs = str(run_config.get(SIM_GRAPHS_DIR, "") or "")
        if not (text or graphs):
            return None
        sim = _simulated_sites(text or "{}")
        return sim.model_copy(update={"graphs_dir": Path(graphs)}) if graphs else sim


@functools.lru_cache(maxsize=4)
def _simulated_sites(text: str) -> SimulatedSites:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"run config '{SIM_SITES}' is not valid JSON: {err}") from None
    return parse_section(SimulatedSites, data, f"run config '{SIM_SITES}'")


def pack_state(
    state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> ArrayRecord:
    """Tensors (all, or only `names`) as one contiguous Array per dtype, in a stable name order.

    Flower moves every Array as its own object, one request per hop (SuperLink, SuperNode,
    ClientApp and back), so a model of 60 tensors costs 60 round trips where one does. The key
    records each tensor's name and shape: the record describes itself, and a site that sends
    back the names it received produces the same key, so per-key checks compare like with like.
    """
    keys = list(state) if names is None else list(names)
    groups: dict[torch.dtype, list[str]] = {}
    for k in keys:
        groups.setdefault(state[k].dtype, []).append(k)
    record = {}
    for group in groups.values():
        layout = json.dumps([[k, list(state[k].shape)] for k in group], separators=(",", ":"))
        flat = torch.cat([state[k].detach().cpu().reshape(-1) for k in group])
        record[PACKED + layout] = Array(flat.contiguous().numpy())
    return ArrayRecord(record)


def _layout(key: str) -> list[tuple[str, list[int]]]:
    """(name, shape) of the tensors packed under `key`; a plain key is one unpacked tensor."""
    return [tuple(item) for item in json.loads(key[len(PACKED) :])] if is_packed(key) else []


def is_packed(key: str) -> bool:
    return key.startswith(PACKED)


def describe(key: str) -> str:
    """A record key as a person reads it: the tensor name, or how many tensors it packs."""
    return f"{len(_layout(key))} packed tensors" if is_packed(key) else f"'{key}'"


def record_layout(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each tensor a record carries, in order, without copying any data."""
    return [
        (name, tuple(shape))
        for key, array in record.items()
        for name, shape in (_layout(key) or [(key, array.shape)])
    ]


def record_names(record: ArrayRecord) -> list[str]:
    return [name for name, _ in record_layout(record)]


def unpack_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord (packed by `pack_state`, or one array per name) as CPU tensors by name."""
    state = {}
    for key, array in record.items():
        value = torch.from_numpy(array.numpy().copy())
        if not is_packed(key):
            state[key] = value
            continue
        layout = _layout(key)
        sizes = [math.prod(shape) for _, shape in layout]
        if value.ndim != 1 or value.numel() != sum(sizes):
            raise ValueError(
                f"{describe(key)}: {list(value.shape)} values for a layout of {sum(sizes)}"
            )
        for (name, shape), part in zip(layout, value.split(sizes), strict=True):
            state[name] = part.reshape(shape)
    return state


def pack_arrays(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Small named arrays (sums, counts, coefficients), one Array each: not model state."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def unpack_float64(record: ArrayRecord, *keys: str) -> list[np.ndarray]:
    """The named arrays of `record` as float64, in the order asked."""
    return [record[k].numpy().astype(np.float64) for k in keys]


def load_into(model: torch.nn.Module, *records: ArrayRecord) -> None:
    """Overwrite the named parameters/buffers of `model`; names the model lacks are an error."""
    state = {}
    for record in records:
        state.update(unpack_state(record))
    missing = set(state) - set(model.state_dict())
    if missing:
        raise ValueError(f"received arrays the model does not have: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)


def pack_metrics(metrics: Mapping[str, float], num_examples: int) -> MetricRecord:
    """Scalar results plus the aggregation weight; names use Flower's dash style."""
    record = MetricRecord({k.replace("_", "-"): float(v) for k, v in metrics.items()})
    record[NUM_EXAMPLES] = int(num_examples)
    return record


def pack_config(cfg: HmgdmConfig, **extra: int | float | str | bool) -> ConfigRecord:
    """The run's full config (JSON) so every site builds exactly the server's model."""
    return ConfigRecord({CONFIG_KEY: cfg.model_dump_json(), **extra})


def unpack_config(record: ConfigRecord) -> HmgdmConfig:
    """The run's config a message carries, parsed once per process (the mods and the handler
    of one message all read it)."""
    return _config(str(record[CONFIG_KEY]))


@functools.lru_cache(maxsize=4)
def _config(text: str) -> HmgdmConfig:
    return HmgdmConfig.model_validate_json(text)


def pack_task(kind: str, classes: Iterable[str]) -> dict[str, str]:
    """The downstream task as config entries: kind and the consortium's class names."""
    classes = list(classes)
    bad = [c for c in classes if "," in c or not c]
    if bad:
        raise ValueError(f"class names must be non-empty without commas: {bad}")
    return {"task": kind, "classes": ",".join(classes)}


def unpack_task(record: ConfigRecord) -> tuple[str, tuple[str, ...]]:
    return str(record["task"]), tuple(c for c in str(record.get("classes", "")).split(",") if c)

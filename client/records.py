"""Message <-> core translation, written once for both sides: model state as ArrayRecords,
scalar results as MetricRecords, the run's HmgdmConfig as a ConfigRecord string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from hmgdm_core.config import HmgdmConfig

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
    return HmgdmConfig.model_validate_json(str(record[CONFIG_KEY]))


def pack_task(kind: str, classes: Iterable[str]) -> dict[str, str]:
    """The downstream task as config entries: kind and the consortium's class names."""
    classes = list(classes)
    bad = [c for c in classes if "," in c or not c]
    if bad:
        raise ValueError(f"class names must be non-empty without commas: {bad}")
    return {"task": kind, "classes": ",".join(classes)}


def unpack_task(record: ConfigRecord) -> tuple[str, tuple[str, ...]]:
    return str(record["task"]), tuple(c for c in str(record.get("classes", "")).split(",") if c)

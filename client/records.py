"""Message <-> core translation, written once for both sides: model state as ArrayRecords,
scalar results as MetricRecords, the run's HmgdmConfig as a ConfigRecord string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from hmgdm_core.config import HmgdmConfig

NUM_EXAMPLES = "num-examples"  # the weight FedAvg-style strategies read from each reply
SHARED = "arrays"  # parameters the strategy averages (the strategies' default key)
FROZEN = "frozen"  # global parameters a site must use this round but does not send back
CONFIG_KEY = "hmgdm-config"
# SecAgg+ rounds carry unnamed legacy arrays: the names (shared, then frozen) travel in the config.
SECAGG_NAMES = "secagg-names"  # JSON list of all array names, in order
SECAGG_NUM_SHARED = "secagg-num-shared"  # how many of them (first) are trained and summed
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
    """Tensors (all, or only `names`) as an ArrayRecord, in a stable name order."""
    keys = list(state) if names is None else list(names)
    return ArrayRecord({k: Array(state[k].detach().cpu().contiguous().numpy()) for k in keys})


def unpack_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as CPU tensors keyed by parameter name."""
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


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

"""Checks of what a site sends besides training arrays (statistics, sums, counts, metrics)
before the server uses it: present, of the expected shape, finite, within range. A site is
another party: one NaN, wrong shape or absurd count must not reach a pooled figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from hmgdm_core.exceptions import HmgdmError


class InvalidReply(HmgdmError):
    """A site's reply is malformed: missing, wrong-shape, non-finite or out-of-range values."""


def metric(record: Mapping, key: str, *, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high] from a MetricRecord."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReply(f"metric {key!r} is missing or not a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidReply(f"metric {key!r} = {value!r} is outside [{low:g}, {high:g}]")
    return float(value)


def count(record: Mapping, key: str, high: float = math.inf) -> int:
    """A non-negative whole number from a MetricRecord."""
    value = metric(record, key, low=0, high=high)
    if value != int(value):
        raise InvalidReply(f"metric {key!r} = {value!r} is not a whole number")
    return int(value)


def array(
    record: ArrayRecord,
    key: str,
    shape: tuple[int | None, ...],
    *,
    nonnegative: bool = False,
    integer: bool = False,
) -> np.ndarray:
    """A finite array of `shape` (None: any length on that axis) from an ArrayRecord, as
    float64 (int64 when `integer`)."""
    if key not in record:
        raise InvalidReply(f"array {key!r} is missing")
    value = record[key].numpy()
    if value.ndim != len(shape) or any(
        s is not None and s != n for s, n in zip(shape, value.shape, strict=True)
    ):
        raise InvalidReply(f"array {key!r} has shape {list(value.shape)}, expected {list(shape)}")
    if value.dtype.kind not in "iuf":
        raise InvalidReply(f"array {key!r} is {value.dtype}, not numeric")
    value = value.astype(np.float64)
    if not np.isfinite(value).all():
        raise InvalidReply(f"array {key!r} holds NaN or Inf")
    if nonnegative and (value < 0).any():
        raise InvalidReply(f"array {key!r} holds negative values")
    if integer:
        if (value != np.round(value)).any():
            raise InvalidReply(f"array {key!r} holds fractions where counts belong")
        return value.astype(np.int64)
    return value


@dataclass(frozen=True)
class SiteStats:
    """A checked statistics reply: input sizes, feature moments and the site's graph count."""

    dims: dict[str, int]
    moments: dict[str, torch.Tensor]
    graphs: int


def site_stats(reply: Message) -> SiteStats:
    """The statistics reply of one site, checked: every input size a whole number, the graph
    count at least 1, each moment of the shape its sizes imply, finite, counts and sums of
    squares not negative."""
    from client.records import unpack_state
    from hmgdm_core.data import GraphDims

    content = reply.content
    if not {"dims", "moments", "metrics"} <= set(content.keys()):
        raise InvalidReply("a statistics reply needs dims, moments and metrics")
    fields = [f.name for f in dataclasses.fields(GraphDims)]
    if set(content["dims"]) != set(fields):
        raise InvalidReply(f"dims must be exactly {fields}")
    dims = {k: count(content["dims"], k, high=1e6) for k in fields}
    try:
        moments = unpack_state(content["moments"])
    except (ValueError, KeyError) as err:
        raise InvalidReply(f"moments cannot be read: {err}") from None
    width = {"x": dims["x_dim"], "e": dims["edge_dim"]}
    expected = {f"{p}_{k}" for p in width for k in ("count", "sum", "sumsq")}
    if not {"x_count", "x_sum", "x_sumsq"} <= set(moments) <= expected:
        raise InvalidReply(f"moments must be {sorted(expected)} (edge ones optional)")
    for name, value in moments.items():
        prefix, kind = name.split("_", 1)
        shape = () if kind == "count" else (width[prefix],)
        if tuple(value.shape) != shape or not torch.isfinite(value).all():
            raise InvalidReply(f"moment {name!r} is not {list(shape)} finite numbers")
        if kind != "sum" and (value < 0).any():
            raise InvalidReply(f"moment {name!r} is negative")
    return SiteStats(dims, moments, count(content["metrics"], "graphs", high=1e12))


def entity_moments(reply: Message, width: int) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """(entities, sum, sum of squares, labelled slides) of one site's entity-moments reply."""
    from client.records import unpack_state

    m = reply.content.metric_records.get("metrics", {})
    try:
        sums = unpack_state(reply.content["moments"])
    except (KeyError, ValueError) as err:
        raise InvalidReply(f"moments cannot be read: {err}") from None
    for name in ("total", "total_sq"):
        value = sums.get(name)
        if value is None or tuple(value.shape) != (width,) or not torch.isfinite(value).all():
            raise InvalidReply(f"{name!r} is not {width} finite numbers")
    if (sums["total_sq"] < 0).any():
        raise InvalidReply("a negative sum of squares")
    return count(m, "entities"), sums["total"], sums["total_sq"], count(m, "slides")


PAIR_KEYS = ("concordant", "discordant", "tied-risk", "comparable")


def downstream_metrics(reply: Message, task_kind: str) -> dict[str, float]:
    """One site's held-out figures: scores in [0, 1] for classification; for survival, pair
    counts that add up and at most as many events as patients."""
    m = dict(reply.content.metric_records.get("metrics", {}))
    n = count(m, "num-examples")
    if task_kind == "survival":
        pairs = [count(m, k) for k in PAIR_KEYS]
        if sum(pairs[:3]) != pairs[3] or pairs[3] > n * (n - 1) // 2:
            raise InvalidReply(f"pair counts {pairs} do not add up for {n} patients")
        count(m, "events", high=n)
        return m
    for key in set(m) - {"num-examples", "dp-weight"}:
        metric(m, key, low=0.0, high=1.0)
    return m

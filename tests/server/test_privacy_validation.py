"""Reply validation (NaN/Inf, names, shapes, dtypes, norm bound) and the start-time check."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from hmgdm_core.privacy.config import (
    UNIFORM_WEIGHT_KEY,
    CentralDP,
    PrivacyConfig,
    SecAgg,
    UpdateValidation,
)
from hmgdm_core.privacy.errors import PrivacyError
from server.privacy import check_compatible, drop_invalid, validate_reply

# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


REF = _record(w=np.zeros((3, 2), np.float32), b=np.zeros(2, np.float32))


def _reply(node: int, record: ArrayRecord) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"n": 1})}), reply_to=sent)


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, "'w' holds NaN"),
        (
            {"w": np.zeros((3, 2), np.float32), "b": np.array([np.inf, 0], np.float32)},
            "'b' holds NaN or Inf",
        ),
        (
            {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)},
            r"'w' is float32\[2, 3\]",
        ),
        ({"w": np.zeros((3, 2), np.float64), "b": np.zeros(2, np.float32)}, "'w' is float64"),
        ({"w": np.zeros((3, 2), np.float32)}, r"missing \['b'\]"),
        (
            {
                "w": np.zeros((3, 2), np.float32),
                "b": np.zeros(2, np.float32),
                "x": np.zeros(1, np.float32),
            },
            r"unexpected \['x'\]",
        ),
        (
            {"w": np.full((3, 2), 2.0, np.float32), "b": np.zeros(2, np.float32)},
            "update norm 4.899",
        ),
    ],
)
def test_bad_replies_are_refused_with_the_reason(arrays, reason):
    ok, why = validate_reply(_record(**arrays), REF, max_norm=4.0)
    assert not ok
    assert re.search(reason, why), why


def test_honest_reply_passes_and_the_bound_is_optional():
    near = _record(w=np.full((3, 2), 0.5, np.float32), b=np.zeros(2, np.float32))
    assert validate_reply(near, REF, max_norm=4.0) == (True, "ok")
    big = _record(w=np.full((3, 2), 9.0, np.float32), b=np.zeros(2, np.float32))
    assert validate_reply(big, REF, max_norm=None)[0]
    # Flower's server-side clipping divides by the norm: central mode refuses a zero update.
    assert validate_reply(REF, REF, max_norm=None)[0]
    assert validate_reply(REF, REF, max_norm=None, nonzero=True) == (
        False,
        "the update is exactly zero (the weights sent back unchanged)",
    )


def test_drop_invalid_keeps_honest_sites_and_logs_each_reason(caplog):
    honest = _record(w=np.full((3, 2), 0.1, np.float32), b=np.zeros(2, np.float32))
    replies = [
        _reply(1, honest),
        _reply(2, _record(w=np.full((3, 2), np.nan, np.float32), b=np.zeros(2, np.float32))),
        _reply(3, _record(w=np.zeros((1, 2), np.float32), b=np.zeros(2, np.float32))),
        _reply(4, _record(w=np.full((3, 2), 100.0, np.float32), b=np.zeros(2, np.float32))),
        _reply(5, honest),
        Message(
            Error(code=1, reason="boom"),
            reply_to=Message(RecordDict(), dst_node_id=6, message_type="train"),
        ),
    ]
    with caplog.at_level(logging.WARNING, logger="server.privacy"):
        privacy = PrivacyConfig(validation=UpdateValidation(max_update_norm=10.0))
        kept, dropped = drop_invalid({m.metadata.src_node_id: m for m in replies}, REF, privacy)
    assert list(kept) == [1, 5]
    assert sorted(dropped) == [2, 3, 4, 6]
    assert "NaN" in dropped[2] and "[1, 2]" in dropped[3]
    assert "exceeds" in dropped[4] and "boom" in dropped[6]
    assert sum("dropped" in r.message for r in caplog.records) == 4


ON, NORM_5 = SecAgg(enabled=True), UpdateValidation(max_update_norm=5.0)
ADAPTIVE = CentralDP(adaptive_clipping=True)


def test_incompatible_combinations_are_refused_at_start():
    uniform = FedAvg(weighted_by_key=UNIFORM_WEIGHT_KEY)
    cases = [
        (PrivacyConfig(secagg=ON, validation=NORM_5), uniform, "max_update_norm"),
        (PrivacyConfig(mode="central", secagg=ON), uniform, "client_central"),
        (PrivacyConfig(mode="client_central", secagg=ON, central=ADAPTIVE), uniform, "adaptive"),
        (PrivacyConfig(mode="central"), FedAdam(weighted_by_key=UNIFORM_WEIGHT_KEY), "FedAdam"),
        (PrivacyConfig(mode="client_central"), FedAvg(), "num-examples"),
    ]
    for privacy, strategy, needle in cases:
        with pytest.raises(PrivacyError, match=needle):
            check_compatible(privacy, strategy)
    check_compatible(PrivacyConfig(mode="central"), FedProx(weighted_by_key=UNIFORM_WEIGHT_KEY))
    check_compatible(PrivacyConfig(mode="client_central", secagg=ON), uniform)
    check_compatible(PrivacyConfig(mode="local_dp", secagg=ON), FedAvg())
    with pytest.raises(PrivacyError, match="plain"):
        check_compatible(PrivacyConfig(mode="local_dp", secagg=ON), FedAdam())

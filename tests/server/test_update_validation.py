"""Validation inside `aggregate_train` with real Flower Messages: bad updates and bad weights are
dropped, the honest mean is untouched; DP off is bit-identical to the plain strategy; central
modes get Flower's wrappers and keep their state across a restart."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)

from client.records import SHARED, pack_metrics, pack_state
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY, CentralDP, PrivacyConfig, UpdateValidation
from hmgdm_core.privacy.errors import PrivacyError
from server.messaging import Replies
from server.strategy import aggregate_train, make_strategy, restore_strategy_state, strategy_state

FED = FederationConfig(min_sites=2, min_replies=2)
NAMES = ["encoder.weight", "encoder.bias"]


# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"encoder.weight": scale * torch.randn(2, 3, generator=gen),
            "encoder.bias": scale * torch.randn(2, generator=gen)}  # fmt: skip


def _reply(node: int, state: dict, metrics: MetricRecord) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict({SHARED: pack_state(state), "metrics": metrics}), reply_to=sent)


def _honest(local_dp: bool = False) -> dict[int, Message]:
    """Two good replies; with `local_dp`, site 1 also reports its epsilon (a metric site 2 lacks,
    which Flower's strategies alone refuse to aggregate)."""
    first = {"loss": 0.5, "epsilon": 2.5} if local_dp else {"loss": 0.5}
    return {1: _reply(1, _state(1), pack_metrics(first, 5)),
            2: _reply(2, _state(2), pack_metrics({"loss": 0.7}, 30))}  # fmt: skip


def _bytes(record) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in record.items()}


def test_nan_wrong_shape_oversized_and_bad_weights_are_dropped_and_honest_sites_averaged():
    nan = _state(3)
    nan["encoder.bias"][0] = float("nan")
    shape = {**_state(4), "encoder.weight": torch.zeros(3, 2)}
    bad = {
        3: _reply(3, nan, pack_metrics({"loss": 0.1}, 9)),
        4: _reply(4, shape, pack_metrics({"loss": 0.1}, 9)),
        5: _reply(5, _state(5, scale=1e4), pack_metrics({"loss": 0.1}, 9)),
        6: _reply(6, _state(6), MetricRecord({"loss": 0.1})),  # no num-examples
        7: _reply(7, _state(7), MetricRecord({"num-examples": float("nan")})),
    }
    privacy = PrivacyConfig(validation=UpdateValidation(max_update_norm=100.0))
    sent = pack_state(_state(0))
    replies = Replies.sort("train", [1, 2, 3, 4, 5, 6, 7], {**_honest(local_dp=True), **bad})
    out = aggregate_train(make_strategy(FED, privacy), 1, replies, 2, sent=sent, privacy=privacy)
    assert out.aggregated and out.replied == [1, 2] and not out.failed
    assert "holds NaN" in out.dropped[3]
    assert "'encoder.weight' is [3, 2], expected [2, 3]" in out.dropped[4]
    assert "exceeds max_update_norm" in out.dropped[5] and "lack a numeric" in out.dropped[6]
    assert "not a positive finite" in out.dropped[7]
    assert out.site_metrics[1]["epsilon"] == 2.5 and "epsilon" not in out.metrics
    plain, _ = FedAvg().aggregate_train(1, list(_honest().values()))
    assert _bytes(out.arrays) == _bytes(plain)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_dp_off_gives_bit_identical_aggregates_to_the_plain_strategy(strategy):
    fed = FederationConfig(min_sites=2, min_replies=2, strategy=strategy)
    ours = make_strategy(fed, PrivacyConfig())
    assert type(ours) is (FedProx if strategy == "fedprox" else FedAvg)
    out = aggregate_train(
        ours, 1, Replies.sort("train", [1, 2], _honest()), 2, sent=pack_state(_state(0))
    )
    plain = FedProx() if strategy == "fedprox" else FedAvg()
    arrays, metrics = plain.aggregate_train(1, list(_honest().values()))
    assert _bytes(out.arrays) == _bytes(arrays)
    assert dict(out.metrics) == dict(metrics)


def test_central_modes_get_flowers_wrappers_and_impossible_settings_are_refused():
    central = make_strategy(FED, PrivacyConfig(mode="central"))
    assert isinstance(central, DifferentialPrivacyServerSideFixedClipping)
    assert central.strategy.weighted_by_key == UNIFORM_WEIGHT_KEY
    assert central.num_sampled_clients == FED.min_sites
    adaptive_clipping = CentralDP(adaptive_clipping=True)
    adaptive = make_strategy(FED, PrivacyConfig(mode="client_central", central=adaptive_clipping))
    assert isinstance(adaptive, DifferentialPrivacyClientSideAdaptiveClipping)
    fedadam = FederationConfig(min_sites=2, min_replies=2, strategy="fedadam")
    with pytest.raises(PrivacyError, match="plain averaging"):
        make_strategy(fedadam, PrivacyConfig(mode="central"))


def test_central_mode_refuses_a_site_that_sends_no_equal_weight():
    tiny_noise = CentralDP(noise_multiplier=1e-6)
    strategy = make_strategy(FED, PrivacyConfig(mode="central", central=tiny_noise))
    sent = pack_state(_state(0))
    strategy.current_arrays = (
        sent  # the server-side wrapper clips against what configure_train sent
    )
    replies = {n: _reply(n, _state(n), MetricRecord({"num-examples": 1, UNIFORM_WEIGHT_KEY: 1}))
               for n in (1, 2)}  # fmt: skip
    replies[3] = _reply(3, _state(3), pack_metrics({}, 100))  # tries to outweigh the others
    out = aggregate_train(strategy, 1, Replies.sort("train", [1, 2, 3], replies), 2, sent=sent,
                          privacy=PrivacyConfig(mode="central"))  # fmt: skip
    assert out.replied == [1, 2] and UNIFORM_WEIGHT_KEY in out.dropped[3]
    assert out.aggregated


def test_adaptive_clipping_norm_survives_a_restart():
    privacy = PrivacyConfig(mode="client_central", central=CentralDP(adaptive_clipping=True))
    strategy = make_strategy(FED, privacy)
    strategy.clipping_norm = 0.37  # what adaptive clipping has learnt so far
    resumed = make_strategy(FED, privacy)
    restore_strategy_state(resumed, strategy_state(strategy))
    assert resumed.clipping_norm == 0.37

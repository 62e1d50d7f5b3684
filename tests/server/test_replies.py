"""The server checks every site reply before use, with real Flower Messages: a site claiming
1e15 examples no longer becomes the global model, and NaN or wrong-shape statistics, sums and
metrics are left out (or stop the Cox run) instead of being pooled and broadcast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from client.records import COX_ARRAYS, SHARED, pack_arrays, pack_metrics, pack_state
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.config import PrivacyConfig
from server.cox import _evaluation, _moments, _stats
from server.messaging import Replies
from server.replies import InvalidReply, downstream_metrics, entity_moments, site_stats
from server.strategy import aggregate_evaluate, aggregate_train, make_strategy
from server.weight import round_caps

pytestmark = pytest.mark.usefixtures("task_identity")
FED = FederationConfig(min_sites=2, min_replies=2)


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"encoder.weight": torch.full((2, 3), value), "encoder.bias": torch.full((2,), value)}


def _reply(node: int, content: dict) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict(content), reply_to=sent)


def _train(node: int, value: float, examples: int) -> Message:
    return _reply(node, {SHARED: pack_state(_state(value)),
                         "metrics": pack_metrics({"loss": 0.5}, examples)})  # fmt: skip


def _replies(replies: dict[int, Message]) -> Replies:
    return Replies.sort("train", list(replies), replies)


NORM_CAPPED = PrivacyConfig(validation={"max_update_norm": 10.0})


@pytest.mark.parametrize("privacy", [PrivacyConfig(), NORM_CAPPED])
def test_a_site_claiming_1e15_examples_weighs_no_more_than_the_graphs_it_reported(privacy):
    sent = pack_state(_state(0.0))
    replies = {1: _train(1, 1.0, 40), 2: _train(2, 3.0, 10**15)}
    strategy = make_strategy(FED, privacy)
    # Before: the liar's update became the global model, max_update_norm or not.
    out = aggregate_train(strategy, 1, _replies(replies), 2, sent=sent, privacy=privacy,
                          sizes={1: 40, 2: 40})  # fmt: skip
    assert out.aggregated and out.capped == {2: (1e15, 40.0)}
    assert next(iter(out.arrays.values())).numpy() == pytest.approx(2.0)
    # A site that never reported a size weighs as the smallest that did; or all sites equally.
    replies = {1: _train(1, 1.0, 40), 3: _train(3, 3.0, 10**15)}
    out = aggregate_train(strategy, 1, _replies(replies), 2, sent=sent, sizes={1: 40, 2: 120})
    assert next(iter(out.arrays.values())).numpy() == pytest.approx(2.0)
    replies = {1: _train(1, 1.0, 40), 2: _train(2, 3.0, 120)}
    out = aggregate_train(strategy, 1, _replies(replies), 2, sent=sent, sizes={1: 40, 2: 120},
                          equal_weights=True)  # fmt: skip
    assert next(iter(out.arrays.values())).numpy() == pytest.approx(2.0)


def test_evaluation_metrics_must_be_finite_and_weigh_what_the_site_reported():
    good = _reply(1, {"metrics": pack_metrics({"loss": 1.0}, 10)})
    liar = _reply(2, {"metrics": pack_metrics({"loss": 3.0}, 10**15)})
    nan = _reply(3, {"metrics": pack_metrics({"loss": float("nan")}, 10)})
    strategy = make_strategy(FED)
    out = aggregate_evaluate(strategy, 1, {1: good, 2: liar, 3: nan}, sizes={1: 10, 2: 10})
    assert out["loss"] == pytest.approx(2.0)


def _stats_reply(**overrides) -> Message:
    moments = {"x_count": torch.tensor(50.0, dtype=torch.float64),
               "x_sum": torch.ones(4, dtype=torch.float64),
               "x_sumsq": torch.ones(4, dtype=torch.float64)}  # fmt: skip
    dims = {"x_dim": 4, "edge_dim": 0, "window": 0, "edge_windows": 0}
    content = {"dims": MetricRecord(dims), "moments": moments,
               "metrics": MetricRecord({"graphs": 6})}  # fmt: skip
    for key, value in overrides.items():
        target = content["moments"] if key in moments else content["dims"]
        target[key] = value
    content["moments"] = pack_state(content["moments"])
    return _reply(1, content)


@pytest.mark.parametrize(
    "override",
    [
        {"x_sum": torch.tensor([np.nan, 1, 1, 1], dtype=torch.float64)},
        {"x_sum": torch.ones(5, dtype=torch.float64)},
        {"x_count": torch.tensor(-3.0, dtype=torch.float64)},
        {"x_sumsq": torch.full((4,), -1.0, dtype=torch.float64)},
        {"x_dim": 2.5},
    ],
)
def test_malformed_feature_moments_are_refused(override):
    assert site_stats(_stats_reply()).graphs == 6
    with pytest.raises(InvalidReply):
        site_stats(_stats_reply(**override))


def test_a_reply_the_parser_refuses_counts_as_failed_with_the_reason():
    bad = _stats_reply(x_sum=torch.tensor([np.nan, 1, 1, 1], dtype=torch.float64))
    replies = _replies({1: _stats_reply(), 2: bad})
    parsed = replies.parse(site_stats)
    assert list(parsed) == [1] and list(replies.ok) == [1]
    assert replies.failed[2].startswith("invalid reply: moment 'x_sum'")


def test_entity_moments_and_downstream_metrics_are_checked():
    ok = {k: torch.ones(8, dtype=torch.float64) for k in ("total", "total_sq")}
    reply = _reply(1, {"moments": pack_state(ok),
                       "metrics": MetricRecord({"entities": 100, "slides": 12})})  # fmt: skip
    assert entity_moments(reply, 8)[3] == 12
    with pytest.raises(InvalidReply):
        entity_moments(reply, 16)
    bad = {**ok, "total": torch.full((8,), float("inf"), dtype=torch.float64)}
    with pytest.raises(InvalidReply):
        entity_moments(
            _reply(
                1,
                {"moments": pack_state(bad), "metrics": MetricRecord({"entities": 1, "slides": 1})},
            ),
            8,
        )
    with pytest.raises(InvalidReply):
        downstream_metrics(_reply(1, {"metrics": pack_metrics({"accuracy": 7.0}, 5)}),
                           "classification")  # fmt: skip
    pairs = {"concordant": 3, "discordant": 1, "tied-risk": 0, "comparable": 9, "events": 2}
    with pytest.raises(InvalidReply, match="do not add up"):
        downstream_metrics(_reply(1, {"metrics": pack_metrics(pairs, 5)}), "survival")


def _cox(metrics: dict, **arrays) -> Message:
    return _reply(1, {"metrics": MetricRecord(metrics), COX_ARRAYS: pack_arrays(arrays)})


def test_cox_sums_and_counts_are_checked_before_they_are_summed():
    ones = np.ones(2)
    assert _moments(_cox({"patients": 12}, total=ones, total_sq=ones)).n == 12
    with pytest.raises(InvalidReply):
        _moments(_cox({"patients": 12}, total=np.array([np.nan, 1.0]), total_sq=ones))
    with pytest.raises(InvalidReply):
        _stats(_cox({"patients": 12, "loglik": -3.0}, gradient=ones, hessian=np.ones((3, 3))))
    with pytest.raises(InvalidReply):
        _stats(_cox({"patients": 12, "loglik": float("nan")}, gradient=ones,
                    hessian=np.eye(2)))  # fmt: skip
    counts = {"patients": 12, "events": 5, "concordant": 20, "discordant": 5, "tied-risk": 1,
              "comparable": 26}  # fmt: skip
    tables = {"low-risk": np.array([[3, 1], [2, 0]]), "high-risk": np.array([[2, 1], [1, 2]])}
    assert _evaluation(_cox({**counts, "life-tables": 1}, **tables)).tables
    assert not _evaluation(_cox({**counts, "life-tables": 0})).tables
    with pytest.raises(InvalidReply):  # tables holding more patients than the site has
        _evaluation(_cox({**counts, "life-tables": 1}, **(tables | {"low-risk": np.eye(2) * 9})))
    too_many = {**counts, "comparable": 10**9, "concordant": 10**9 - 6, "life-tables": 0}
    with pytest.raises(InvalidReply):  # more comparable pairs than 12 patients have
        _evaluation(_cox(too_many))


def test_honest_weights_stay_within_the_caps_their_graph_counts_give():
    # 2 steps of batches of 8: a site with 6 graphs (5 for training) honestly claims 2 x 5 = 10.
    fed = FederationConfig(local_steps=2)
    assert round_caps({1: 6, 2: 100}, fed, batch_size=8) == {1: 12, 2: 100}
    assert round_caps({1: 6}, FederationConfig(local_epochs=3), batch_size=8) == {1: 18}

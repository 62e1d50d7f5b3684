"""Client-side central DP round trip: Flower's wrapper asks for clipping, `privacy_mod` clips on
the site (frozen arrays still reach the handler), the server's mean stays within C."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from client.privacy import privacy_mod
from client.records import CONFIG_KEY, FROZEN, SHARED
from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY, CentralDP, PrivacyConfig
from server.privacy import wrap_strategy

# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


class Grid:
    """Just enough of Flower's Grid for a strategy to sample nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


REF = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
CTX = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _config(privacy: PrivacyConfig) -> ConfigRecord:
    return ConfigRecord({CONFIG_KEY: json.dumps({"privacy": privacy.model_dump(mode="json")})})


def _site(scale: float, seen: list[str]):
    """A train handler: checks it got the frozen arrays, replies with a `scale`-sized update."""

    def handler(msg: Message, _: Context) -> Message:
        seen.append(",".join(sorted(msg.content.array_records)))
        sent = msg.content[SHARED]["w"].numpy()
        update = np.full_like(sent, scale / np.sqrt(sent.size))  # norm = scale
        content = RecordDict(
            {
                SHARED: ArrayRecord({"w": Array(sent + update)}),
                "metrics": MetricRecord({"loss": 1.0, "num-examples": 7}),
            }
        )
        return Message(content, reply_to=msg)

    return handler


@pytest.mark.parametrize("adaptive", [False, True])
def test_sites_clip_and_the_server_mean_stays_within_c(adaptive):
    privacy = PrivacyConfig(
        mode="client_central",
        central=CentralDP(clip_norm=1.0, adaptive_clipping=adaptive, noise_multiplier=1e-6),
    )
    strategy = wrap_strategy(
        FedAvg(weighted_by_key=UNIFORM_WEIGHT_KEY, min_available_nodes=3, min_train_nodes=3),
        privacy,
        num_sampled_clients=3,
    )
    msgs = list(
        strategy.configure_train(
            1, ArrayRecord({"w": Array(REF)}), _config(privacy), Grid([1, 2, 3])
        )
    )
    seen: list[str] = []
    replies = []
    for msg, scale in zip(msgs, (0.5, 4.0, 40.0), strict=True):
        msg.content[FROZEN] = ArrayRecord({"stats": Array(np.ones(2, np.float32))})
        replies.append(privacy_mod(msg, CTX, _site(scale, seen)))
    # The train handler still received the frozen arrays.
    assert seen == [",".join(sorted((FROZEN, SHARED)))] * 3
    norms = [np.linalg.norm(r.content[SHARED]["w"].numpy() - REF) for r in replies]
    assert norms == pytest.approx([0.5, 1.0, 1.0], abs=1e-4)
    assert all(r.content["metrics"][UNIFORM_WEIGHT_KEY] == 1 for r in replies)
    assert (KEY_NORM_BIT in replies[0].content["metrics"]) == adaptive
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.linalg.norm(arrays["w"].numpy() - REF) <= 1.0 + 1e-3


def test_evaluation_is_not_clipped_and_dp_off_changes_nothing():
    privacy = PrivacyConfig(mode="client_central", central=CentralDP(clip_norm=1.0))
    content = RecordDict({SHARED: ArrayRecord({"w": Array(REF)}), "config": _config(privacy)})
    evaluate = Message(content, dst_node_id=1, message_type="evaluate")
    reply = privacy_mod(evaluate, CTX, _site(40.0, []))
    assert np.linalg.norm(reply.content[SHARED]["w"].numpy() - REF) == pytest.approx(40.0, rel=1e-4)
    assert reply.content["metrics"][UNIFORM_WEIGHT_KEY] == 1
    off = RecordDict({SHARED: ArrayRecord({"w": Array(REF)}), "config": _config(PrivacyConfig())})
    plain = privacy_mod(Message(off, dst_node_id=1, message_type="train"), CTX, _site(40.0, []))
    assert UNIFORM_WEIGHT_KEY not in plain.content["metrics"]

"""Aggregation wrappers: graph-weighted FedAvg through our pack/unpack, the minimum-replies
rule, FedAdam state across a restart, and round checkpoints."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Error, Message, RecordDict

from client.records import SHARED, pack_metrics, pack_state, unpack_state
from hmgdm_core.exceptions import CheckpointError
from hmgdm_core.federation_config import FederationConfig, shared_names
from server.messaging import Replies
from server.strategy import (
    aggregate_train,
    load_last_round,
    make_strategy,
    restore_strategy_state,
    save_round,
    strategy_state,
)

# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


class Tiny(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Linear(3, 2)
        self.decoder = torch.nn.Linear(2, 3)


def _reply(node: int, state: dict, names: list[str], n: int) -> Message:
    out = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({SHARED: pack_state(state, names), "metrics": pack_metrics({}, n)})
    return Message(content, reply_to=out)


def _error(node: int) -> Message:
    return Message(Error(code=1, reason="site crashed"), reply_to=Message(
        RecordDict(), dst_node_id=node, message_type="train"))  # fmt: skip


def test_fedavg_is_the_graph_weighted_mean_of_shared_names_only():
    states = {node: Tiny(node).state_dict() for node in (11, 12, 13)}
    counts = {11: 5, 12: 1, 13: 30}
    names = shared_names(states[11], FederationConfig().shared_prefixes("diffusion"))
    assert names == ["encoder.weight", "encoder.bias"]
    fed = FederationConfig(min_sites=3, min_replies=3)
    replies = {n: _reply(n, states[n], names, counts[n]) for n in states}
    sent = pack_state(Tiny(0).state_dict(), names)
    out = aggregate_train(
        make_strategy(fed),
        1,
        Replies.sort("train", list(states), replies),
        fed.min_replies,
        sent=sent,
    )
    assert out.aggregated and out.replied == [11, 12, 13] and not out.failed
    got = unpack_state(out.arrays)
    assert set(got) == set(names)
    total = sum(counts.values())
    for k in names:
        expected = sum(counts[n] * states[n][k].double() for n in states) / total
        torch.testing.assert_close(got[k].double(), expected, rtol=1e-6, atol=1e-7)


def test_a_round_below_min_replies_is_not_aggregated_and_says_who_failed():
    state = Tiny(0).state_dict()
    fed = FederationConfig(min_sites=3, min_replies=2)
    replies = {1: _reply(1, state, list(state), 4), 2: _error(2)}
    sent = pack_state(Tiny(1).state_dict())
    out = aggregate_train(
        make_strategy(fed), 1, Replies.sort("train", [1, 2, 3], replies), fed.min_replies, sent=sent
    )
    assert not out.aggregated and out.arrays is None
    assert out.replied == [1]
    assert out.failed == {2: "site crashed", 3: "no reply before the round timeout"}
    # The same replies with a lower minimum are aggregated (from the one good reply).
    out = aggregate_train(
        make_strategy(fed), 1, Replies.sort("train", [1, 2, 3], replies), 1, sent=sent
    )
    assert out.aggregated


def test_fedadam_state_survives_a_restart():
    fed = FederationConfig(strategy="fedadam", min_sites=2, min_replies=2, server_lr=0.1)
    names = ["encoder.weight", "encoder.bias"]
    glob = Tiny(0).state_dict()
    rounds = [
        {n: _reply(n, Tiny(10 * r + n).state_dict(), names, n) for n in (1, 2)} for r in (1, 2)
    ]

    def configure(strategy, state):
        # FedAdam remembers the arrays it sent in configure_train.
        sent = pack_state(state, names)
        strategy.current_arrays = {k: v.numpy() for k, v in sent.items()}
        return sent

    straight = make_strategy(fed)
    sent = configure(straight, glob)
    mid = unpack_state(
        aggregate_train(straight, 1, Replies.sort("train", [1, 2], rounds[0]), 2, sent=sent).arrays
    )
    saved = strategy_state(straight)
    assert set(saved) == {"m_t", "v_t"}
    sent = configure(straight, mid)
    want = unpack_state(
        aggregate_train(straight, 2, Replies.sort("train", [1, 2], rounds[1]), 2, sent=sent).arrays
    )

    resumed = make_strategy(fed)
    restore_strategy_state(resumed, saved)
    sent = configure(resumed, mid)
    got = unpack_state(
        aggregate_train(resumed, 2, Replies.sort("train", [1, 2], rounds[1]), 2, sent=sent).arrays
    )
    for k in names:
        torch.testing.assert_close(got[k], want[k])
    with pytest.raises(CheckpointError, match="another strategy"):
        restore_strategy_state(make_strategy(FederationConfig()), {"velocity": {}})


def test_resume_reads_the_newest_round_and_rejects_garbage(tmp_path):
    assert load_last_round(tmp_path) is None
    for rnd in (1, 2, 10):
        save_round(tmp_path, rnd, {"arrays": {"w": torch.full((2,), float(rnd))}})
    ckpt = load_last_round(tmp_path)
    assert ckpt["round"] == 10 and ckpt["arrays"]["w"][0] == 10
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "round_0011.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"round_0011\.pt"):
        load_last_round(tmp_path)


def test_stage_one_shares_the_autoencoder_and_config_rejects_impossible_minimums():
    fed = FederationConfig(stage1_rounds=2, stage2_rounds=1, aggregate="encoder+decoder")
    assert [fed.stage_of(r) for r in (1, 2, 3)] == ["autoencoder", "autoencoder", "diffusion"]
    names = ["autoencoder.node.w", "encoder.w", "decoder.w", "stats.x_mean"]
    assert shared_names(names, fed.shared_prefixes("autoencoder")) == ["autoencoder.node.w"]
    assert shared_names(names, fed.shared_prefixes("diffusion")) == ["encoder.w", "decoder.w"]
    with pytest.raises(ValueError, match="min_replies"):
        FederationConfig(min_sites=1, min_replies=2)


def test_evaluation_is_rationed_but_the_last_round_is_always_evaluated():
    fed = FederationConfig(stage1_rounds=1, stage2_rounds=4, evaluate_every=2)
    assert [r for r in range(1, 6) if fed.evaluates(r)] == [2, 4, 5]
    assert not any(FederationConfig(evaluate_every=0).evaluates(r) for r in range(1, 4))

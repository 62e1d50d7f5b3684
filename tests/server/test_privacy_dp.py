"""Central DP on the server: the wrapper per mode, clipping within C, noise std, epsilon."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from opacus.accountants import RDPAccountant

from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY, CentralDP, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted, PrivacyError
from server.privacy import CentralAccountant, wrap_strategy

# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


def _uniform() -> FedAvg:
    return FedAvg(weighted_by_key=UNIFORM_WEIGHT_KEY)


def _reply(node: int, w: np.ndarray) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({UNIFORM_WEIGHT_KEY: 1})}
    )
    return Message(content, reply_to=sent)


def _updates(reply: Message, ref: np.ndarray) -> np.ndarray:
    return reply.content["arrays"]["w"].numpy() - ref


@pytest.mark.parametrize(
    ("mode", "adaptive", "cls"),
    [
        ("central", False, DifferentialPrivacyServerSideFixedClipping),
        ("central", True, DifferentialPrivacyServerSideAdaptiveClipping),
        ("client_central", False, DifferentialPrivacyClientSideFixedClipping),
        ("client_central", True, DifferentialPrivacyClientSideAdaptiveClipping),
    ],
)
def test_each_central_mode_gets_its_flower_wrapper(mode, adaptive, cls):
    privacy = PrivacyConfig(mode=mode, central=CentralDP(adaptive_clipping=adaptive, clip_norm=0.7))
    wrapped = wrap_strategy(_uniform(), privacy, num_sampled_clients=4)
    assert type(wrapped) is cls and wrapped.clipping_norm == 0.7
    assert wrapped.num_sampled_clients == 4


def test_dp_off_and_local_dp_leave_the_strategy_itself():
    plain = FedAvg()
    assert wrap_strategy(plain, PrivacyConfig(), num_sampled_clients=3) is plain
    assert wrap_strategy(plain, PrivacyConfig(mode="local_dp"), num_sampled_clients=3) is plain


def test_server_side_clipping_bounds_every_update_before_noise():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 5)).astype(np.float32)
    raw = [rng.standard_normal((40, 5)).astype(np.float32) * s for s in (0.01, 1.0, 30.0)]
    privacy = PrivacyConfig(mode="central", central=CentralDP(clip_norm=1.0, noise_multiplier=1e-9))
    wrapped = wrap_strategy(_uniform(), privacy, num_sampled_clients=3)
    wrapped.current_arrays = ArrayRecord({"w": Array(ref)})
    replies = [_reply(i, ref + u) for i, u in enumerate(raw, start=1)]
    arrays, _ = wrapped.aggregate_train(1, replies)
    clipped = [_updates(r, ref) for r in replies]
    assert all(np.linalg.norm(u) <= 1.0 + 1e-5 for u in clipped)
    assert np.allclose(clipped[0], raw[0], atol=1e-6)  # below C: untouched
    agg = arrays["w"].numpy() - ref
    assert np.allclose(agg, np.mean(clipped, axis=0), atol=1e-5)
    assert np.linalg.norm(agg) <= 1.0 + 1e-5


def test_central_noise_has_std_sigma_c_over_n():
    ref = np.zeros((100, 100), np.float32)
    privacy = PrivacyConfig(mode="central", central=CentralDP(clip_norm=2.0, noise_multiplier=1.0))
    wrapped = wrap_strategy(_uniform(), privacy, num_sampled_clients=4)
    wrapped.current_arrays = ArrayRecord({"w": Array(ref)})
    # Tiny updates (an exactly zero one would make Flower divide by its norm).
    updates = [np.full_like(ref, 1e-6 * i) for i in range(1, 5)]
    np.random.seed(0)  # Flower draws its noise from numpy's global generator
    arrays, _ = wrapped.aggregate_train(1, [_reply(i, ref + u) for i, u in enumerate(updates, 1)])
    noise = arrays["w"].numpy() - np.mean(updates, axis=0)
    assert noise.std() == pytest.approx(1.0 * 2.0 / 4, rel=0.03)  # 10,000 draws: 0.7% s.e.


def test_central_accountant_matches_opacus_and_discounts_missing_replies():
    acc = CentralAccountant.from_config(
        PrivacyConfig(mode="central", central=CentralDP(noise_multiplier=2.0)),
        sites_per_round=4,
        total_sites=8,
    )
    for replies in (4, 4, 3):
        acc.record(acc.mechanism(replies))
    reference = RDPAccountant()
    reference.history = [(2.0, 0.5, 2), (1.5, 0.5, 1)]  # 3 of 4 replies: sigma * 3/4
    assert acc.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), abs=1e-6)


def test_central_budget_stops_the_round_that_would_exceed_it():
    steps = [CentralAccountant(noise_multiplier=3.0, sites_per_round=3, total_sites=3, delta=1e-5)]
    for _ in range(3):
        steps[0].record(steps[0].mechanism(3))
    limit = steps[0].epsilon() + 1e-9
    acc = CentralAccountant(
        noise_multiplier=3.0, sites_per_round=3, total_sites=3, delta=1e-5, max_epsilon=limit
    )
    done = 0
    with pytest.raises(PrivacyBudgetExhausted):
        while True:
            acc.check_budget(acc.mechanism(3))
            acc.record(acc.mechanism(3))
            done += 1
    assert done == 3
    with pytest.raises(PrivacyError, match="between 1"):
        CentralAccountant(noise_multiplier=1.0, sites_per_round=5, total_sites=3, delta=1e-5)

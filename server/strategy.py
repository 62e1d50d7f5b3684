"""Aggregation around Flower's Message-API strategies: strategy choice from config (inside a
central-DP wrapper when asked), reply validation, the minimum-replies rule, strategy state that
survives a restart and per-round checkpoints.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from hmgdm_core.atomic import load_torch, save_torch
from hmgdm_core.exceptions import CheckpointError
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.config import CENTRAL_MODES, UNIFORM_WEIGHT_KEY, PrivacyConfig
from server.messaging import Replies
from server.privacy import (
    check_secure_aggregation,
    drop_invalid,
    finite_metrics,
    validate_metrics,
    wrap_strategy,
)
from server.weight import bound_weights

log = logging.getLogger(__name__)

ROUND_FILE = "round_{:04d}.pt"
FORMAT = "hmgdm-federation-round/1"
# What strategies carry between rounds: the optimiser moments of adaptive server strategies
# (FedAdam and its FedOpt family) and the clipping norm adaptive clipping has learnt so far.
_STATE_ATTRS = ("m_t", "v_t", "clipping_norm")


def make_strategy(fed: FederationConfig, privacy: PrivacyConfig | None = None) -> Strategy:
    """The configured strategy, inside Flower's DP wrapper in central modes.

    Node minimums are our min_replies (we wait for sites ourselves). Combinations that would
    run with less protection than asked for are refused here, before any site is contacted.
    """
    privacy = privacy or PrivacyConfig()
    check_secure_aggregation(fed, privacy)
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0 if fed.evaluate_every else 0.0,
        min_train_nodes=fed.min_replies,
        min_evaluate_nodes=fed.min_replies if fed.evaluate_every else 0,
        min_available_nodes=fed.min_replies,
    )
    # Central DP's noise is calibrated to an unweighted mean: sites send dp-weight = 1.
    if privacy.mode in CENTRAL_MODES:
        common["weighted_by_key"] = UNIFORM_WEIGHT_KEY
    if fed.strategy == "fedprox":
        strategy: Strategy = FedProx(**common, proximal_mu=fed.proximal_mu)
    elif fed.strategy == "fedadam":
        b1, b2 = fed.server_betas
        strategy = FedAdam(**common, eta=fed.server_lr, beta_1=b1, beta_2=b2, tau=fed.server_tau)
    else:
        strategy = FedAvg(**common)
    # Every site trains every round, so the noise is scaled for min_sites updates.
    return wrap_strategy(strategy, privacy, num_sampled_clients=fed.min_sites)


def _chain(strategy: Strategy) -> Iterator[Strategy]:
    """The strategy and, for a DP wrapper, the strategies it wraps."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "strategy", None)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy carries between rounds (empty for plain FedAvg/FedProx)."""
    state: dict[str, Any] = {}
    for part in _chain(strategy):
        for attr in _STATE_ATTRS:
            value = getattr(part, attr, None)
            if value is not None:
                state[attr] = dict(value) if isinstance(value, dict) else value
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    for attr, value in state.items():
        part = next((p for p in _chain(strategy) if hasattr(p, attr)), None)
        if part is None:
            raise CheckpointError(
                f"checkpoint holds {attr} of another strategy than {type(strategy).__name__}"
            )
        if isinstance(value, dict):
            value = {k: np.asarray(v) for k, v in value.items()}
        setattr(part, attr, value)


@dataclass
class RoundOutcome:
    """One training round as the server saw it.

    `replied`: sites whose update was used; `failed`: error or no reply (node -> reason);
    `dropped`: malformed updates refused by validation (node -> reason); `capped`: sites whose
    claimed weight exceeded what they reported before (node -> (claimed, cap)).
    """

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    replied: list[int]
    failed: dict[int, str] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    capped: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def aggregated(self) -> bool:
        return self.arrays is not None


def aggregate_train(
    strategy: Strategy,
    server_round: int,
    replies: Replies,
    min_replies: int,
    *,
    sent: ArrayRecord,
    privacy: PrivacyConfig | None = None,
    sizes: Mapping[int, float] | None = None,
    equal_weights: bool = False,
) -> RoundOutcome:
    """Aggregate a round only if at least `min_replies` sites sent a valid update.

    Replies with an error (or none) are failures; replies whose arrays differ in names, shapes
    or dtypes from `sent`, hold NaN/Inf or exceed `max_update_norm` are dropped. Flower's
    strategies average whatever arrived (one reply suffices); a federation that promised each
    site its update is mixed with at least `min_replies - 1` others must not. Each weight is
    capped at the size its site reported (`sizes`, node -> count), or 1 with `equal_weights`.
    """
    kept, dropped = drop_invalid(
        replies.ok, sent, privacy or PrivacyConfig(), weight_key=_weight_key(strategy)
    )
    capped = bound_weights(kept, _weight_key(strategy), sizes, equal=equal_weights)
    outcome = RoundOutcome(
        None, None, sorted(kept), dict(replies.failed), dropped, _site_metrics(kept), capped
    )
    if len(kept) >= min_replies:
        arrays, outcome.metrics = strategy.aggregate_train(
            server_round, _common_metrics(kept.values())
        )
        outcome.arrays = None if arrays is None else _cast_like(arrays, sent)
    return outcome


def aggregate_evaluate(
    strategy: Strategy,
    server_round: int,
    replies: Mapping[int, Message],
    *,
    sizes: Mapping[int, float] | None = None,
    equal_weights: bool = False,
) -> dict[str, float] | None:
    """Mean held-out metrics of the replies without error, with a valid weight (capped as in
    `aggregate_train`) and only finite metrics."""
    key = _weight_key(strategy)
    ok = {n: m for n, m in replies.items() if not m.has_error() and validate_metrics(m, key)[0]}
    ok = {n: m for n, m in ok.items() if finite_metrics(m)}
    if not ok:
        return None
    bound_weights(ok, key, sizes, equal=equal_weights)
    return dict(strategy.aggregate_evaluate(server_round, _common_metrics(ok.values())) or {})


def _weight_key(strategy: Strategy) -> str:
    """The metric a strategy (or the one a DP wrapper wraps) weights each reply by."""
    return next(p.weighted_by_key for p in _chain(strategy) if hasattr(p, "weighted_by_key"))


def _common_metrics(replies: Iterable[Message]) -> list[Message]:
    """The replies with only the metric names all of them share.

    Flower's strategies refuse (raise) when sites report different metric names, e.g. a
    local-DP site's epsilon; `_site_metrics` has kept each site's own values already.
    """
    replies = list(replies)
    records = [next(iter(m.content.metric_records.items())) for m in replies]
    common = set.intersection(*(set(record) for _, record in records))
    for msg, (name, record) in zip(replies, records, strict=True):
        msg.content[name] = MetricRecord({k: v for k, v in record.items() if k in common})
    return replies


def _cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """FedAdam returns float64; the global model keeps the dtypes it was sent in, or the next
    round's replies (in the model's dtype) would all fail validation."""
    return ArrayRecord(
        {k: Array(v.numpy().astype(reference[k].numpy().dtype)) for k, v in arrays.items()}
    )


def _site_metrics(replies: Mapping[int, Message]) -> dict[int, dict[str, float]]:
    """Each site's own scalar metrics (e.g. its local epsilon), before they are averaged."""
    return {
        node: {
            k: float(v)
            for record in m.content.metric_records.values()
            for k, v in record.items()
            if isinstance(v, int | float)
        }
        for node, m in replies.items()
    }


def save_round(run_dir: Path, server_round: int, payload: dict[str, Any]) -> Path:
    """Write `round_NNNN.pt` atomically; it holds everything `--resume` needs."""
    return save_torch(
        {"format": FORMAT, "round": server_round, **payload},
        Path(run_dir) / ROUND_FILE.format(server_round),
    )


def load_last_round(run_dir: Path) -> dict[str, Any] | None:
    """The newest complete round checkpoint under `run_dir`, or None for a fresh run."""
    rounds = sorted(
        (int(m.group(1)), p)
        for p in Path(run_dir).glob("round_*.pt")
        if (m := re.fullmatch(r"round_(\d+)\.pt", p.name))
    )
    if not rounds:
        return None
    path = rounds[-1][1]
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hmgdm federation checkpoint")
    return ckpt

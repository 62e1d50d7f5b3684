"""One pretraining round at the server: wait for sites, check the central-DP budget, broadcast
the strategy's train message (or run it under SecAgg+), aggregate valid updates, evaluate, and
keep a record of the round by site name.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client.records import FROZEN, pack_config, pack_state, unpack_state
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.events import EventLog
from hmgdm_core.federation_config import FederationConfig, Stage, shared_names
from server.messaging import FederationError, broadcast, site_names, wait_for_sites
from server.privacy import CentralAccountant
from server.secagg import secagg_train
from server.strategy import RoundOutcome, aggregate_evaluate, aggregate_train
from server.weight import round_caps


def frozen_names(fed: FederationConfig, stage: Stage, names: list[str]) -> list[str]:
    """Global parameters a site must use this round but does not train for aggregation."""
    shared = set(shared_names(names, fed.shared_prefixes(stage)))
    frozen = ("stats.",) if stage == "autoencoder" else ("stats.", "autoencoder.")
    return [n for n in shared_names(names, frozen) if n not in shared]


def _wait_for_round(grid: Grid, fed: FederationConfig) -> None:
    """All `min_sites` if they come within `rejoin_wait_s`, else go on with `min_replies`."""
    if fed.rejoin_wait_s > 0:
        with contextlib.suppress(FederationError):
            wait_for_sites(grid, fed.min_sites, fed.rejoin_wait_s, fed.poll_interval_s)
    wait_for_sites(grid, fed.min_replies, fed.wait_timeout_s, fed.poll_interval_s)


def _one_content(messages: Iterable[Message], frozen: ArrayRecord) -> tuple[RecordDict, list[int]]:
    """The content a strategy's messages share (Flower's strategies give every node the same
    RecordDict), with the frozen arrays added, and the nodes the strategy picked."""
    messages = list(messages)
    content = messages[0].content if messages else RecordDict()
    content[FROZEN] = frozen
    return content, [m.metadata.dst_node_id for m in messages]


def _array_bytes(messages: Iterable[RecordDict]) -> int:
    """Bytes of model arrays in message contents (what dominates the traffic of a round)."""
    return sum(rec.count_bytes() for c in messages for rec in c.array_records.values())


def run_round(
    grid: Grid,
    strategy: Strategy,
    cfg: HmgdmConfig,
    run_key: str,
    rnd: int,
    state: dict[str, torch.Tensor],
    sizes: dict[int, int],
    events: EventLog,
    accountant: CentralAccountant | None = None,
) -> dict[str, Any]:
    """One training (+ evaluation) round; updates `state` in place when it is aggregated.
    A site's weight is capped by its `sizes` entry (the graph count of its statistics reply).

    With central DP, raises PrivacyBudgetExhausted before contacting any site when releasing
    this round's aggregate would exceed the run's max_epsilon.
    """
    fed, names = cfg.federation, list(state)
    stage = fed.stage_of(rnd)
    shared = shared_names(names, fed.shared_prefixes(stage))
    frozen = pack_state(state, frozen_names(fed, stage, names))
    _wait_for_round(grid, fed)
    if accountant is not None:
        accountant.check_budget(accountant.mechanism(len(list(grid.get_node_ids()))))
    sites = site_names(grid)
    events.emit("round_start", round=rnd, stage=stage, sites=sorted(sites.values()))
    t0 = time.monotonic()
    config = pack_config(cfg, stage=stage, run=run_key)
    outcome, traffic = _train(
        grid, strategy, cfg, rnd, pack_state(state, shared), frozen, config, sizes
    )
    record = _round_record(rnd, stage, outcome, sites, events) | traffic
    if outcome.aggregated:
        state.update(unpack_state(outcome.arrays))
        if accountant is not None:
            eps = accountant.record(accountant.mechanism(len(outcome.replied)))
            record["central_dp"] = {"epsilon": eps, "delta": accountant.delta}
        if fed.evaluates(rnd):
            config = pack_config(cfg, stage=stage, run=run_key)
            arrays = pack_state(state, shared)
            ev = _evaluate(grid, strategy, fed, rnd, arrays, frozen, config, sizes)
            record |= {"eval": ev} if ev is not None else {}
    record["seconds"] = time.monotonic() - t0
    events.emit(
        "round_end" if outcome.aggregated else "round_not_aggregated",
        level=INFO if outcome.aggregated else WARNING,
        round=rnd,
        stage=stage,
        replies=len(outcome.replied),
        min_replies=fed.min_replies,
        loss=record["train"].get("loss"),
        eval_loss=record.get("eval", {}).get("loss"),
        context_share=record.get("eval", {}).get("context-share"),
        epsilon=record.get("central_dp", {}).get("epsilon"),
        seconds=round(record["seconds"], 2),
    )
    return record


def _train(
    grid: Grid,
    strategy: Strategy,
    cfg: HmgdmConfig,
    rnd: int,
    sent: ArrayRecord,
    frozen: ArrayRecord,
    config: ConfigRecord,
    sizes: dict[int, int],
) -> tuple[RoundOutcome, dict[str, int]]:
    """The round's train broadcast and its aggregation; the array bytes sent and received."""
    content, nodes = _one_content(strategy.configure_train(rnd, sent, config, grid), frozen)
    traffic = {"bytes_down": _array_bytes([content]) * len(nodes)}
    if cfg.privacy.secagg.enabled:
        # SecAgg+ replies travel inside its workflow, uncounted here: bytes_up stays 0 then.
        return secagg_train(grid, content, nodes, rnd, cfg, sent), traffic | {"bytes_up": 0}
    replies = broadcast(grid, MessageType.TRAIN, content, cfg.federation, nodes)
    fed = cfg.federation
    outcome = aggregate_train(
        strategy, rnd, replies, fed.min_replies, sent=sent, privacy=cfg.privacy,
        sizes=round_caps(sizes, fed, cfg.train.batch_size), equal_weights=fed.weighting == "equal",
    )  # fmt: skip
    return outcome, traffic | {"bytes_up": _array_bytes(m.content for m in replies.ok.values())}


def _evaluate(
    grid: Grid,
    strategy: Strategy,
    fed: FederationConfig,
    rnd: int,
    arrays: ArrayRecord,
    frozen: ArrayRecord,
    config: ConfigRecord,
    sizes: dict[int, int],
) -> dict[str, float] | None:
    """Held-out loss of the new global model at the sites, averaged by the strategy."""
    content, nodes = _one_content(strategy.configure_evaluate(rnd, arrays, config, grid), frozen)
    if not nodes:
        return None
    replies = broadcast(grid, MessageType.EVALUATE, content, fed, nodes)
    return aggregate_evaluate(
        strategy, rnd, replies.ok, sizes=sizes, equal_weights=fed.weighting == "equal"
    )


def _round_record(
    rnd: int, stage: Stage, outcome: RoundOutcome, sites: dict[int, str], events: EventLog
) -> dict[str, Any]:
    """What the run history keeps of a round, by site name; one event per site asked."""

    def name(node: int) -> str:
        return sites.get(node, f"node-{node}")

    record: dict[str, Any] = {
        "round": rnd,
        "stage": stage,
        "replied": [name(n) for n in outcome.replied],
        "failed": {name(n): r for n, r in outcome.failed.items()},
        "dropped": {name(n): r for n, r in outcome.dropped.items()},
        # Used, but weighing only what the site's size reported before round 1 allows.
        "capped": {
            name(n): f"claimed {claimed:g} examples, capped at {cap:g}"
            for n, (claimed, cap) in outcome.capped.items()
        },
        "aggregated": outcome.aggregated,
        "train": dict(outcome.metrics or {}),
        # Local DP sites report their ledger's epsilon; an average of those would mean nothing.
        "site_epsilon": {
            name(n): m["epsilon"] for n, m in outcome.site_metrics.items() if "epsilon" in m
        },
        # Each site's own training time: the slowest one bounds the round (stragglers).
        "site_seconds": {
            name(n): m["seconds"] for n, m in outcome.site_metrics.items() if "seconds" in m
        },
    }
    for node in outcome.replied:
        m = outcome.site_metrics.get(node, {})
        events.emit("site_replied", round=rnd, site=name(node), loss=m.get("loss"),
                    epsilon=m.get("epsilon"), seconds=m.get("seconds"))  # fmt: skip
    for kind in ("failed", "dropped", "capped"):
        for site, reason in record[kind].items():
            events.emit(f"site_{kind}", level=WARNING, round=rnd, site=site, reason=reason)
    return record

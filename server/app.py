"""The ServerApp: pool feature moments, build the global model, run stage-1/2 rounds with a Flower
strategy (SecAgg+ via server/secagg.py), checkpoint every round for `--resume`. Malformed updates
are dropped before aggregation; central DP spending is accounted per round.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import tomllib
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from client.records import FROZEN, pack_config, pack_state, unpack_state
from hmgdm_core.config import HmgdmConfig, parse_section
from hmgdm_core.events import EVENTS_FILE, EventLog
from hmgdm_core.exceptions import ConfigError, HmgdmError
from hmgdm_core.federation_config import FederationConfig, Stage, shared_names
from hmgdm_core.privacy.config import CENTRAL_MODES
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted
from server.privacy import CentralAccountant
from server.secagg import secagg_train
from server.strategy import (
    RoundOutcome,
    aggregate_evaluate,
    aggregate_train,
    load_last_round,
    make_strategy,
    restore_strategy_state,
    save_round,
    strategy_state,
)
from server.summary import (
    STATUS_FAILED,
    RunFailed,
    mark_run,
    run_summary,
    untrained_reason,
    write_run_summary,
)

app = ServerApp()

# The first message: sites report input sizes and feature moments (routed to @app.query("stats")).
QUERY_STATS = f"{MessageType.QUERY}.stats"
FINAL_NAME = "final.pt"  # the trained global model; only a run that trained writes it


class FederationError(HmgdmError):
    """The federation cannot proceed: too few sites, mismatched sites, no usable replies."""


def run_config_to_cfg(run_config: dict[str, Any]) -> tuple[HmgdmConfig, Path, bool]:
    """The HmgdmConfig, run directory and resume flag a run was submitted with."""
    try:
        data = tomllib.loads(str(run_config.get("config-toml", "")))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"run config 'config-toml' is not valid TOML: {err}") from None
    cfg = parse_section(HmgdmConfig, data, "run config")
    run_dir = Path(str(run_config.get("run-dir") or cfg.federation.run_dir))
    return cfg, run_dir, bool(run_config.get("resume", False))


def site_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name the operator registered (or the id when unnamed, e.g. simulation)."""
    return {n.node_id: (getattr(n, "name", "") or f"node-{n.node_id}") for n in grid.get_nodes()}


def wait_for_sites(grid: Grid, minimum: int, timeout: float, poll: float) -> list[int]:
    """Connected node ids once at least `minimum` are online; a clear error after `timeout`."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of the required {minimum} sites connected within "
                f"{timeout:.0f} s; check that sites ran `hmgdm-client join` with a registered key"
            )
        time.sleep(poll)
    return nodes


def exchange(
    grid: Grid, messages: Iterable[Message], timeout: float, poll: float
) -> dict[int, Message]:
    """Push messages, pull replies until all arrived or `timeout`; node id -> its reply.

    Polls every `poll` s (Flower's send_and_receive sleeps 3 s between pulls). Replies are keyed
    by the node a message went to: an error the SuperLink writes for an unreachable node comes
    from the SuperLink's own node id, not from the site.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    pending = dict(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        if pending:
            time.sleep(poll)
    return replies


def _query_stats(grid: Grid, cfg: HmgdmConfig, nodes: list[int]) -> tuple[dict, dict]:
    """Input sizes (must agree) and summed feature moments: no site sends rows, only sums."""
    fed = cfg.federation
    msgs = [
        Message(RecordDict({"config": pack_config(cfg)}), dst_node_id=n, message_type=QUERY_STATS)
        for n in nodes
    ]
    replies = exchange(grid, msgs, fed.round_timeout_s, fed.poll_interval_s)
    ok = [m for m in replies.values() if not m.has_error()]
    for node, m in replies.items():
        if m.has_error():
            log(WARNING, "site %s could not report statistics: %s", node, m.error.reason)
    if len(ok) < fed.min_replies:
        raise FederationError(f"only {len(ok)} sites reported statistics, need {fed.min_replies}")
    dims = {k: int(v) for k, v in ok[0].content["dims"].items()}
    moments: dict[str, torch.Tensor] = {}
    for m in ok:
        site_dims = {k: int(v) for k, v in m.content["dims"].items()}
        if site_dims != dims:
            raise FederationError(
                f"site {m.metadata.src_node_id} has input sizes {site_dims}, another has {dims}; "
                "all sites must build graphs with the same graph config"
            )
        for k, v in unpack_state(m.content["moments"]).items():
            moments[k] = moments.get(k, 0) + v.double()
    return dims, moments


def initial_state(cfg: HmgdmConfig, dims: dict, moments: dict) -> dict[str, torch.Tensor]:
    """The global model before round 1: seeded init, standardised with the pooled moments."""
    from hmgdm_core.data import GraphDims, stats_from_moments
    from hmgdm_core.train import build_model

    model = build_model(cfg, GraphDims(**_dims_fields(dims)))
    model.stats.set(stats_from_moments(moments))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dims_fields(dims: dict) -> dict:
    return {**dims, "edge_windows": bool(dims["edge_windows"])}


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


def _with_frozen(messages: Iterable[Message], frozen: ArrayRecord) -> list[Message]:
    out = list(messages)
    for m in out:
        m.content[FROZEN] = frozen
    return out


def _run_round(
    grid: Grid,
    strategy: Strategy,
    cfg: HmgdmConfig,
    run_key: str,
    rnd: int,
    state: dict[str, torch.Tensor],
    events: EventLog,
    accountant: CentralAccountant | None = None,
) -> dict[str, Any]:
    """One training (+ evaluation) round; updates `state` in place when it is aggregated.

    With central DP, raises PrivacyBudgetExhausted before contacting any site when releasing
    this round's aggregate would exceed the run's max_epsilon.
    """
    fed, names = cfg.federation, list(state)
    stage = fed.stage_of(rnd)
    shared = shared_names(names, fed.shared_prefixes(stage))
    frozen = pack_state(state, frozen_names(fed, stage, names))
    _wait_for_round(grid, fed)
    if accountant is not None:
        accountant.check_budget(len(list(grid.get_node_ids())))
    sites = site_names(grid)
    events.emit("round_start", round=rnd, stage=stage, sites=sorted(sites.values()))
    t0 = time.monotonic()
    sent = pack_state(state, shared)
    config = pack_config(cfg, stage=stage, run=run_key)
    msgs = _with_frozen(strategy.configure_train(rnd, sent, config, grid), frozen)
    if cfg.privacy.secure_aggregation:
        outcome = secagg_train(grid, msgs, rnd, cfg, sent, exchange)
        replies = {}
    else:
        sent_to = [m.metadata.dst_node_id for m in msgs]
        replies = exchange(grid, msgs, fed.round_timeout_s, fed.poll_interval_s)
        outcome = aggregate_train(
            strategy, rnd, replies, sent_to, fed.min_replies, sent=sent, privacy=cfg.privacy
        )
    record = _round_record(rnd, stage, outcome, sites, events)
    record["bytes_down"] = sum(_array_bytes(m) for m in msgs)
    # SecAgg+ replies travel inside its workflow, uncounted here: bytes_up stays 0 then.
    record["bytes_up"] = sum(_array_bytes(m) for m in replies.values() if not m.has_error())
    if outcome.aggregated:
        state.update(unpack_state(outcome.arrays))
        if accountant is not None:
            eps = accountant.record_round(len(outcome.replied))
            record["central_dp"] = {"epsilon": eps, "delta": accountant.delta}
        if fed.evaluates(rnd):
            ev_msgs = _with_frozen(
                strategy.configure_evaluate(
                    rnd, pack_state(state, shared), pack_config(cfg, stage=stage, run=run_key), grid
                ),
                frozen,
            )
            ev_replies = exchange(grid, ev_msgs, fed.round_timeout_s, fed.poll_interval_s)
            if (ev := aggregate_evaluate(strategy, rnd, ev_replies)) is not None:
                record["eval"] = ev
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


def _array_bytes(msg: Message) -> int:
    """Bytes of model arrays a message carries (what dominates the traffic of a round)."""
    return sum(rec.count_bytes() for rec in msg.content.array_records.values())


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
    for kind, reasons in (("site_failed", record["failed"]), ("site_dropped", record["dropped"])):
        for site, reason in reasons.items():
            events.emit(kind, level=WARNING, round=rnd, site=site, reason=reason)
    return record


def save_final(path: Path, cfg: HmgdmConfig, dims: dict, state: dict, history: list) -> Path:
    """The global model as a regular hmgdm checkpoint, loadable by `hmgdm-client embed`."""
    from hmgdm_core.data import GraphDims
    from hmgdm_core.train import build_model, save_checkpoint

    model = build_model(cfg, GraphDims(**_dims_fields(dims)))
    model.load_state_dict(state)
    save_checkpoint(path, model=model, cfg=cfg, epoch=len(history), extra={"federation": history})
    return path


def _resume_config(submitted: HmgdmConfig, stored: dict, run_dir: Path) -> HmgdmConfig:
    """Resuming may change [federation] (more rounds, timeouts), never what shapes the model."""
    old = HmgdmConfig.model_validate(stored)
    for section in type(submitted).model_fields:
        if section != "federation" and getattr(old, section) != getattr(submitted, section):
            raise FederationError(
                f"{run_dir}: the run was started with a different [{section}] config; "
                "resume with the original config or start a new run directory"
            )
    return submitted


def _central_accountant(cfg: HmgdmConfig, ckpt: dict | None) -> CentralAccountant | None:
    """The central-DP accountant of a central-mode run, with the spending of resumed rounds."""
    if cfg.privacy.mode not in CENTRAL_MODES:
        return None
    # Every site trains every round: no subsampling amplification is claimed.
    sites = cfg.federation.min_sites
    accountant = CentralAccountant.from_config(
        cfg.privacy, sites_per_round=sites, total_sites=sites
    )
    if ckpt is not None:
        accountant.history = [tuple(step) for step in ckpt.get("central_dp_history", [])]
    return accountant


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the mode the run config names; its summary says whether it finished or why not."""
    run_config = dict(context.run_config)
    mode = str(run_config.get("mode", "pretrain"))
    cfg, run_dir, resume = run_config_to_cfg(run_config)
    events = EventLog(run_dir / EVENTS_FILE, log=log)
    mark_run(run_dir, mode, "running")
    try:
        if mode == "downstream":
            from server.downstream import run_downstream

            run_downstream(grid, context)
        elif mode == "survival-clinical":
            from server.survival import run_clinical_survival

            run_clinical_survival(grid, context)
        else:
            pretrain(grid, context, cfg, run_dir, resume, events)
    except Exception as err:
        # The run's own record says why it ended; Flower's log has the traceback.
        reason = str(err) if isinstance(err, HmgdmError) else f"{type(err).__name__}: {err}"
        events.emit("run_failed", level=ERROR, mode=mode, reason=reason)
        mark_run(run_dir, mode, STATUS_FAILED, reason)
        raise
    if mode != "pretrain":  # pretraining writes its own summary, rounds and all
        mark_run(run_dir, mode, "finished")


def pretrain(
    grid: Grid,
    context: Context,
    cfg: HmgdmConfig,
    run_dir: Path,
    resume: bool,
    events: EventLog,
) -> Path:
    """Stage-1 then stage-2 rounds from round 1 or after the last checkpoint; `final.pt`."""
    started = time.monotonic()
    ckpt = load_last_round(run_dir) if resume else None
    if ckpt is not None:
        cfg = _resume_config(cfg, ckpt["config"], run_dir)
    elif resume:
        log(WARNING, "--resume: no round checkpoint in %s yet, starting from round 1", run_dir)
    fed = cfg.federation
    # Built first: a privacy setting this server cannot honour is refused before sites wait.
    strategy = make_strategy(fed, cfg.privacy)
    accountant = _central_accountant(cfg, ckpt)
    events.emit("run_start", run_dir=str(run_dir), rounds=fed.total_rounds,
                resume_after=ckpt["round"] if ckpt else None)  # fmt: skip
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)
    events.emit("sites_connected", sites=sorted(site_names(grid).values()), count=len(nodes))
    if ckpt is not None:
        state, dims, history = ckpt["arrays"], ckpt["dims"], ckpt["history"]
        restore_strategy_state(strategy, ckpt["strategy"])
        start = ckpt["round"] + 1
    else:
        dims, moments = _query_stats(grid, cfg, nodes)
        state, history, start = initial_state(cfg, dims, moments), [], 1
    # Sites key their private checkpoint by this, so a resumed run finds its local weights.
    run_key = "run-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]

    def summarise(status: str, final: Path | None = None, reason: str | None = None) -> None:
        write_run_summary(run_dir, run_summary(
            history, status=status, run_dir=run_dir, rounds_planned=fed.total_rounds,
            wall_seconds=time.monotonic() - started, final=final, reason=reason,
        ))  # fmt: skip

    status = "finished"
    for rnd in range(start, fed.total_rounds + 1):
        try:
            history.append(_run_round(grid, strategy, cfg, run_key, rnd, state, events, accountant))
        except PrivacyBudgetExhausted as err:
            events.emit("privacy_budget_exhausted", level=WARNING, round=rnd, reason=str(err))
            status = f"stopped before round {rnd}: central DP budget spent"
            break
        payload = {
            "arrays": state,
            "dims": dims,
            "strategy": strategy_state(strategy),
            "central_dp_history": list(accountant.history) if accountant else [],
            "config": cfg.model_dump(mode="json"),
            "run_config": dict(context.run_config),
            "history": history,
        }
        path = save_round(run_dir, rnd, payload)
        summarise("running")
        events.emit("checkpoint", round=rnd, path=str(path))
    if (why := untrained_reason(history, fed)) is not None:
        # No final.pt: a site could take an untrained model for the consortium's encoder.
        (run_dir / FINAL_NAME).unlink(missing_ok=True)  # one left by an earlier run here
        summarise(STATUS_FAILED, reason=why)
        raise RunFailed(why)
    final = save_final(run_dir / FINAL_NAME, cfg, dims, state, history)
    summarise(status, final)
    events.emit("run_end", status=status, rounds=len(history), checkpoint=str(final),
                seconds=round(time.monotonic() - started, 1))  # fmt: skip
    return final

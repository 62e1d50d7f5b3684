"""Federated downstream runs of the ServerApp: the head's input standardisation from pooled
entity-embedding moments, FedAvg fine-tuning of the slide head (+ encoder) on every site's own
labels, then federated evaluation on every site's held-out patients.

The server receives model arrays, per-site metrics and counts only. It reports each site's
figures and the pooled ones: the count-weighted mean of classification metrics; for survival
the C-index of the summed concordance pair counts, i.e. pairs within a site (patients of two
different sites are never compared, so the pooled figure is not the C-index of the union).
Every reply is checked before use (server/replies.py), and a site weighs at most the labelled
slides it reported before fine-tuning.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from client.records import (
    EVALUATE_DOWNSTREAM,
    FROZEN,
    NUM_EXAMPLES,
    QUERY_ENTITY_MOMENTS,
    SHARED,
    TRAIN_FINETUNE,
    pack_config,
    pack_state,
    pack_task,
    unpack_state,
)
from hmgdm_core.atomic import write_json
from hmgdm_core.downstream.concordance import PairCounts
from hmgdm_core.downstream.finetune import Task, save_slide_net, slide_net_for
from hmgdm_core.events import EventLog
from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.train import load_checkpoint
from server.messaging import (
    FederationError,
    Replies,
    broadcast,
    wait_for_sites,
)
from server.replies import downstream_metrics, entity_moments
from server.run_config import DownstreamRun
from server.strategy import aggregate_train, make_strategy

PAIR_KEYS = ("concordant", "discordant", "tied-risk", "comparable")
RESULT_NAME = "downstream_metrics.json"
MODEL_NAME = "finetuned.pt"


def pooled_figures(task: Task, sites: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Pooled metrics from per-site replies: weighted means, or summed survival pair counts.

    A metric a site could not compute (e.g. AUC on a one-class test split) is left out of that
    metric's mean, and its weight with it.
    """
    if task.kind == "survival":
        total = sum(
            (PairCounts(*(int(m[k]) for k in PAIR_KEYS)) for m in sites.values()), PairCounts()
        )
        return {
            "cindex_pooled_pairs": total.cindex,
            **{k.replace("-", "_"): getattr(total, k.replace("-", "_")) for k in PAIR_KEYS},
            "patients": int(sum(m[NUM_EXAMPLES] for m in sites.values())),
            "events": int(sum(m["events"] for m in sites.values())),
            "cross_site_pairs": "not compared",
        }
    names = sorted({k for m in sites.values() for k in m} - {NUM_EXAMPLES})
    pooled: dict[str, Any] = {}
    for name in names:
        have = [m for m in sites.values() if name in m]
        weights = np.array([m[NUM_EXAMPLES] for m in have], dtype=float)
        pooled[name.replace("-", "_")] = float(np.average([m[name] for m in have], weights=weights))
    pooled["slides"] = int(sum(m[NUM_EXAMPLES] for m in sites.values()))
    return pooled


def site_figures(task: Task, metrics: dict[str, float]) -> dict[str, float]:
    """One site's reply as reported: its C-index from its own pair counts for survival."""
    out = {k.replace("-", "_"): v for k, v in metrics.items()}
    if task.kind == "survival":
        out["cindex"] = PairCounts(*(int(metrics[k]) for k in PAIR_KEYS)).cindex
    return out


def run_downstream(grid: Grid, run: DownstreamRun, events: EventLog) -> Path:
    """Fine-tune for `evaluation.fed_rounds` FedAvg rounds, evaluate, write metrics and model."""
    ckpt = load_checkpoint(run.checkpoint)
    # The backbone's shape is the checkpoint's; how to fine-tune and federate is this run's.
    cfg = ckpt.cfg.model_copy(
        update={k: getattr(run.cfg, k) for k in ("evaluation", "federation", "privacy")}
    )
    fed, ev = cfg.federation, cfg.evaluation
    task, task_entries = Task(run.task, run.classes), pack_task(run.task, run.classes)
    net = slide_net_for(cfg, ckpt.model.dims, task)
    net.backbone.load_state_dict(ckpt.model.state_dict())
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shared = [n for n, p in net.named_parameters() if p.requires_grad]
    # The diffusion decoder plays no part downstream: it never travels.
    frozen = [k for k in state if k not in shared and not k.startswith("backbone.decoder.")]
    strategy = make_strategy(fed, cfg.privacy)
    if cfg.privacy.secagg.enabled:
        # Refused rather than ignored: the sites' updates would reach the server unmasked.
        raise PrivacyError("[privacy.secagg] is not available for federated fine-tuning yet")
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)

    def content(rnd: int) -> RecordDict:
        config = pack_config(cfg, **task_entries, **{"server-round": rnd})
        arrays = {SHARED: pack_state(state, shared), FROZEN: pack_state(state, frozen)}
        return RecordDict({**arrays, "config": config})

    moments = broadcast(grid, QUERY_ENTITY_MOMENTS, content(0), fed, nodes)
    sizes = _standardise_head_input(net, moments, fed.min_replies)
    if fed.weighting == "equal":
        sizes = dict.fromkeys(sizes, 1)
    state.update({k: v.detach().clone() for k, v in net.state_dict().items() if k in frozen})
    history = []
    for rnd in range(1, ev.fed_rounds + 1):
        sent = content(rnd)
        replies = broadcast(grid, TRAIN_FINETUNE, sent, fed, nodes)
        outcome = aggregate_train(
            strategy, rnd, replies, fed.min_replies, sent=sent[SHARED], privacy=cfg.privacy,
            sizes=sizes,
        )  # fmt: skip
        if not outcome.aggregated:
            reasons = {replies.name(n): r for n, r in {**outcome.failed, **outcome.dropped}.items()}
            raise FederationError(f"fine-tuning round {rnd} not aggregated: {reasons}")
        state.update(unpack_state(outcome.arrays))
        history.append({"round": rnd, "train": dict(outcome.metrics or {})})
        log(INFO, "fine-tuning round %d: %s", rnd, history[-1]["train"])

    evaluated = broadcast(grid, EVALUATE_DOWNSTREAM, content(ev.fed_rounds), fed, nodes)
    per_site = _site_metrics(evaluated, task, sizes)
    result = {
        "task": task.kind,
        "classes": list(task.classes),
        "rounds": ev.fed_rounds,
        "encoder_trained": ev.finetune.train_encoder,
        "sites": {name: site_figures(task, m) for name, m in sorted(per_site.items())},
        "pooled": pooled_figures(task, per_site),
        "history": history,
    }
    net.load_state_dict(state)
    save_slide_net(run.run_dir / MODEL_NAME, net, cfg, task, ev)
    path = write_json(run.run_dir / RESULT_NAME, result, private=False)
    log(INFO, "federated %s: pooled %s", task.kind, result["pooled"])
    return path


def _site_metrics(replies: Replies, task: Task, sizes: dict[int, int]) -> dict[str, dict]:
    """Site name -> its checked held-out figures, weighing at most the labelled slides it
    reported (`sizes`; 1 each with weighting = "equal")."""
    checked = replies.parse(lambda r: downstream_metrics(r, task.kind))
    replies.warn_failed().require(1)
    floor = min(sizes.values())  # a site that sent no moments weighs as the smallest that did
    return {
        replies.name(node): m | {NUM_EXAMPLES: min(m[NUM_EXAMPLES], sizes.get(node, floor))}
        for node, m in checked.items()
    }


def _standardise_head_input(net, replies: Replies, minimum: int) -> dict[int, int]:
    """The head's input standardisation, from the sites' checked entity-embedding sums; each
    site's labelled slides (its weight cap) by node."""
    width = net.input_mean.numel()
    sums = replies.parse(lambda r: entity_moments(r, width))
    replies.warn_failed().require(minimum)
    net.set_input_stats(*(sum(m[i] for m in sums.values()) for i in range(3)))
    return {node: slides for node, (*_, slides) in sums.items()}

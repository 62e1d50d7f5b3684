"""Federated downstream runs of the ServerApp: the head's input standardisation from pooled
entity-embedding moments, FedAvg fine-tuning of the slide head (+ encoder) on every site's own
labels, then federated evaluation on every site's held-out patients.

The server receives model arrays, per-site metrics and counts only. It reports each site's
figures and the pooled ones: the count-weighted mean of classification metrics; for survival
the C-index of the summed concordance pair counts, i.e. pairs within a site (patients of two
different sites are never compared, so the pooled figure is not the C-index of the union).
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
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
from hmgdm_core.train import load_checkpoint
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


def run_downstream(grid: Grid, context: Context) -> Path:
    """Fine-tune for `evaluation.fed_rounds` FedAvg rounds, evaluate, write metrics and model."""
    from server.app import (
        FederationError,
        exchange,
        run_config_to_cfg,
        site_names,
        wait_for_sites,
    )

    run = dict(context.run_config)
    run_cfg, run_dir, _ = run_config_to_cfg(run)
    ckpt = load_checkpoint(Path(str(run["checkpoint"])))
    # The backbone's shape is the checkpoint's; how to fine-tune and federate is this run's.
    cfg = ckpt.cfg.model_copy(
        update={k: getattr(run_cfg, k) for k in ("evaluation", "federation", "privacy")}
    )
    fed, ev = cfg.federation, cfg.evaluation
    classes = [c for c in str(run.get("classes", "")).split(",") if c]
    task_entries = pack_task(str(run["task"]), classes)
    task = Task(task_entries["task"], tuple(c for c in task_entries["classes"].split(",") if c))
    net = slide_net_for(cfg, ckpt.model.dims, task)
    net.backbone.load_state_dict(ckpt.model.state_dict())
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shared = [n for n, p in net.named_parameters() if p.requires_grad]
    # The diffusion decoder plays no part downstream: it never travels.
    frozen = [k for k in state if k not in shared and not k.startswith("backbone.decoder.")]
    strategy = make_strategy(fed, cfg.privacy)
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)
    names = site_names(grid)
    history = []

    def messages(kind: str, rnd: int) -> list[Message]:
        config = pack_config(cfg, **task_entries, **{"server-round": rnd})
        content = {SHARED: pack_state(state, shared), FROZEN: pack_state(state, frozen)}
        return [
            Message(RecordDict({**content, "config": config}), dst_node_id=n, message_type=kind)
            for n in nodes
        ]

    # The head's input standardisation, from every site's entity-embedding sums.
    replies = exchange(
        grid, messages(QUERY_ENTITY_MOMENTS, 0), fed.round_timeout_s, fed.poll_interval_s
    )
    moments = [r for r in replies.values() if not r.has_error()]
    if len(moments) < fed.min_replies:
        raise FederationError(f"only {len(moments)} sites sent entity moments")
    sums = [unpack_state(r.content["moments"]) for r in moments]
    net.set_input_stats(
        sum(int(r.content["metrics"]["entities"]) for r in moments),
        sum(m["total"] for m in sums),
        sum(m["total_sq"] for m in sums),
    )
    state.update({k: v.detach().clone() for k, v in net.state_dict().items() if k in frozen})

    for rnd in range(1, ev.fed_rounds + 1):
        msgs = messages(TRAIN_FINETUNE, rnd)
        replies = exchange(grid, msgs, fed.round_timeout_s, fed.poll_interval_s)
        outcome = aggregate_train(
            strategy, rnd, replies, nodes, fed.min_replies, sent=msgs[0].content[SHARED]
        )
        if not outcome.aggregated:
            reasons = {names.get(n, n): r for n, r in {**outcome.failed, **outcome.dropped}.items()}
            raise FederationError(f"fine-tuning round {rnd} not aggregated: {reasons}")
        state.update(unpack_state(outcome.arrays))
        history.append({"round": rnd, "train": dict(outcome.metrics or {})})
        log(INFO, "fine-tuning round %d: %s", rnd, history[-1]["train"])

    replies = exchange(
        grid, messages(EVALUATE_DOWNSTREAM, ev.fed_rounds), fed.round_timeout_s, fed.poll_interval_s
    )
    per_site = {}
    for node, reply in replies.items():
        if reply.has_error():
            log(
                WARNING, "site %s could not evaluate: %s", names.get(node, node), reply.error.reason
            )
            continue
        per_site[names.get(node, f"node-{node}")] = dict(reply.content["metrics"])
    if not per_site:
        raise FederationError("no site returned evaluation metrics")
    result = {
        "task": task.kind,
        "classes": list(task.classes),
        "rounds": ev.fed_rounds,
        "encoder_trained": ev.finetune_encoder,
        "sites": {name: site_figures(task, m) for name, m in sorted(per_site.items())},
        "pooled": pooled_figures(task, per_site),
        "history": history,
    }
    net.load_state_dict(state)
    save_slide_net(run_dir / MODEL_NAME, net, cfg, task, ev)
    path = write_json(run_dir / RESULT_NAME, result, private=False)
    log(INFO, "federated %s: pooled %s", task.kind, result["pooled"])
    return path

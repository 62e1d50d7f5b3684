"""The pretraining handlers of the ClientApp: report feature moments (`query.stats`), train a
round of the stage the server asks for (`train`), evaluate held-out graphs (`evaluate`).

Under local DP a round is patient-level DP-SGD with the site's own settings and ledger; a site
whose budget is spent refuses (client/report.py answers with that category) and the server
goes on without it. Statistics and held-out losses answer within the site's disclosure policy.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch_geometric.data import Data

from client.guard import bounded, request_config, request_stage, server_round
from client.privacy import patient_table, site_local_dp
from client.records import SHARED, pack_metrics, pack_state, record_names
from client.site import Site, site_model
from hmgdm_core.atomic import save_torch
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.privacy.config import LocalDP


def _reply(msg: Message, metrics: MetricRecord, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": metrics})
    if arrays is not None:
        content[SHARED] = arrays
    return Message(content=content, reply_to=msg)


def stats(msg: Message, context: Context) -> Message:
    """Input sizes and per-column count/sum/sum-of-squares: what pooled standardisation needs."""
    from hmgdm_core.data import feature_moments, graph_dims, validate_graphs

    site = Site.from_context(context)
    graphs = site.graphs()
    validate_graphs(graphs, str(site.graphs_dir))
    guard = site.guard(context.run_id)
    guard.patients(site.patient_count(graphs), "feature moments")
    guard.query("stats")
    dims = {k: int(v) for k, v in asdict(graph_dims(graphs)).items()}
    content = RecordDict(
        {
            "dims": MetricRecord(dims),
            "moments": pack_state(feature_moments(graphs)),
            # The most this site may weigh in any round (the server caps num-examples by it).
            "metrics": MetricRecord({"graphs": len(graphs)}),
        }
    )
    return Message(content=content, reply_to=msg)


def _train_round(
    site: Site,
    model: torch.nn.Module,
    graphs: list[Data],
    cfg: HmgdmConfig,
    local_dp: LocalDP | None,
    config: ConfigRecord,
    shared: list[str],
) -> dict[str, float]:
    """The round's local training: DP-SGD under the site's ledger, or the plain training step;
    with FedProx's proximal term on the `shared` parameters when the strategy asks for it."""
    from hmgdm_core.train import (
        make_optimizer,
        model_objective,
        proximal,
        resolve_device,
        train_steps,
    )

    stage, rnd, fed = request_stage(config), server_round(config), cfg.federation
    generator = torch.Generator().manual_seed(cfg.train.seed * 100_003 + rnd)
    objective = model_objective(model, stage=stage, generator=generator)
    if mu := bounded(config.get("proximal-mu", 0.0), "proximal-mu", 0, 1e6):
        objective = proximal(objective, model, shared, mu)
    common = dict(
        stage=stage,
        steps=fed.local_steps,
        epochs=None if fed.local_steps else fed.local_epochs,
        device=resolve_device(),
        generator=generator,
        objective=objective,
    )
    optimizer = make_optimizer(model, cfg.train, stage)
    if local_dp is None:
        return train_steps(model, optimizer, graphs, cfg.train, **common)
    # Imported only here: opacus and scipy add seconds to every message's fresh process.
    from hmgdm_core.privacy.local import private_round

    metrics, _ = private_round(
        model, optimizer, graphs, cfg.train, local_dp, ledger_path=site.ledger, server_round=rnd,
        patients=patient_table(site.patients, graphs), **common,
    )  # fmt: skip
    # How many patients the Poisson draw picked is what dividing by the expected batch size
    # hides; the server gets the site's graph count as its weight instead.
    metrics.pop("num_patient_samples")
    return metrics | {"num_graphs": float(len(graphs))}


def train(msg: Message, context: Context) -> Message:
    """Local epochs/steps of the round's stage from the global weights; send the shared ones."""
    config = msg.content["config"]
    cfg, rnd = request_config(config), server_round(config)
    fed = cfg.federation
    site = Site.from_context(context)
    # A refusal (e.g. a spent budget) raises: report_mod answers with its category and the
    # server goes on without this site.
    local_dp = site_local_dp(site, cfg.privacy)
    graphs, _ = site.split(fed.eval_fraction, fed.seed)
    model = site_model(site, cfg, msg, graphs)
    shared = record_names(msg.content[SHARED])
    metrics = _train_round(site, model, graphs, cfg, local_dp, config, shared)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    num_graphs = int(metrics.pop("num_graphs"))
    # The full model stays here: unshared parts (e.g. the decoder) live only in this file,
    # next to a record of what this site contributed to the round.
    save_torch(
        {"model": state, "round": rnd, "stage": request_stage(config), "sent": shared,
         "num_examples": num_graphs},
        site.checkpoint(config.get("run")),
    )  # fmt: skip
    return _reply(msg, pack_metrics(metrics, num_graphs), pack_state(state, shared))


def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global model on held-out graphs (stage 2: masked reconstruction)."""
    from hmgdm_core.train import eval_loss, resolve_device

    config = msg.content["config"]
    cfg, stage = request_config(config), request_stage(config)
    fed = cfg.federation
    site = Site.from_context(context)
    train_graphs, held_out = site.split(fed.eval_fraction, fed.seed)
    if not held_out:
        raise GraphDataError(f"{site.graphs_dir}: no held-out graphs (eval_fraction is 0)")
    guard = site.guard(context.run_id)
    guard.patients(site.patient_count(held_out), "a held-out loss")
    guard.query("evaluate", guard.policy.max_evaluations_per_run)
    model = site_model(site, cfg, msg, train_graphs)
    metrics = eval_loss(
        model,
        held_out,
        cfg.train,
        stage=stage,
        device=resolve_device(),
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    num_graphs = int(metrics.pop("num_graphs"))
    return _reply(msg, pack_metrics(metrics, num_graphs))

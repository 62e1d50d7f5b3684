"""The ClientApp a site runs: report feature moments, train a round, evaluate held-out graphs.

Each handler unpacks arrays, builds the model from the server's config, loads this site's graphs,
calls `hmgdm_core`, and packs arrays + scalar metrics. Only names the server sent come back.
Under local DP a round is patient-level DP-SGD with the site's own settings and ledger; a site
whose budget is spent answers with an error saying so, and the server goes on without it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.constant import ErrorCode
from torch_geometric.data import Data

from client.faults import fault_mod
from client.privacy import PATIENTS_KEY, patient_table, privacy_mod, site_privacy
from client.records import (
    FROZEN,
    NUM_EXAMPLES,
    SHARED,
    load_into,
    pack_metrics,
    pack_state,
    record_names,
    unpack_config,
)
from client.secagg import secagg_mod
from hmgdm_core.atomic import load_torch, save_torch
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.events import EVENTS_FILE, EventLog
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.privacy.config import PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError


@dataclass(frozen=True)
class Site:
    """Where this site's graphs and its private checkpoints are (from the SuperNode's config)."""

    graphs_dir: Path
    state_dir: Path
    partition: tuple[int, int] | None = None  # (id, count) when simulating sites from one cache
    patients_csv: Path | None = None  # slide_id,patient_id: the privacy unit of local DP

    @classmethod
    def from_context(cls, context: Context) -> Site:
        node, run = context.node_config, context.run_config
        if "graphs-dir" in node:
            patients = node.get(PATIENTS_KEY)
            return cls(
                Path(str(node["graphs-dir"])),
                Path(str(node["state-dir"])),
                patients_csv=Path(str(patients)) if patients else None,
            )
        # Simulation: virtual SuperNodes get partition ids, the graphs come from the run config.
        if not run.get("sim-graphs-dir"):
            raise GraphDataError(
                "this SuperNode has no 'graphs-dir' in its node config; start it with "
                "`hmgdm-client join --graphs DIR`"
            )
        pid, n = int(node["partition-id"]), int(node["num-partitions"])
        state = Path(str(run.get("sim-state-dir") or "sim_sites")) / f"site-{pid}"
        return cls(Path(str(run["sim-graphs-dir"])), state, (pid, n))

    def graphs(self) -> list[Data]:
        return _load_graphs(self.graphs_dir, self.partition)

    def split(self, fraction: float, seed: int) -> tuple[list[Data], list[Data]]:
        """(train, held-out): whole slides are held out when the site has several."""
        graphs = self.graphs()
        slides = sorted({str(g.slide_id) for g in graphs})
        gen = torch.Generator().manual_seed(seed)
        if len(slides) >= 2:
            n_eval = max(1, round(fraction * len(slides))) if fraction > 0 else 0
            held = {slides[i] for i in torch.randperm(len(slides), generator=gen)[:n_eval]}
            return (
                [g for g in graphs if str(g.slide_id) not in held],
                [g for g in graphs if str(g.slide_id) in held],
            )
        n_eval = max(1, int(fraction * len(graphs))) if fraction > 0 and len(graphs) > 1 else 0
        held_idx = set(torch.randperm(len(graphs), generator=gen)[:n_eval].tolist())
        return (
            [g for i, g in enumerate(graphs) if i not in held_idx],
            [g for i, g in enumerate(graphs) if i in held_idx],
        )

    def checkpoint(self, run_key: str) -> Path:
        return self.state_dir / f"{run_key}.pt"

    @property
    def ledger(self) -> Path:
        """The site's privacy ledger: one per site, shared by all runs on the same data."""
        from hmgdm_core.privacy.ledger import LEDGER_NAME

        return self.state_dir / LEDGER_NAME


def event_mod(msg: Message, context: Context, call_next) -> Message:
    """One structured event per message this site handled: kind, round, outcome, seconds.

    Written to the SuperNode's log and to STATE_DIR/events.jsonl, so a site's IT team can see
    what the consortium asked of their machine without reading Flower's own logs.
    """
    t0 = time.monotonic()
    reply = call_next(msg, context)
    try:
        site = Site.from_context(context)
    except GraphDataError:
        return reply  # the handler has already answered with this error
    label = f"site-{site.partition[0]}" if site.partition else f"node-{context.node_id}"
    config = msg.content.config_records.get("config", {})
    metrics = {} if reply.has_error() else reply.content.metric_records.get("metrics", {})
    EventLog(site.state_dir / EVENTS_FILE, log=log, site=label).emit(
        "message",
        level=WARNING if reply.has_error() else INFO,
        type=msg.metadata.message_type,
        round=config.get("server-round"),
        status="error" if reply.has_error() else "ok",
        reason=reply.error.reason if reply.has_error() else None,
        loss=metrics.get("loss"),
        examples=metrics.get(NUM_EXAMPLES),
        seconds=round(time.monotonic() - t0, 2),
    )
    return reply


# secagg_mod first: a SecAgg+ round becomes a plain train message that privacy_mod then clips.
# fault_mod (simulation only) sits outside privacy_mod: a broken site skips the clipping too.
app = ClientApp(mods=[secagg_mod, fault_mod, privacy_mod, event_mod])


@functools.lru_cache(maxsize=4)
def _load_graphs(graphs_dir: Path, partition: tuple[int, int] | None) -> list[Data]:
    # Cached: simulation reuses its worker processes across rounds, so graphs load once.
    from hmgdm_core.graph.cache import load_graph_dir

    if partition is None:
        return load_graph_dir(graphs_dir)
    pid, n = partition
    own = Path(graphs_dir) / f"site-{pid}"
    if own.is_dir():
        # A study wrote each virtual site its own cache (label or quantity skew, stain shift).
        return load_graph_dir(own)
    graphs = load_graph_dir(graphs_dir)
    slides = sorted({str(g.slide_id) for g in graphs})
    if len(slides) >= n:
        mine = set(slides[pid::n])
        return [g for g in graphs if str(g.slide_id) in mine]
    return graphs[pid::n]


def _site_model(site: Site, cfg: HmgdmConfig, msg: Message, graphs: list[Data]):
    """This site's model: its own last weights for what is not shared, the server's for the rest."""
    from hmgdm_core.data import graph_dims
    from hmgdm_core.train import build_model

    model = build_model(cfg, graph_dims(graphs))
    path = site.checkpoint(str(msg.content["config"]["run"]))
    if path.exists():
        model.load_state_dict(load_torch(path)["model"])
    records = [msg.content[k] for k in (SHARED, FROZEN) if k in msg.content.array_records]
    load_into(model, *records)
    return model


def _add_proximal_term(model: torch.nn.Module, mu: float, names: set[str]) -> None:
    """FedProx: loss + mu/2 * ||w - w_global||^2 over the shared parameters."""
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    base = model.loss

    def loss(batch, **kwargs):
        terms = base(batch, **kwargs)
        prox = sum((p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor)
        terms["loss"] = terms["loss"] + 0.5 * mu * prox
        terms["proximal"] = torch.as_tensor(prox).detach()
        return terms

    model.loss = loss


def _reply(msg: Message, metrics: MetricRecord, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": metrics})
    if arrays is not None:
        content[SHARED] = arrays
    return Message(content=content, reply_to=msg)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Input sizes and per-column count/sum/sum-of-squares: what pooled standardisation needs."""
    from hmgdm_core.data import feature_moments, graph_dims, validate_graphs

    site = Site.from_context(context)
    graphs = site.graphs()
    validate_graphs(graphs, str(site.graphs_dir))
    dims = {k: int(v) for k, v in asdict(graph_dims(graphs)).items()}
    content = RecordDict(
        {
            "dims": MetricRecord(dims),
            "moments": pack_state(feature_moments(graphs)),
        }
    )
    return Message(content=content, reply_to=msg)


def _train_round(
    site: Site,
    model: torch.nn.Module,
    graphs: list[Data],
    cfg: HmgdmConfig,
    privacy: PrivacyConfig,
    config: ConfigRecord,
) -> dict[str, float]:
    """The round's local training: DP-SGD under the site's ledger, or the plain training step."""
    from hmgdm_core.train import make_optimizer, resolve_device, train_steps

    stage, rnd, fed = str(config["stage"]), int(config["server-round"]), cfg.federation
    common = dict(
        stage=stage,
        steps=fed.local_steps,
        epochs=None if fed.local_steps else fed.local_epochs,
        device=resolve_device(),
        generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + rnd),
    )
    optimizer = make_optimizer(model, cfg.train, stage)
    if privacy.mode != "local_dp":
        return train_steps(model, optimizer, graphs, cfg.train, **common)
    # Imported only here: opacus and scipy add seconds to every message's fresh process.
    from hmgdm_core.privacy.local import private_round

    metrics, _ = private_round(
        model, optimizer, graphs, cfg.train, privacy, ledger_path=site.ledger, server_round=rnd,
        patients=patient_table(site.patients_csv, graphs), **common,
    )  # fmt: skip
    # How many patients the Poisson draw picked is what dividing by the expected batch size
    # hides; the server gets the site's graph count as its weight instead.
    metrics.pop("num_patient_samples")
    return metrics | {"num_graphs": float(len(graphs))}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs/steps of the round's stage from the global weights; send the shared ones."""
    config = msg.content["config"]
    cfg, rnd = unpack_config(config), int(config["server-round"])
    fed = cfg.federation
    site = Site.from_context(context)
    try:
        privacy = site_privacy(
            dict(context.node_config), cfg.privacy, simulated=site.partition is not None
        )
        graphs, _ = site.split(fed.eval_fraction, fed.seed)
        model = _site_model(site, cfg, msg, graphs)
        shared = record_names(msg.content[SHARED])
        if float(config.get("proximal-mu", 0.0)) > 0:
            _add_proximal_term(model, float(config["proximal-mu"]), set(shared))
        metrics = _train_round(site, model, graphs, cfg, privacy, config)
    except PrivacyError as err:
        # An error reply, not an exception: the server logs the reason and goes on without us.
        log(WARNING, "round %d: not training: %s", rnd, err)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err))
        return Message(error, reply_to=msg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    num_graphs = int(metrics.pop("num_graphs"))
    # The full model stays here: unshared parts (e.g. the decoder) live only in this file,
    # next to a record of what this site contributed to the round.
    save_torch(
        {"model": state, "round": rnd, "stage": str(config["stage"]), "sent": shared,
         "num_examples": num_graphs},
        site.checkpoint(str(config["run"])),
    )  # fmt: skip
    return _reply(msg, pack_metrics(metrics, num_graphs), pack_state(state, shared))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global model on held-out graphs (stage 2: masked reconstruction)."""
    from hmgdm_core.train import eval_loss, resolve_device

    config = msg.content["config"]
    cfg, stage = unpack_config(config), str(config["stage"])
    fed = cfg.federation
    site = Site.from_context(context)
    train_graphs, held_out = site.split(fed.eval_fraction, fed.seed)
    if not held_out:
        raise GraphDataError(f"{site.graphs_dir}: no held-out graphs (eval_fraction is 0)")
    model = _site_model(site, cfg, msg, train_graphs)
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


# Registers the downstream handlers (train.finetune, evaluate.downstream, query.cox) on `app`.
from client import downstream as _downstream  # noqa: E402, F401
from client import survival as _survival  # noqa: E402, F401

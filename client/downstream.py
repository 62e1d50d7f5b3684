"""Federated downstream handlers of the ClientApp: entity-embedding moments for the head's input
standardisation (`query.entity_moments`), fine-tune the slide head on this site's own labels
(`train.finetune`) and evaluate the global head on this site's held-out patients
(`evaluate.downstream`). Replies carry model arrays and scalars only: metrics, counts and, for
survival, the concordance pair counts of the site's own patients; statistics and metrics only
within the site's disclosure policy, trained weights never from a local-DP site (no DP path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.guard import request_config, server_round
from client.privacy import site_local_dp
from client.records import (
    FROZEN,
    SHARED,
    load_into,
    pack_metrics,
    pack_state,
    record_names,
    unpack_task,
)
from client.site import Site
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.downstream.finetune import Bag, Task
from hmgdm_core.downstream.labels import Labels
from hmgdm_core.exceptions import LabelError
from hmgdm_core.privacy.errors import PrivacyError


def task_from_config(config: ConfigRecord) -> Task:
    return Task(*unpack_task(config))


@dataclass(frozen=True)
class SiteCohort:
    """This site's labelled slides split by patient: train rows and held-out test rows."""

    bags: list[Bag]
    labels: Labels
    train: np.ndarray
    test: np.ndarray

    def patients(self, rows: np.ndarray) -> int:
        """Distinct patients among `rows` of the table."""
        return len(set(self.labels.groups[rows].tolist()))

    def target(self, task: Task) -> np.ndarray:
        t = self.labels.table
        if task.kind == "classification":
            # The consortium's class order (as the operator listed it) is the head's output order.
            index = {c: i for i, c in enumerate(task.classes)}
            return np.array([index[c] for c in t["label"]], dtype=np.int64)
        return np.stack([t["time"].to_numpy(float), t["event"].to_numpy(float)], axis=1)


def site_cohort(site: Site, cfg: HmgdmConfig, task: Task) -> SiteCohort:
    """Read the site's labels, keep the site's own slides, and hold out the first
    patient-grouped fold for evaluation."""
    from hmgdm_core.downstream.labels import read_labels
    from hmgdm_core.downstream.splits import patient_folds

    if site.labels is None:
        raise LabelError(
            "this site has no labels: start it with `hmgdm-client join --labels labels.csv`"
        )
    by_slide: dict[str, list] = {}
    for g in site.graphs():
        by_slide.setdefault(str(g.slide_id), []).append(g)
    labels = read_labels(
        site.labels,
        by_slide,
        n_folds=cfg.evaluation.folds,
        task=task.kind,
        id_column=site.labels_id_column,
        patient_column=site.labels_patient_column,
        only_known=site.partition is not None,
    )
    if task.kind == "classification":
        unknown = set(labels.table["label"]) - set(task.classes)
        if unknown:
            raise LabelError(f"{site.labels}: classes {sorted(unknown)} are not the consortium's")
    train, test = patient_folds(
        labels.strata, labels.groups, cfg.evaluation.folds, cfg.evaluation.seed
    )[0]
    return SiteCohort([by_slide[s] for s in labels.table["slide_id"]], labels, train, test)


def _site_net(msg: Message, context: Context):
    config = msg.content["config"]
    cfg, task = request_config(config), task_from_config(config)
    site = Site.from_context(context)
    cohort = site_cohort(site, cfg, task)
    from hmgdm_core.data import graph_dims
    from hmgdm_core.downstream.finetune import slide_net_for

    net = slide_net_for(cfg, graph_dims([g for bag in cohort.bags for g in bag]), task)
    load_into(net, *(msg.content[k] for k in (SHARED, FROZEN) if k in msg.content.array_records))
    return cfg, task, cohort, net


def _guard(context: Context):
    return Site.from_context(context).guard(context.run_id)


def entity_moments(msg: Message, context: Context) -> Message:
    """Count, sum and sum of squares of the global encoder's entity embeddings over this
    site's training patients: the server pools them into the head's input standardisation."""
    _, _, cohort, net = _site_net(msg, context)
    guard = _guard(context)
    guard.patients(cohort.patients(cohort.train), "entity-embedding moments")
    guard.query("entity-moments")
    n, total, total_sq = net.entity_moments([cohort.bags[i] for i in cohort.train])
    content = RecordDict(
        {
            # Its labelled slides: the most this site may weigh in fine-tuning and evaluation.
            "metrics": MetricRecord({"entities": n, "slides": len(cohort.bags)}),
            "moments": pack_state({"total": total, "total_sq": total_sq}),
        }
    )
    return Message(content=content, reply_to=msg)


def finetune(msg: Message, context: Context) -> Message:
    """Local epochs of the slide head (+ encoder) on this site's training patients."""
    from hmgdm_core.downstream.finetune import (
        class_weights,
        make_optimizer,
        targets_tensor,
        train_epochs,
    )

    site, run_privacy = Site.from_context(context), request_config(msg.content["config"]).privacy
    if site_local_dp(site, run_privacy) is not None:
        # Trained weights leave only under the site's DP and ledger; fine-tuning has no DP-SGD
        # path yet (the deep Cox loss couples patients), so a local-DP site refuses it.
        raise PrivacyError(
            "fine-tuning under this site's local DP is not supported; it sends no trained "
            "weights outside DP-SGD rounds"
        )
    cfg, task, cohort, net = _site_net(msg, context)
    ev, rnd = cfg.evaluation, server_round(msg.content["config"])
    y = cohort.target(task)[cohort.train]
    weight = class_weights(y, task.out_channels) if task.kind == "classification" else None
    loss = train_epochs(
        net, make_optimizer(net, ev), [cohort.bags[i] for i in cohort.train],
        targets_tensor(task, y), task, ev, epochs=ev.fed_local_epochs,
        generator=torch.Generator().manual_seed(ev.seed * 100_003 + rnd), weight=weight,
    )  # fmt: skip
    state = net.state_dict()
    content = RecordDict(
        {
            "metrics": pack_metrics({"loss": loss}, len(cohort.train)),
            SHARED: pack_state(state, record_names(msg.content[SHARED])),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate_downstream(msg: Message, context: Context) -> Message:
    """The global head on this site's held-out patients: classification metrics, or the
    concordance pair counts of the site's own patients (pooled by summing at the server).
    Writes the per-slide predictions (and ROC curves) to the site's own state directory."""
    from hmgdm_core.downstream.classify import (
        classification_metrics,
        predictions_table,
        write_predictions,
    )
    from hmgdm_core.downstream.concordance import pair_counts
    from hmgdm_core.downstream.finetune import predict

    _, task, cohort, net = _site_net(msg, context)
    test = cohort.test
    guard = _guard(context)
    guard.patients(cohort.patients(test), "held-out metrics")
    guard.query("evaluate-downstream", guard.policy.max_evaluations_per_run)
    out = predict(net, [cohort.bags[i] for i in test])
    y = cohort.target(task)[test]
    rows = cohort.labels.table.iloc[test]
    site_dir = Site.from_context(context).state / "downstream" / f"run-{context.run_id}"
    if task.kind == "classification":
        proba = torch.softmax(out, dim=1).double().numpy()
        metrics = classification_metrics(y, proba, np.arange(len(task.classes)))
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        classes = np.asarray(task.classes)
        columns = {f"p_{c}": proba[:, k] for k, c in enumerate(classes)}
        columns = {"truth": classes[y], "prediction": classes[proba.argmax(1)], **columns}
    else:
        risk = out[:, 0].double().numpy()
        counts = pair_counts(y[:, 0], risk, y[:, 1])
        metrics = {**vars(counts), "events": float(y[:, 1].sum())}
        classes, columns = None, {"time": y[:, 0], "event": y[:, 1].astype(int), "risk": risk}
    # Per-slide predictions stay on this site's disk, for its own pathologists; only the
    # scalar metrics above are sent.
    table = predictions_table(rows["slide_id"], rows["patient_id"], "held-out", **columns)
    write_predictions(site_dir, table, classes)
    reply = RecordDict({"metrics": pack_metrics(metrics, len(test))})
    return Message(content=reply, reply_to=msg)

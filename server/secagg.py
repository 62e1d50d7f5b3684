"""SecAgg+ training rounds: the round's train messages run through Flower's SecAggPlusWorkflow
(legacy fit records, `client.secagg` on the sites), so the server learns only the weighted mean
of the sites' updates, never one site's update. Central noise comes from Flower's legacy wrapper.
"""

from __future__ import annotations

import json
from logging import INFO
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from client.records import FROZEN, NUM_EXAMPLES, SECAGG_NAMES, SECAGG_NUM_SHARED, SHARED
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.config import CENTRAL_MODES, UNIFORM_WEIGHT_KEY, PrivacyConfig
from server.messaging import exchange
from server.strategy import RoundOutcome


def max_weight(privacy: PrivacyConfig) -> float:
    """The protocol's weight bound: central modes weight every site 1, so nothing is lost to it."""
    return 1.0 if privacy.mode in CENTRAL_MODES else privacy.secagg.max_weight


def workflow(privacy: PrivacyConfig, timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the [privacy] protocol settings (modulus 2**32)."""
    return SecAggPlusWorkflow(
        num_shares=float(privacy.secagg.share_fraction),
        reconstruction_threshold=float(privacy.secagg.threshold),
        max_weight=max_weight(privacy),
        clipping_range=privacy.secagg.clipping_range,
        quantization_range=privacy.secagg.quantization_range,
        timeout=timeout,
    )


class _Prepared(LegacyFedAvg):
    """A legacy strategy that hands the workflow the round's fit instructions and keeps what it
    aggregates: every result already carries the unmasked mean, so it is returned as is."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]) -> None:
        super().__init__(accept_failures=True)
        self.instructions = instructions
        self.results: list[tuple[GridClientProxy, Any]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


class _Transport:
    """The Grid as the workflow sees it: our polling `exchange`, each site's error kept."""

    def __init__(self, grid: Grid, fed: FederationConfig) -> None:
        self.grid, self.fed = grid, fed
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        timeout = self.fed.round_timeout_s if timeout is None else timeout
        replies = exchange(self.grid, list(messages), timeout, self.fed.poll_interval_s)
        for node, reply in replies.items():
            if reply.has_error():
                self.errors[node] = reply.error.reason
        return list(replies.values())

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


def _fitins(content: RecordDict) -> FitIns:
    """The round's train message as legacy fit instructions: shared then frozen arrays, the
    names in the config (legacy arrays have none)."""
    shared, frozen = content[SHARED], content[FROZEN]
    names = [*shared.keys(), *frozen.keys()]
    arrays = [r[n].numpy() for r in (shared, frozen) for n in r]
    config = dict(content["config"])
    config[SECAGG_NAMES] = json.dumps(names)
    config[SECAGG_NUM_SHARED] = len(shared)
    return FitIns(ndarrays_to_parameters(arrays), config)


def secagg_train(
    grid: Grid,
    content: RecordDict,
    nodes: list[int],
    server_round: int,
    cfg: HmgdmConfig,
    sent: ArrayRecord,
) -> RoundOutcome:
    """One training round under SecAgg+; the outcome has no per-site updates to validate.

    `content` is the strategy's train message to `nodes` (its config carries what the strategy
    and a client-side DP wrapper add); the aggregate is `sent` plus the mean update, with central
    noise in mode client_central. Fewer than `min_replies` unmasked updates: not aggregated.
    """
    privacy, fed = cfg.privacy, cfg.federation
    instructions = [(GridClientProxy(node, grid, 0), _fitins(content)) for node in nodes]
    prepared = _Prepared(instructions)
    strategy = prepared
    if privacy.mode == "client_central":
        # Every site trains every round: the noise is scaled for min_sites updates.
        strategy = DifferentialPrivacyClientSideFixedClipping(
            prepared, privacy.central.noise_multiplier, privacy.central.clip_norm, fed.min_sites
        )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    transport = _Transport(grid, fed)
    workflow(privacy, fed.round_timeout_s)(transport, context)

    replied = sorted(proxy.node_id for proxy, _ in prepared.results)
    failed = {
        proxy.node_id: transport.errors.get(proxy.node_id, "dropped out of secure aggregation")
        for proxy, _ in instructions
        if proxy.node_id not in replied
    }
    site_metrics = {
        proxy.node_id: {k: float(v) for k, v in res.metrics.items() if _is_number(v)}
        for proxy, res in prepared.results
    }
    outcome = RoundOutcome(None, None, replied, failed, {}, site_metrics)
    total = context.state.array_records[MAIN_PARAMS_RECORD]
    if len(replied) < fed.min_replies or not len(total):
        return outcome
    mean_update = parameters_to_ndarrays(arrayrecord_to_parameters(total, keep_input=True))
    outcome.arrays = ArrayRecord(
        {
            name: Array((ref.numpy() + update).astype(ref.numpy().dtype))
            for (name, ref), update in zip(sent.items(), mean_update, strict=True)
        }
    )
    outcome.metrics = _mean_metrics(prepared.results, privacy)
    log(INFO, "round %d: SecAgg+ mean of %d masked updates", server_round, len(replied))
    return outcome


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mean_metrics(results: list, privacy: PrivacyConfig) -> MetricRecord:
    """The sites' clear-text train metrics averaged with the weights SecAgg+ used."""
    key = UNIFORM_WEIGHT_KEY if privacy.mode in CENTRAL_MODES else NUM_EXAMPLES
    records = [
        {k: v for k, v in res.metrics.items() if _is_number(v)} | {key: res.num_examples}
        for _, res in results
    ]
    common = set.intersection(*(set(r) for r in records))
    return aggregate_metricrecords(
        [RecordDict({"metrics": MetricRecord({k: r[k] for k in common})}) for r in records], key
    )

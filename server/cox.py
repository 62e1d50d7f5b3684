"""Federated Cox on the sites' clinical tables, run by the ServerApp (mode "survival-clinical"):
`query.cox` messages gather covariate moments, then per-site gradient/Hessian sums for each
exact Newton step, then the final model's pair counts and life tables; the report is written
from those sums (`hmgdm_core.downstream.fedsurvival`). Every site must answer every phase:
a sum without one site would be a different model, so a missing site stops the run, and so
does a reply that does not check out (shapes, finiteness, counts that add up). A site may
withhold its life tables (its disclosure policy): the KM then pools the sites that sent them.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from client.records import COX_ARRAYS as ARRAYS
from client.records import QUERY_COX, pack_arrays
from hmgdm_core.downstream.concordance import PairCounts
from hmgdm_core.downstream.fedcox import CoxStats, FederatedCox, Moments
from hmgdm_core.downstream.fedsurvival import GROUPS, SiteEvaluation, write_survival_report
from hmgdm_core.downstream.tcga import COVARIATES
from hmgdm_core.events import EventLog
from server.messaging import broadcast, wait_for_sites
from server.replies import InvalidReply, array, count, metric
from server.run_config import SurvivalRun

TIES = "efron"
PAIR_FIELDS = ("concordant", "discordant", "tied_risk", "comparable")
D = len(COVARIATES)
MAX_BINS = 100_000  # no honest site's life table is longer (a site allows at most max_bins)
T = TypeVar("T")


def run_clinical_survival(grid: Grid, run: SurvivalRun, events: EventLog) -> Path:
    """Fit, evaluate and report; returns the run directory's metrics.json."""
    fed, bin_width = run.cfg.federation, run.km_bin_width
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)
    sim_names = run.sim.names if run.sim else ()

    def ask(phase: str, parse: Callable[[Message], T], **arrays: np.ndarray) -> dict[str, T]:
        """Every site's checked reply to one phase, by site name; any error, silence or
        invalid reply stops the run."""
        content = RecordDict(
            {"config": ConfigRecord({"phase": phase, "ties": TIES, "bin-width": bin_width})}
        )
        if arrays:
            content[ARRAYS] = pack_arrays(arrays)
        replies = broadcast(grid, QUERY_COX, content, fed, nodes)
        parsed = replies.parse(parse)
        replies.require(what=f"federated Cox, phase {phase}")
        by_name = {}
        for node, value in parsed.items():
            pid = replies.ok[node].content["metrics"].get("partition-id")
            valid = isinstance(pid, int) and 0 <= pid < len(sim_names)
            by_name[sim_names[pid] if valid else replies.name(node)] = value
        return by_name

    moments = sum(ask("moments", _moments).values(), Moments(0, 0.0, 0.0))

    def summed_stats(beta: np.ndarray) -> CoxStats:
        stats = list(ask("newton", _stats, beta=beta, mean=model.mean_, std=model.std_).values())
        return sum(stats[1:], stats[0])

    model = FederatedCox(ties=TIES)
    model.fit_stats(moments, summed_stats)
    log(INFO, "federated Cox: %d Newton rounds, coefficients %s", model.rounds_, model.params_)
    evaluations = dict(
        sorted(ask("evaluate", _evaluation, params=model.params_, center=model.mean_).items())
    )
    write_survival_report(
        model, evaluations, run.run_dir, covariates=COVARIATES, bin_width=bin_width
    )
    return run.run_dir / "metrics.json"


def _moments(reply: Message) -> Moments:
    arrays = reply.content.array_records.get(ARRAYS, {})
    total, total_sq = (array(arrays, k, (D,)) for k in ("total", "total_sq"))
    if (total_sq < 0).any():
        raise InvalidReply("a negative sum of squares")
    return Moments(count(reply.content["metrics"], "patients"), total, total_sq)


def _stats(reply: Message) -> CoxStats:
    m, arrays = reply.content["metrics"], reply.content.array_records.get(ARRAYS, {})
    return CoxStats(
        count(m, "patients"),
        metric(m, "loglik", high=1e-9),  # a log partial likelihood is never positive
        array(arrays, "gradient", (D,)),
        array(arrays, "hessian", (D, D)),
    )


def _evaluation(reply: Message) -> SiteEvaluation:
    m = reply.content["metrics"]
    patients = count(m, "patients")
    counts = PairCounts(*(count(m, k.replace("_", "-")) for k in PAIR_FIELDS))
    if counts.concordant + counts.discordant + counts.tied_risk != counts.comparable or (
        counts.comparable > patients * (patients - 1) // 2
    ):
        raise InvalidReply(f"pair counts {counts} do not add up for {patients} patients")
    tables = {}
    if count(m, "life-tables", high=1):
        arrays = reply.content.array_records.get(ARRAYS, {})
        tables = {
            g: array(arrays, g.replace(" ", "-"), (2, None), nonnegative=True, integer=True)
            for g in GROUPS
        }
        if sum(int(t.sum()) for t in tables.values()) != patients or any(
            not 1 <= t.shape[1] <= MAX_BINS for t in tables.values()
        ):
            raise InvalidReply(f"life tables do not hold its {patients} patients")
    return SiteEvaluation(patients, count(m, "events", high=patients), counts, tables)

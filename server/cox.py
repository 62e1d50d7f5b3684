"""Federated Cox on the sites' clinical tables, run by the ServerApp (mode "survival-clinical"):
`query.cox` messages gather covariate moments, then per-site gradient/Hessian sums for each
exact Newton step, then the final model's pair counts and life tables; the report is written
from those sums (`hmgdm_core.downstream.fedsurvival`). Every site must answer every phase:
a sum without one site would be a different model, so a missing site stops the run.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from client.records import COX_ARRAYS as ARRAYS
from client.records import QUERY_COX, pack_arrays, unpack_float64
from hmgdm_core.downstream.concordance import PairCounts
from hmgdm_core.downstream.fedcox import CoxStats, FederatedCox, Moments
from hmgdm_core.downstream.fedsurvival import GROUPS, SiteEvaluation, write_survival_report
from hmgdm_core.downstream.tcga import COVARIATES
from hmgdm_core.events import EventLog
from server.messaging import broadcast, wait_for_sites
from server.run_config import SurvivalRun

TIES = "efron"
PAIR_FIELDS = ("concordant", "discordant", "tied_risk", "comparable")


def run_clinical_survival(grid: Grid, run: SurvivalRun, events: EventLog) -> Path:
    """Fit, evaluate and report; returns the run directory's metrics.json."""
    fed, bin_width = run.cfg.federation, run.km_bin_width
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)
    sim_names = run.sim.names if run.sim else ()

    def ask(phase: str, **arrays: np.ndarray) -> dict[str, Message]:
        """Every site's reply to one phase, by site name; any error or silence stops the run."""
        content = RecordDict(
            {"config": ConfigRecord({"phase": phase, "ties": TIES, "bin-width": bin_width})}
        )
        if arrays:
            content[ARRAYS] = pack_arrays(arrays)
        replies = broadcast(grid, QUERY_COX, content, fed, nodes)
        by_name = {}
        for name, reply in replies.require(what=f"federated Cox, phase {phase}").by_name.items():
            pid = reply.content["metrics"].get("partition-id")
            by_name[sim_names[int(pid)] if pid is not None and sim_names else name] = reply
        return by_name

    replies = ask("moments").values()
    moments = sum(
        (Moments(int(r.content["metrics"]["patients"]),
                 *unpack_float64(r.content[ARRAYS], "total", "total_sq")) for r in replies),
        Moments(0, 0.0, 0.0),
    )  # fmt: skip

    def summed_stats(beta: np.ndarray) -> CoxStats:
        replies = ask("newton", beta=beta, mean=model.mean_, std=model.std_).values()
        stats = [
            CoxStats(int(r.content["metrics"]["patients"]), float(r.content["metrics"]["loglik"]),
                     *unpack_float64(r.content[ARRAYS], "gradient", "hessian"))
            for r in replies
        ]  # fmt: skip
        return sum(stats[1:], stats[0])

    model = FederatedCox(ties=TIES)
    model.fit_stats(moments, summed_stats)
    log(INFO, "federated Cox: %d Newton rounds, coefficients %s", model.rounds_, model.params_)
    evaluations = {
        name: _evaluation(reply)
        for name, reply in sorted(ask("evaluate", params=model.params_, center=model.mean_).items())
    }
    write_survival_report(
        model, evaluations, run.run_dir, covariates=COVARIATES, bin_width=bin_width
    )
    return run.run_dir / "metrics.json"


def _evaluation(reply: Message) -> SiteEvaluation:
    m = reply.content["metrics"]
    counts = PairCounts(*(int(m[k.replace("_", "-")]) for k in PAIR_FIELDS))
    tables = {
        g: reply.content[ARRAYS][g.replace(" ", "-")].numpy().astype(np.int64) for g in GROUPS
    }
    return SiteEvaluation(int(m["patients"]), int(m["events"]), counts, tables)

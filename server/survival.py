"""Federated Cox on the sites' clinical tables, run by the ServerApp (mode "survival-clinical"):
`query.cox` messages gather covariate moments, then per-site gradient/Hessian sums for each
exact Newton step, then the final model's pair counts and life tables; the report is written
from those sums (`hmgdm_core.downstream.fedsurvival`). Every site must answer every phase:
a sum without one site would be a different model, so a missing site stops the run.
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from client.records import COX_ARRAYS as ARRAYS
from client.records import QUERY_COX, pack_arrays, unpack_float64
from hmgdm_core.downstream.concordance import PairCounts
from hmgdm_core.downstream.fedcox import CoxStats, FederatedCox, Moments
from hmgdm_core.downstream.fedsurvival import GROUPS, SiteEvaluation, write_survival_report
from hmgdm_core.downstream.tcga import COVARIATES

TIES = "efron"
PAIR_FIELDS = ("concordant", "discordant", "tied_risk", "comparable")


def run_clinical_survival(grid: Grid, context: Context) -> Path:
    """Fit, evaluate and report; returns the run directory's metrics.json."""
    from server.app import FederationError, exchange, run_config_to_cfg, site_names, wait_for_sites

    run = dict(context.run_config)
    cfg, run_dir, _ = run_config_to_cfg(run)
    fed = cfg.federation
    bin_width = float(run.get("km-bin-width", 1.0))
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)
    names = site_names(grid)
    sim_names = [n for n in str(run.get("sim-site-names", "")).split(",") if n]

    def ask(phase: str, **arrays: np.ndarray) -> dict[str, Message]:
        """Every site's reply to one phase, by site name; any error or silence stops the run."""
        content = {"config": ConfigRecord({"phase": phase, "ties": TIES, "bin-width": bin_width})}
        if arrays:
            content[ARRAYS] = pack_arrays(arrays)
        msgs = [Message(RecordDict(content), dst_node_id=n, message_type=QUERY_COX) for n in nodes]
        replies = exchange(grid, msgs, fed.round_timeout_s, fed.poll_interval_s)
        failed = {
            names.get(n, n): (replies[n].error.reason if n in replies else "no reply")
            for n in nodes
            if n not in replies or replies[n].has_error()
        }
        if failed:
            raise FederationError(f"federated Cox, phase {phase}: sites failed: {failed}")
        by_name = {}
        for node, reply in replies.items():
            pid = reply.content["metrics"].get("partition-id")
            name = names.get(node, f"node-{node}")
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
    write_survival_report(model, evaluations, run_dir, covariates=COVARIATES, bin_width=bin_width)
    return run_dir / "metrics.json"


def _evaluation(reply: Message) -> SiteEvaluation:
    m = reply.content["metrics"]
    counts = PairCounts(*(int(m[k.replace("_", "-")]) for k in PAIR_FIELDS))
    tables = {
        g: reply.content[ARRAYS][g.replace(" ", "-")].numpy().astype(np.int64) for g in GROUPS
    }
    return SiteEvaluation(int(m["patients"]), int(m["events"]), counts, tables)


def simulate_clinical_survival(
    table: Path,
    out_dir: Path,
    *,
    min_events: int = 10,
    bin_width: float = 1.0,
    echo: bool = False,
) -> tuple[Path, dict]:
    """Federated Cox on Flower's simulation engine, the tissue source sites of a TCGA table as
    hospitals: virtual site K reads only OUT/clinical/site-K.csv, the rows of its own tissue
    source site(s) (sites with < `min_events` events merged, `tcga.group_sites`).

    Returns metrics.json (with lifelines' fit on the pooled rows added as the check: whoever
    runs a simulation holds all rows) and the table's summary.
    """
    import pandas as pd

    from hmgdm_core.atomic import write_csv, write_json
    from hmgdm_core.config import load_config
    from hmgdm_core.downstream.fedsurvival import lifelines_check
    from hmgdm_core.downstream.tcga import group_sites, read_tcga_survival, site_arrays
    from hmgdm_core.exceptions import HmgdmError
    from server.superlink import run_simulation

    out_dir = Path(out_dir).resolve()
    cases, summary = read_tcga_survival(table)
    groups = group_sites(cases["site"], cases["event"], min_events)
    names = sorted(groups.unique())
    group_of_tss = groups.groupby(cases["site"].to_numpy()).first()
    raw = pd.read_csv(table, dtype={"site": str, "case_id": str})
    site_of_row = raw["site"].map(group_of_tss)  # NaN: a source site with no complete case
    for k, name in enumerate(names):
        write_csv(out_dir / "clinical" / f"site-{k}.csv", raw[site_of_row == name])
    sites = len(names)
    cfg = load_config(None, {"federation.min_sites": sites, "federation.min_replies": sites})
    run_dir = run_simulation(None, out_dir, sites=sites, cfg=cfg, echo=echo, run_config={
        "mode": "survival-clinical", "km-bin-width": bin_width,
        "sim-clinical-dir": str(out_dir / "clinical"), "sim-site-names": ",".join(names),
    })  # fmt: skip
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise HmgdmError(f"federated survival run did not finish; see {out_dir / 'run.log'}")
    metrics = json.loads(path.read_text())
    params = np.array(list(metrics["coefficients"].values()))
    metrics |= lifelines_check(site_arrays(cases, groups), COVARIATES, params)
    write_json(path, metrics, private=False)
    return path, summary

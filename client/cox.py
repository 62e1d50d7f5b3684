"""The ClientApp's `query.cox` handler: federated Cox on this site's own clinical table.

Phases (config `phase`): `moments` (row count, covariate sums and sums of squares), `newton`
(log partial likelihood, gradient and Hessian at the server's coefficients, over this site's
risk sets only), `evaluate` (concordance pair counts and binned life tables of the final
model). Every reply is a sum or a count whose size depends on the covariates and time bins,
never on the number of patients.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.records import COX_ARRAYS as ARRAYS
from client.records import pack_arrays, unpack_float64
from client.site import Site
from hmgdm_core.exceptions import LabelError

if TYPE_CHECKING:
    from hmgdm_core.downstream.fedcox import SiteRows

PHASES = ("moments", "newton", "evaluate")


def clinical_path(site: Site) -> Path:
    """This site's clinical table."""
    if site.clinical is None:
        raise LabelError(
            "this site has no clinical table: start it with "
            "`hmgdm-client join --clinical table.csv`"
        )
    return site.clinical


@functools.lru_cache(maxsize=4)
def site_rows(path: Path) -> SiteRows:
    """(covariates (n, d), time (n,), event (n,)) of the site's table, one row per patient."""
    from hmgdm_core.downstream.tcga import COVARIATES, read_tcga_survival

    table, _ = read_tcga_survival(path)
    if table.empty:
        raise LabelError(f"{path}: no patient with complete covariates, time and censorship")
    return (
        table.loc[:, list(COVARIATES)].to_numpy(float),
        table["time"].to_numpy(float),
        table["event"].to_numpy(int),
    )


def cox(msg: Message, context: Context) -> Message:
    """One phase of the federated Cox exchange on this site's own patients."""
    # Imported here, not with the module: every training message's fresh process imports this
    # module too, and lifelines/matplotlib would cost it seconds.
    from hmgdm_core.downstream.fedcox import site_cox_stats, site_moments
    from hmgdm_core.downstream.fedsurvival import GROUPS, evaluate_site

    config: ConfigRecord = msg.content["config"]
    phase = str(config["phase"])
    if phase not in PHASES:
        raise ValueError(f"unknown query.cox phase '{phase}'")
    site = Site.from_context(context)
    x, time, event = site_rows(clinical_path(site))
    metrics = MetricRecord({"patients": len(time), "events": int(event.sum())})
    if site.partition is not None:
        metrics["partition-id"] = site.partition[0]  # names the virtual site in the report
    if phase == "moments":
        m = site_moments(x)
        arrays = pack_arrays({"total": m.total, "total_sq": m.total_sq})
    elif phase == "newton":
        beta, mean, std = unpack_float64(msg.content[ARRAYS], "beta", "mean", "std")
        stats = site_cox_stats(x, time, event, beta, mean=mean, std=std, ties=str(config["ties"]))
        metrics["loglik"] = stats.loglik
        arrays = pack_arrays({"gradient": stats.gradient, "hessian": stats.hessian})
    else:
        params, center = unpack_float64(msg.content[ARRAYS], "params", "center")
        ev = evaluate_site(x, time, event, params, center, float(config["bin-width"]))
        metrics.update({k.replace("_", "-"): v for k, v in vars(ev.counts).items()})
        arrays = pack_arrays({g.replace(" ", "-"): ev.tables[g] for g in GROUPS})
    return Message(RecordDict({"metrics": metrics, ARRAYS: arrays}), reply_to=msg)

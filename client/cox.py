"""The ClientApp's `query.cox` handler: federated Cox on this site's own clinical table.

Phases (config `phase`): `moments` (row count, covariate sums and sums of squares), `newton`
(log partial likelihood, gradient and Hessian at the server's coefficients, over this site's
risk sets only), `evaluate` (concordance pair counts and binned life tables of the final
model). Every reply is a sum or a count whose size depends on the covariates and time bins,
never on the number of patients.
"""

from __future__ import annotations

import functools
import hashlib
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from client.guard import Guard, choice, finite_vector
from client.records import COX_ARRAYS as ARRAYS
from client.records import pack_arrays, unpack_float64
from client.site import Site
from hmgdm_core.exceptions import LabelError
from hmgdm_core.privacy.disclosure import DisclosureRefused, bin_count

if TYPE_CHECKING:
    from hmgdm_core.downstream.fedcox import SiteRows

PHASES = ("moments", "newton", "evaluate")
TIES = ("efron", "breslow")


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


def table_key(x: np.ndarray, time: np.ndarray, event: np.ndarray) -> str:
    """Names one version of the site's table in its release log (by content, not by path)."""
    digest = hashlib.sha256()
    for part in (x, time, event):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def cox(msg: Message, context: Context) -> Message:
    """One phase of the federated Cox exchange on this site's own patients, within the site's
    disclosure policy: no answer about fewer than `min_patients`, a bounded number of queries
    per run, life tables only on allowed time bins and risk-group splits."""
    # Imported here, not with the module: every training message's fresh process imports this
    # module too, and lifelines/matplotlib would cost it seconds.
    from hmgdm_core.downstream.fedcox import site_cox_stats, site_moments
    from hmgdm_core.downstream.fedsurvival import evaluate_site

    config: ConfigRecord = msg.content["config"]
    phase = choice(config.get("phase"), PHASES, "query.cox phase")
    site = Site.from_context(context)
    x, time, event = site_rows(clinical_path(site))
    guard = site.guard(context.run_id)
    guard.patients(len(time), "this site's clinical table")
    guard.query(f"cox-{phase}", guard.policy.max_newton_steps if phase == "newton" else None)
    metrics = MetricRecord({"patients": len(time), "events": int(event.sum())})
    if site.partition is not None:
        metrics["partition-id"] = site.partition[0]  # names the virtual site in the report
    d = x.shape[1]
    if phase == "moments":
        m = site_moments(x)
        arrays = pack_arrays({"total": m.total, "total_sq": m.total_sq})
    elif phase == "newton":
        beta, mean, std = unpack_float64(msg.content[ARRAYS], "beta", "mean", "std")
        stats = site_cox_stats(
            x,
            time,
            event,
            finite_vector(beta, "beta", d),
            mean=finite_vector(mean, "mean", d),
            std=finite_vector(std, "std", d, positive=True),
            ties=choice(config.get("ties"), TIES, "ties"),
        )
        metrics["loglik"] = stats.loglik
        arrays = pack_arrays({"gradient": stats.gradient, "hessian": stats.hessian})
    else:
        params, center = unpack_float64(msg.content[ARRAYS], "params", "center")
        params, center = finite_vector(params, "params", d), finite_vector(center, "center", d)
        width = _life_table_width(guard, config.get("bin-width"), (x, time, event), params, center)
        ev = evaluate_site(x, time, event, params, center, width)
        metrics.update({k.replace("_", "-"): v for k, v in vars(ev.counts).items()})
        metrics["life-tables"] = int(bool(ev.tables))
        arrays = pack_arrays({g.replace(" ", "-"): t for g, t in ev.tables.items()})
    return Message(RecordDict({"metrics": metrics, ARRAYS: arrays}), reply_to=msg)


def _life_table_width(
    guard: Guard, width: object, rows: SiteRows, params: np.ndarray, center: np.ndarray
) -> float | None:
    """The bin width to release life tables at, or None to withhold them (the reason stays in
    the site's log; the server sees `life-tables = 0`). Checked before any table is built."""
    from hmgdm_core.downstream.concordance import linear_risk

    x, time, event = rows
    try:
        if isinstance(width, bool) or not isinstance(width, int | float):
            raise DisclosureRefused("the time-bin width is not a number")
        bin_count(float(width), float(time.max()), guard.policy)
        high = linear_risk(x, params, center) > 0
        guard.log.release_split(table_key(x, time, event), high, guard.policy)
    except DisclosureRefused as err:
        log(WARNING, "query.cox: life tables withheld: %s", err)
        return None
    return float(width)

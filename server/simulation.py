"""Runs of this app on Flower's simulation engine: a local simulation SuperLink with virtual
sites, one run submitted, stopped on return (`simulate`, `finetune`, `survival-clinical`, studies).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from client.flower_env import free_port
from client.records import SimulatedSites
from hmgdm_core.config import HmgdmConfig, load_config, load_disclosure, load_local_dp
from server.flwr_cli import submit_run
from server.run_config import submission
from server.summary import check_run, print_run_summary
from server.superlink import start_superlink


def sim_config(config: Path | None, sites: int, overrides: dict | None = None) -> HmgdmConfig:
    """The config file (or defaults) with every one of the `sites` virtual sites required."""
    return load_config(config, {
        "federation.min_sites": sites, "federation.min_replies": sites, **(overrides or {}),
    })  # fmt: skip


def run_simulation(
    out_dir: Path,
    *,
    sites: int,
    cfg: HmgdmConfig,
    sim: SimulatedSites,
    echo: bool = False,
    backend: dict | None = None,
    **fields: Any,
) -> Path:
    """One run of this app on Flower's simulation engine with `sites` virtual sites that read
    `sim` (their state in OUT/sites unless it says otherwise), the run mode's own `fields`
    (see server.run_config); a local simulation SuperLink, stopped on return.

    Returns the run directory; the log is OUT/run.log.
    """
    out_dir = Path(out_dir).resolve()
    run_dir = out_dir / "run"
    link = start_superlink(
        port=free_port(), state_dir=out_dir / "superlink", tls=None,
        flwr_home=out_dir / "flwr_home", node_auth=False, log_path=out_dir / "superlink.log",
        sim_sites=sites, sim_backend=backend,
    )  # fmt: skip
    try:
        if "state_dir" not in sim.model_fields_set:
            sim = sim.model_copy(update={"state_dir": out_dir / "sites"})
        config = submission(cfg, sim=sim, run_dir=run_dir, **fields)
        run = submit_run(link.flwr_home, config, out_dir)
        with open(out_dir / "run.log", "w") as log:
            for line in run.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
        run.wait()
    finally:
        link.stop()
    return run_dir


def simulate(
    graphs_dir: Path,
    out_dir: Path,
    *,
    sites: int = 3,
    config: Path | None = None,
    overrides: dict | None = None,
    echo: bool = False,
    backend: dict | None = None,
    summary: bool = True,
    faults: str = "",
) -> Path:
    """Federated pretraining of `sites` simulated hospitals over partitions of one graph cache.

    Runs the same ServerApp/ClientApp as a deployment on Flower's simulation engine (a local
    simulation SuperLink, stopped on return). A cache with `site-K/` sub-caches gives virtual
    site K its own graphs; otherwise sites split the slides round-robin. `backend` sets what
    each virtual site gets from Ray (see `write_flower_config`); Ray joins the cluster named by
    `RAY_ADDRESS` when set. `faults` ("1:liar,2:nan") makes those virtual sites send corrupted
    updates (client/faults.py), to exercise validation. Returns the path of `final.pt`.
    """
    out_dir = Path(out_dir).resolve()
    cfg = sim_config(config, sites, overrides)
    # Every virtual site takes the simulation config's [local_dp] and [disclosure] as its own.
    sim = SimulatedSites(
        graphs_dir=Path(graphs_dir).resolve(), faults=faults,
        local_dp=load_local_dp(config, overrides),
        disclosure=load_disclosure(config, overrides),
    )  # fmt: skip
    run_dir = run_simulation(out_dir, sites=sites, cfg=cfg, sim=sim, echo=echo, backend=backend)
    if summary:
        print_run_summary(run_dir)
    check_run(run_dir, "pretrain", out_dir / "run.log")
    return run_dir / "final.pt"


def simulate_downstream(
    graphs_dir: Path,
    labels: Path,
    checkpoint: Path,
    out_dir: Path,
    *,
    task: str,
    sites: int = 3,
    config: Path | None = None,
    overrides: dict | None = None,
    id_column: str = "slide_id",
    patient_column: str = "patient_id",
    echo: bool = False,
) -> Path:
    """Federated fine-tuning + evaluation with `sites` simulated hospitals, each using the rows
    of `labels` for its own slides. Returns the metrics JSON (per-site and pooled figures)."""
    from hmgdm_core.downstream.labels import read_labels
    from server.downstream import RESULT_NAME

    out_dir = Path(out_dir).resolve()
    cfg = sim_config(config, sites, overrides)
    # The consortium agrees on the class list up front; here it is read off the one file.
    lab = read_labels(labels, None, n_folds=2, task=task, id_column=id_column,
                      patient_column=patient_column)  # fmt: skip
    classes = sorted(set(lab.table["label"])) if task == "classification" else []
    sim = SimulatedSites(
        graphs_dir=Path(graphs_dir).resolve(), labels=Path(labels).resolve(),
        labels_id_column=id_column, labels_patient_column=patient_column,
        disclosure=load_disclosure(config, overrides),
    )  # fmt: skip
    run_dir = run_simulation(
        out_dir, sites=sites, cfg=cfg, sim=sim, echo=echo, mode="downstream",
        checkpoint=Path(checkpoint).resolve(), task=task, classes=classes,
    )  # fmt: skip
    check_run(run_dir, "downstream", out_dir / "run.log")
    return run_dir / RESULT_NAME


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
    import numpy as np
    import pandas as pd

    from hmgdm_core.atomic import write_csv, write_json
    from hmgdm_core.downstream.fedsurvival import lifelines_check
    from hmgdm_core.downstream.tcga import COVARIATES, group_sites, read_tcga_survival, site_arrays

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
    cfg = sim_config(None, sites)
    sim = SimulatedSites(clinical_dir=out_dir / "clinical", names=tuple(names))
    run_dir = run_simulation(
        out_dir, sites=sites, cfg=cfg, sim=sim, echo=echo, mode="survival-clinical",
        km_bin_width=bin_width,
    )  # fmt: skip
    check_run(run_dir, "survival-clinical", out_dir / "run.log")
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    params = np.array(list(metrics["coefficients"].values()))
    metrics |= lifelines_check(site_arrays(cases, groups), COVARIATES, params)
    write_json(path, metrics, private=False)
    return path, summary

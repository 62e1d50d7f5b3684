"""Running a study: enumerate the grid, prepare each (sites, partition, seed) data split once,
run every cell not yet finished (pretrain, then the shared linear probe / Cox protocol), and
collect `results.csv`. A cell is finished when its `result.json` exists (written atomically
last), so an interrupted study continues where it stopped and a rerun does no work.

Federated cells need Flower, which this package never imports: the caller passes `federate`,
a function that runs the simulation and returns the final checkpoint (server.commands_study).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch_geometric.data import Data

from hmgdm_core.atomic import load_torch, save_torch, write_csv, write_json
from hmgdm_core.config import HmgdmConfig, load_config, stored_config
from hmgdm_core.downstream.classify import ProbeCV
from hmgdm_core.exceptions import CheckpointError, ConfigError
from hmgdm_core.studies import cohort as cohorts
from hmgdm_core.studies import encoders
from hmgdm_core.studies.config import DP_REGIMES, FEDERATED, PartitionSpec, Regime, StudyConfig

# graphs_dir (site-K/ sub-caches), work_dir, sites, config overrides, Ray backend -> final.pt
Federate = Callable[[Path, Path, int, dict, dict], Path]
RESULT = "result.json"
COLUMNS = (
    "cohort", "sites", "partition", "regime", "noise", "seed", "epsilon", "delta", "accuracy",
    "accuracy_worst", "macro_f1", "cindex", "cindex_worst", "seconds", "bytes_sent",
    "site_accuracy", "cell",
)  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One point of the grid, run for one seed."""

    sites: int
    partition: PartitionSpec
    regime: Regime
    noise: float | None
    seed: int

    @property
    def key(self) -> str:
        if self.sites == 0:  # survival: the real tissue source sites
            return f"tss-{self.regime}-seed{self.seed}"
        noise = f"-z{self.noise:g}" if self.noise is not None else ""
        return f"s{self.sites}-{self.partition.name}-{self.regime}{noise}-seed{self.seed}"

    @property
    def data_key(self) -> str:
        return f"s{self.sites}-{self.partition.name}-seed{self.seed}"


def cells(cfg: StudyConfig) -> list[Cell]:
    """Every cell of the grid, grouped so cells sharing one data split run back to back."""
    if cfg.cohort.kind == "tcga":  # real sites: tissue source sites, no partitioner, no noise
        tss = PartitionSpec(kind="iid")
        return [Cell(0, tss, r, None, s) for s in cfg.seeds for r in cfg.regimes]
    out = []
    for sites in cfg.sites:
        for part in cfg.partitions:
            for seed in cfg.seeds:
                for regime in cfg.regimes:
                    for noise in cfg.noise if regime in DP_REGIMES else [None]:
                        out.append(Cell(sites, part, regime, noise, seed))
    return out


@dataclass
class Split:
    """A cohort's graphs dealt to sites (items whose image gave no graph are left out)."""

    graphs: list[Data]
    labels: np.ndarray
    groups: np.ndarray
    site: np.ndarray

    def of_site(self, k: int) -> list[Data]:
        return [g for g, s in zip(self.graphs, self.site, strict=True) if s == k]


@dataclass
class StudyRun:
    """What `run_study` did: cells computed now, cells already finished, the result table."""

    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: pd.DataFrame | None = None


def run_study(
    cfg: StudyConfig,
    out: Path,
    *,
    federate: Federate | None = None,
    data: Path | None = None,
    console: Console | None = None,
) -> StudyRun:
    """Run every unfinished cell of `cfg` into OUT/cells/<cell>/, then write OUT/results.csv."""
    out = Path(out)
    console = console or Console(stderr=True)
    _check_same_protocol(cfg, out / "study.json")
    write_json(out / "study.json", cfg.model_dump(mode="json"), private=False)
    grid, run = cells(cfg), StudyRun()
    prepared: dict[str, Split] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("study", total=len(grid))
        for cell in grid:
            cell_dir = out / "cells" / cell.key
            bar.update(task, description=cell.key)
            if (cell_dir / RESULT).is_file():
                run.skipped.append(cell.key)
                bar.advance(task)
                continue
            start = time.perf_counter()
            if cfg.cohort.kind == "tcga":
                row = _survival_cell(cfg, cell, data)
            else:
                if cell.data_key not in prepared:
                    prepared = {cell.data_key: _prepare(cfg, cell, out, data)}
                row = _image_cell(cfg, cell, prepared[cell.data_key], out, cell_dir, federate)
            row |= {"seconds": time.perf_counter() - start, "cell": cell.key}
            write_json(cell_dir / RESULT, row, private=False)
            run.computed.append(cell.key)
            bar.advance(task)
    run.results = collect(out, grid)
    write_csv(out / "results.csv", run.results, private=False)
    return run


# What finished cells were computed with: a rerun may add sites, partitions, regimes, noise
# levels or seeds to the grid, never change these under the cells already done.
_PROTOCOL = ("cohort", "training", "probe")


def _check_same_protocol(cfg: StudyConfig, previous: Path) -> None:
    if not previous.is_file():
        return
    old, new = json.loads(previous.read_text()), cfg.model_dump(mode="json")
    # Keys renamed since (hmgdm_core.config.RENAMED) compare under their new names.
    old["probe"] = stored_config(old.get("probe", {}), "evaluation")
    # Studies written before [probe] repeats existed probed one fold assignment.
    old["probe"].setdefault("repeats", 1)
    if graph := old.get("cohort", {}).get("graph"):
        old["cohort"]["graph"] = stored_config(graph, "graph")
    # [cohort] mpp was never read (each cohort knows its images' resolution) and is gone.
    old.get("cohort", {}).pop("mpp", None)
    changed = [k for k in _PROTOCOL if old.get(k) != new[k]]
    if changed:
        raise ConfigError(
            f"{previous.parent}: finished cells used a different [{'], ['.join(changed)}]; "
            "keep the original values or choose a new --out"
        )


def collect(out: Path, grid: list[Cell]) -> pd.DataFrame:
    """One row per finished cell, in grid order."""
    rows = []
    for cell in grid:
        path = Path(out) / "cells" / cell.key / RESULT
        if path.is_file():
            row = json.loads(path.read_text())
            row["site_accuracy"] = json.dumps(row.get("site_accuracy") or [])
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _base_row(cfg: StudyConfig, cell: Cell) -> dict:
    return {
        "cohort": cfg.cohort.kind, "sites": cell.sites, "partition": cell.partition.name,
        "regime": cell.regime, "noise": cell.noise, "seed": cell.seed, "epsilon": None,
        "delta": None, "bytes_sent": 0,
    }  # fmt: skip


def _prepare(cfg: StudyConfig, cell: Cell, out: Path, data: Path | None) -> Split:
    """Deal the cohort to sites, stain each site's images, build graphs (cached on disk)."""
    cache = out / "data" / cell.data_key / "split.pt"
    if cache.is_file():
        with contextlib.suppress(CheckpointError):  # an older cache format is rebuilt
            blob = load_torch(cache)
            arrays = (np.asarray(blob[k]) for k in ("labels", "groups", "site"))
            return Split([Data(**g) for g in blob["graphs"]], *arrays)
    c = cfg.cohort
    cohort = (
        cohorts.synthetic(c.per_class) if c.kind == "synthetic" else cohorts.lc25000(c.images, data)
    )
    try:
        site = cell.partition.assign(cohort.labels, cell.sites, cell.seed)
    except ValueError as err:
        raise ConfigError(f"study cohort: {err}; use fewer sites or more images") from None
    graph_cfg = (c.graph or cohort.graph).model_copy(
        update={"stain_norm": cell.partition.stain_norm}
    )
    graphs = cohorts.build_graphs(
        cohort.images,
        cohort.scan_mpp,
        graph_cfg,
        sites=site,
        stain=cell.partition.stain,
        stain_model=cell.partition.stain_model,
    )
    ok = np.array([g is not None for g in graphs])
    split = Split(
        [g for g in graphs if g is not None], cohort.labels[ok], cohort.groups[ok], site[ok]
    )
    for g, group in zip(split.graphs, split.groups, strict=True):
        g.slide_id = str(group)
    save_torch(vars(split) | {"graphs": [g.to_dict() for g in split.graphs]}, cache)
    return split


def _model_config(cfg: StudyConfig, seed: int, extra: dict | None = None) -> HmgdmConfig:
    return load_config(overrides={**cfg.training.model, "train.seed": seed, **(extra or {})})


def _probe(cfg: StudyConfig, x: np.ndarray, split: Split) -> dict:
    """The shared protocol: linear probe, the same grouped folds for every cell."""
    probe = ProbeCV(cfg.probe).fit(x, split.labels, split.groups)
    pred = probe.classes_[np.argmax(probe.oof_proba_, axis=1)]
    sites = np.unique(split.site)
    per_site = [
        float(np.mean(pred[split.site == k] == split.labels[split.site == k])) for k in sites
    ]
    return {
        "accuracy": probe.metrics_["accuracy"]["mean"],
        "macro_f1": probe.metrics_["macro_f1"]["mean"],
        "accuracy_worst": min(per_site),
        "site_accuracy": per_site,
    }


def _image_cell(
    cfg: StudyConfig, cell: Cell, split: Split, out: Path, cell_dir: Path, federate: Federate | None
) -> dict:
    row, tb, seed = _base_row(cfg, cell), cfg.training, cell.seed
    mcfg = _model_config(cfg, seed)
    if cell.regime == "raw":
        return row | _probe(cfg, encoders.raw_features(split.graphs), split)
    if cell.regime == "local":
        scores = []
        for k in range(cell.sites):
            own = split.of_site(k)
            base = encoders.stage1_model(own, mcfg, tb.ae_steps, seed)
            model = encoders.hmgdm_from(base, own, mcfg, tb.diffusion_steps, seed)
            scores.append(_probe(cfg, encoders.embeddings(model, split.graphs), split))
        acc = [s["accuracy"] for s in scores]
        # Per-site spread of local-only = how well each hospital's own encoder does.
        return row | {
            "accuracy": float(np.mean(acc)), "accuracy_worst": float(np.min(acc)),
            "macro_f1": float(np.mean([s["macro_f1"] for s in scores])), "site_accuracy": acc,
        }  # fmt: skip
    if cell.regime in FEDERATED:
        if federate is None:
            raise ValueError(f"regime {cell.regime} needs a federation runner")
        return row | _federated_cell(cfg, cell, split, out, cell_dir, federate)
    base = encoders.stage1_model(split.graphs, mcfg, tb.ae_steps, seed)
    if cell.regime == "centralized":
        model = encoders.hmgdm_from(base, split.graphs, mcfg, tb.diffusion_steps, seed)
    elif cell.regime == "graphmae":
        model = encoders.graphmae_from(base, split.graphs, mcfg, tb.diffusion_steps, seed)
    else:  # random_init: stage-1 autoencoder only, the encoder never trained
        model = base
    return row | _probe(cfg, encoders.embeddings(model, split.graphs), split)


def _site_caches(split: Split, sites: int, root: Path) -> Path:
    """ROOT/site-K/graphs/<group>.pt for every site: what each virtual hospital holds."""
    from hmgdm_core.graph.cache import SlideGraphWriter, graph_path

    if (root / "complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for k in range(sites):
        own = [
            (g, grp)
            for g, grp, s in zip(split.graphs, split.groups, split.site, strict=True)
            if s == k
        ]
        for group in sorted({str(grp) for _, grp in own}):
            with SlideGraphWriter(graph_path(root / f"site-{k}", group)) as writer:
                for g, grp in own:
                    if str(grp) == group:
                        writer.add(g)
                writer.commit({"slide_id": group, "source": "study"})
    (root / "complete").touch()
    return root


def _federated_cell(
    cfg: StudyConfig, cell: Cell, split: Split, out: Path, cell_dir: Path, federate: Federate
) -> dict:
    from hmgdm_core.train import load_checkpoint

    tb = cfg.training
    overrides = {
        **cfg.training.model,
        "train.seed": cell.seed,
        "federation.seed": cell.seed,
        "federation.stage1_rounds": tb.stage1_rounds,
        "federation.stage2_rounds": tb.stage2_rounds,
        "federation.local_steps": tb.local_steps,
        "federation.eval_fraction": 0.0,
        "federation.evaluate_every": 0,
        "federation.strategy": "fedprox" if cell.regime == "fedprox" else "fedavg",
        "federation.proximal_mu": tb.proximal_mu,
        "privacy.delta": tb.delta,
        # The study's virtual sites partition the operator's own cohort: nothing to disclose.
        "disclosure.min_patients": 1,
    }
    if cell.regime == "central_dp":
        overrides |= {
            "privacy.mode": "central", "privacy.central.noise_multiplier": cell.noise,
            "privacy.central.clip_norm": tb.clip_norm,
        }  # fmt: skip
    elif cell.regime == "local_dp":
        # The virtual sites' own [local_dp]: the operator of a simulation holds every site.
        overrides |= {
            "privacy.mode": "local_dp", "local_dp.noise_multiplier": cell.noise,
            "local_dp.clip_norm": tb.clip_norm, "local_dp.delta": tb.delta,
        }  # fmt: skip
    graphs_dir = _site_caches(split, cell.sites, out / "data" / cell.data_key / "sites")
    work = cell_dir / "federation"
    shutil.rmtree(work, ignore_errors=True)  # an interrupted cell starts over
    final = federate(graphs_dir, work, cell.sites, overrides, cfg.resources.flower())
    ckpt = load_checkpoint(final)
    history = ckpt.extra["federation"]
    row = _probe(cfg, encoders.embeddings(ckpt.model, split.graphs), split)
    row["bytes_sent"] = int(sum(h.get("bytes_down", 0) + h.get("bytes_up", 0) for h in history))
    if cell.regime == "central_dp":
        row |= {"epsilon": history[-1]["central_dp"]["epsilon"], "delta": tb.delta}
    elif cell.regime == "local_dp":
        # The guarantee of the federation is that of its weakest site.
        spent = [e for h in history for e in h.get("site_epsilon", {}).values()]
        row |= {"epsilon": max(spent) if spent else None, "delta": tb.delta}
    return row


def _survival_cell(cfg: StudyConfig, cell: Cell, data: Path | None) -> dict:
    """TCGA clinical covariates, sites = tissue source sites: Cox per site, pooled, federated."""
    from lifelines.exceptions import ConvergenceError

    from hmgdm_core.downstream.concordance import cindex
    from hmgdm_core.downstream.fedcox import FederatedCox
    from hmgdm_core.downstream.splits import patient_folds
    from hmgdm_core.downstream.survival import CoxProbe
    from hmgdm_core.downstream.tcga import COVARIATES, group_sites, read_tcga_survival, site_arrays

    c = cfg.cohort
    table, _ = read_tcga_survival(
        cohorts.data_root(data) / "tcga_survival" / f"tcga_{c.tcga_cohort}_survival.csv"
    )
    table["fed_site"] = group_sites(table["site"], table["event"], c.min_events)
    x = table[list(COVARIATES)].to_numpy(float)
    t, e = table["time"].to_numpy(float), table["event"].to_numpy(int)
    names = sorted(table["fed_site"].unique())
    folds = patient_folds(e, table["case_id"].to_numpy(), cfg.probe.folds, cfg.probe.seed)
    per_fold = []
    for train, test in folds:
        tr = table.iloc[train]

        def score(risk_fn, test=test) -> float:
            return cindex(t[test], risk_fn(x[test]), e[test])

        if cell.regime == "centralized":
            fit = CoxProbe(penalizer=cfg.probe.penalizer, pca_components=None)
            per_fold.append([score(fit.fit(x[train], t[train], e[train]).predict_risk)])
        elif cell.regime == "fedavg":
            fed = FederatedCox(penalizer=cfg.probe.penalizer).fit(site_arrays(tr, tr["fed_site"]))
            per_fold.append([score(fed.predict_risk)])
        else:
            scores = []
            for name in names:
                rows = train[tr["fed_site"].to_numpy() == name]
                try:
                    fit = CoxProbe(penalizer=cfg.probe.penalizer, pca_components=None)
                    scores.append(score(fit.fit(x[rows], t[rows], e[rows]).predict_risk))
                except (ConvergenceError, ValueError, np.linalg.LinAlgError):
                    scores.append(float("nan"))  # a site too small for a Cox fit of its own
            per_fold.append(scores)
    by_site = np.nanmean(np.array(per_fold, dtype=float), axis=0)
    return _base_row(cfg, cell) | {
        "sites": len(names), "partition": "tissue-source-site",
        "cindex": float(np.nanmean(by_site)), "cindex_worst": float(np.nanmin(by_site)),
    }  # fmt: skip

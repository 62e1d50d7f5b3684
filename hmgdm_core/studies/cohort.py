"""A study's image cohort (seeded synthetic or real LC25000 lung) and its region graphs, built
per simulated site after that site's stain shift, in worker processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data

from hmgdm_core.config import GraphConfig
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.studies.partition import shift_site

REPO = Path(__file__).resolve().parents[2]


def data_root(explicit: Path | None = None) -> Path:
    """The shared real-data folder: `explicit`, else $HMGDM_DATA, else ../shared/data."""
    return Path(explicit or os.environ.get("HMGDM_DATA") or REPO.parent / "shared" / "data")


@dataclass(frozen=True)
class Cohort:
    """Images (arrays or file paths), integer labels, the group (patient) of each image."""

    images: list
    labels: np.ndarray
    groups: np.ndarray
    classes: tuple[str, ...]
    scan_mpp: float  # µm/px of the images
    graph: GraphConfig  # how its images become entity graphs unless a study says otherwise


# Tissue images: plain SLIC entities of 64 µm².
TISSUE_GRAPHS = GraphConfig(
    target_mpp=1.0, entity_area_um2=64.0, window_size=16, edge_windows=False
)


def synthetic(per_class: int, seed: int = 1) -> Cohort:
    """The probe benchmark's spatial-arrangement cohort; every image is its own patient."""
    from hmgdm_core.studies.synthetic import CLASSES, GRAPHS, synthetic_cohort

    images, labels = synthetic_cohort(per_class, seed=seed)
    return Cohort(images, labels, np.arange(len(labels)), CLASSES, 1.0, GRAPHS)


def lc25000_subset(table: pd.DataFrame, images: int, seed: int = 0) -> pd.DataFrame:
    """About `images` rows, the same share per class, in whole groups (augmented copies of one
    original never straddle a fold), seeded."""
    rng, picked = np.random.default_rng(seed), []
    for _, rows in table.groupby("label"):
        groups = rows.group_id.unique()
        rng.shuffle(groups)
        cum = np.cumsum(rows.groupby("group_id").size()[groups].to_numpy())
        chosen = groups[: int(np.searchsorted(cum, images // table.label.nunique())) + 1]
        picked.append(rows[rows.group_id.isin(chosen)])
    return pd.concat(picked)


def lc25000(images: int, data: Path | None = None) -> Cohort:
    """A seeded subset of the real LC25000 lung images (3 classes, groups = `group_id`)."""
    root = data_root(data) / "lc25000_lung"
    if not (root / "labels.csv").is_file():
        raise ConfigError(f"{root}/labels.csv not found; set HMGDM_DATA or pass --data")
    keep = lc25000_subset(pd.read_csv(root / "labels.csv"), images)
    codes = keep.label.astype("category")
    return Cohort(
        [str(root / p) for p in keep.path],
        codes.cat.codes.to_numpy().astype(np.int64),
        keep.group_id.to_numpy(),
        tuple(codes.cat.categories),
        1.0,
        TISSUE_GRAPHS,
    )


def _graph(args: tuple) -> Data | None:
    from hmgdm_core.graph.region import region_graph
    from hmgdm_core.io.slides import rescale
    from hmgdm_core.stain import estimate

    image, scan_mpp, cfg, site, stain, stain_model = args
    if isinstance(image, str):
        from PIL import Image

        image = np.asarray(Image.open(image).convert("RGB"))
    image = rescale(shift_site(image, site, stain, stain_model), scan_mpp, cfg.target_mpp)
    basis = None if cfg.stain_norm == "none" else estimate(cfg.stain_norm, image)
    if cfg.stain_norm != "none" and basis is None:
        # build-graphs refuses such a slide; the study drops the image like a too-small one
        # (e.g. an LC25000 image whose blue channel is saturated: no pixel absorbs in all three).
        return None
    return region_graph(image, array_mpp=cfg.target_mpp, cfg=cfg, stain=basis)


def _init_worker() -> None:
    torch.set_num_threads(1)


def build_graphs(
    images: list,
    scan_mpp: float,
    cfg: GraphConfig,
    *,
    sites: np.ndarray | None = None,
    stain: float = 0.0,
    stain_model: str = "hed",
    workers: int = 2,
) -> list[Data | None]:
    """One region graph per image (sampled at `scan_mpp`, built at `cfg.target_mpp` as
    build-graphs builds a plain image), image i stained as site `sites[i]` under `stain_model`
    (partition.STAIN_MODELS); None when too small, or when `cfg.stain_norm` cannot estimate
    its stains."""
    sites = np.zeros(len(images), dtype=np.int64) if sites is None else sites
    jobs = [
        (im, scan_mpp, cfg, int(s), stain, stain_model) for im, s in zip(images, sites, strict=True)
    ]
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        return list(pool.map(_graph, jobs, chunksize=8))

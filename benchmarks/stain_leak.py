"""Stain benchmark: how much of a per-site stain shift does Macenko normalisation
(graph.stain_norm = "macenko") remove from the raw entity descriptors?

Real tissue: LC25000 lung images dealt IID to 3 simulated hospitals (so the site says nothing
about the class), each hospital's images stained with the studies' per-site H&E shift
(`studies.partition.stain_shift`, strength 0.3). The leak is the accuracy of a linear probe
(patient-grouped folds) predicting the *site* from mean-pooled raw descriptors: chance 1/3
without a shift. Compared: no shift, shift, shift + Macenko; the class accuracy is printed too.
Also the synthetic study cohort (flat-colour cells) without any shift, where per-image Macenko
estimates depend on the arrangement: its class accuracy with and without normalising.

    .venv/bin/python benchmarks/stain_leak.py [--images 60] [--seeds 3]

ratio = the site accuracy's excess over chance with the shift / with shift + Macenko (2 =
normalising halves the leak); target 2. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmgdm_core.downstream.classify import ProbeCV
from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.studies import cohort as cohorts
from hmgdm_core.studies.encoders import raw_features
from hmgdm_core.studies.partition import iid_partition

SITES, STRENGTH = 3, 0.3
PROBE = EvalConfig(folds=3)


def raw(cohort, site: np.ndarray | None, stain: float, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled raw descriptors of the images kept, and which were kept (images Macenko
    cannot estimate stains for are dropped, as a study drops them)."""
    cfg = cohort.graph.model_copy(update={"stain_norm": norm})
    graphs = cohorts.build_graphs(cohort.images, cohort.scan_mpp, cfg, sites=site, stain=stain)
    ok = np.array([g is not None for g in graphs])
    return raw_features([g for g in graphs if g is not None]), ok


def accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    return float(ProbeCV(PROBE).fit(x, y, groups).metrics_["accuracy"]["mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    tissue = cohorts.lc25000(args.images)
    conditions = {"no_shift": (0.0, "none"), "shift": (STRENGTH, "none")}
    conditions["shift_macenko"] = (STRENGTH, "macenko")
    runs = {name: [] for name in conditions}
    for seed in range(args.seeds):
        site = iid_partition(len(tissue.labels), SITES, seed)
        for name, (stain, norm) in conditions.items():
            x, ok = raw(tissue, site, stain, norm)
            groups = tissue.groups[ok]
            runs[name].append(
                (accuracy(x, site[ok], groups), accuracy(x, tissue.labels[ok], groups))
            )
            print(
                f"seed {seed} {name:14s} site {runs[name][-1][0]:.3f} class {runs[name][-1][1]:.3f}"
            )
    synthetic = cohorts.synthetic(12)
    artefact = {}
    for norm in ("none", "macenko"):
        x, ok = raw(synthetic, None, 0.0, norm)
        artefact[norm] = accuracy(x, synthetic.labels[ok], synthetic.groups[ok])
    print(f"synthetic cohort, no shift: class accuracy {artefact}")
    figures = {
        f"{name}_{what}": [round(float(f(np.array(r)[:, k])), 3) for f in (np.mean, np.std)]
        for name, r in runs.items()
        for k, what in enumerate(("site", "class"))
    }
    chance = 1 / SITES
    excess = {n: float(np.mean(np.array(r)[:, 0])) - chance for n, r in runs.items()}
    ratio = excess["shift"] / max(excess["shift_macenko"], 1e-3)
    print(json.dumps({
        "benchmark": "stain_leak", "ratio": round(ratio, 2), "target": 2, "met": ratio >= 2,
        "images": len(tissue.labels), "seeds": args.seeds, **figures,
        "synthetic_class_accuracy_none": round(artefact["none"], 3),
        "synthetic_class_accuracy_macenko": round(artefact["macenko"], 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()

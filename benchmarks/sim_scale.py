"""Simulation scale: 10 vs 100 simulated hospitals, 2 rounds of a small model, on one machine.

Each virtual site holds its own small graph cache (site-K/); the federation runs on Flower's
simulation engine (Ray) with one CPU per virtual site and Ray limited to this machine's cores,
so Ray keeps a fixed pool of workers whatever the number of sites. Prints the wall time of each
round and the peak memory (summed PSS, shared pages counted once) of the whole process tree:
this process, the SuperLink, SuperExec, the simulation process and every Ray process.
Target: memory grows sub-linearly in sites (100 sites use less than 10x the memory of 10).
Usage: python benchmarks/sim_scale.py [--sites 10 100]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # random region graphs, shared with the tests

from region_graphs import random_region_graph  # noqa: E402

from hmgdm_core.atomic import load_torch  # noqa: E402
from hmgdm_core.graph.cache import SlideGraphWriter, graph_path  # noqa: E402
from server.simulation import simulate  # noqa: E402

GRAPHS_PER_SITE = 4
SMALL_MODEL = {
    "model.hidden": 16, "model.encoder_layers": 2, "model.heads": 2, "model.ae_hidden": 16,
    "model.window_channels": 4, "model.latent_dim": 4, "model.edge_latent_dim": 2,
    "model.self_attn_layers": 1, "diffusion.timesteps": 50, "train.max_nodes": 40,
    "train.batch_size": 4,
    "federation.stage1_rounds": 1, "federation.stage2_rounds": 1, "federation.local_steps": 1,
    "federation.eval_fraction": 0.0, "federation.evaluate_every": 0,
}  # fmt: skip


def write_sites(root: Path, sites: int) -> Path:
    """ROOT/site-K/graphs/*.pt: GRAPHS_PER_SITE random 40-node region graphs per site."""
    for k in range(sites):
        with SlideGraphWriter(graph_path(root / f"site-{k}", f"site{k}")) as writer:
            for i in range(GRAPHS_PER_SITE):
                writer.add(random_region_graph(40, seed=k * 1000 + i, edge_windows=False))
            writer.commit({"slide_id": f"site{k}", "source": "sim_scale"})
    return root


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(sites: int, work: Path) -> dict:
    graphs = write_sites(work / "graphs", sites)
    backend = {
        "client-resources": {"num-cpus": 1, "num-gpus": 0.0},
        "init-args": {"num-cpus": os.cpu_count() or 1},
    }
    start = time.perf_counter()
    with PeakMemory() as mem:
        final = simulate(
            graphs, work / "run", sites=sites, overrides={**SMALL_MODEL,
            "federation.min_sites": sites, "federation.min_replies": sites,
            # One slide a virtual site: the operator's own synthetic data, nothing to disclose.
            "disclosure.min_patients": 1},
            backend=backend, summary=False,
        )  # fmt: skip

    history = load_torch(final)["extra"]["federation"]
    return {
        "sites": sites,
        "round_seconds": [round(h["seconds"], 2) for h in history],
        "replied": [len(h["replied"]) for h in history],
        "total_seconds": round(time.perf_counter() - start, 1),
        "peak_gib": round(mem.peak / 2**30, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs=2, default=[10, 100])
    args = parser.parse_args(argv)
    # Ray reserves 30% of RAM for its object store by default; model updates here are small.
    os.environ.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", "0.05")
    few, many = args.sites
    with tempfile.TemporaryDirectory(prefix="sim_scale_") as tmp:
        small = run(few, Path(tmp) / str(few))
        large = run(many, Path(tmp) / str(many))
    for r in (small, large):
        print(
            f"{r['sites']:4d} sites: rounds {r['round_seconds']} s "
            f"({r['round_seconds'][-1] / r['sites']:.2f} s per site in the last round), "
            f"all replied {r['replied']}, total {r['total_seconds']} s, "
            f"peak memory {r['peak_gib']} GiB"
        )
    ratio = large["peak_gib"] / small["peak_gib"]
    growth = many / few
    print(f"memory x{ratio:.2f} for x{growth:.0f} sites")
    result = {
        "benchmark": "sim_scale",
        "sites": [few, many],
        "round_seconds": [small["round_seconds"], large["round_seconds"]],
        "peak_gib": [small["peak_gib"], large["peak_gib"]],
        "memory_ratio": round(ratio, 3),
        "sites_ratio": growth,
        "target": f"memory ratio < sites ratio ({growth:g}): sub-linear; all sites reply",
        "met": bool(ratio < growth and large["replied"] == [many] * len(large["replied"])),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

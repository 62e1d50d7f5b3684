"""This site as every ClientApp handler sees it: where its graphs, labels and private
checkpoints are (`Site`, from the SuperNode's node config or a simulation partition) and the
handler prologue that turns a message into this site's model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Message
from torch_geometric.data import Data

from client.privacy import PATIENTS_KEY
from client.records import FROZEN, SHARED, load_into
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.exceptions import GraphDataError


@dataclass(frozen=True)
class Site:
    """Where this site's graphs and its private checkpoints are (from the SuperNode's config)."""

    graphs_dir: Path
    state_dir: Path
    partition: tuple[int, int] | None = None  # (id, count) when simulating sites from one cache
    patients_csv: Path | None = None  # slide_id,patient_id: the privacy unit of local DP

    @classmethod
    def from_context(cls, context: Context) -> Site:
        node, run = context.node_config, context.run_config
        if "graphs-dir" in node:
            patients = node.get(PATIENTS_KEY)
            return cls(
                Path(str(node["graphs-dir"])),
                Path(str(node["state-dir"])),
                patients_csv=Path(str(patients)) if patients else None,
            )
        # Simulation: virtual SuperNodes get partition ids, the graphs come from the run config.
        if not run.get("sim-graphs-dir"):
            raise GraphDataError(
                "this SuperNode has no 'graphs-dir' in its node config; start it with "
                "`hmgdm-client join --graphs DIR`"
            )
        pid, n = int(node["partition-id"]), int(node["num-partitions"])
        state = Path(str(run.get("sim-state-dir") or "sim_sites")) / f"site-{pid}"
        return cls(Path(str(run["sim-graphs-dir"])), state, (pid, n))

    def graphs(self) -> list[Data]:
        return _load_graphs(self.graphs_dir, self.partition)

    def split(self, fraction: float, seed: int) -> tuple[list[Data], list[Data]]:
        """(train, held-out): whole slides are held out when the site has several."""
        graphs = self.graphs()
        slides = sorted({str(g.slide_id) for g in graphs})
        gen = torch.Generator().manual_seed(seed)
        if len(slides) >= 2:
            n_eval = max(1, round(fraction * len(slides))) if fraction > 0 else 0
            held = {slides[i] for i in torch.randperm(len(slides), generator=gen)[:n_eval]}
            return (
                [g for g in graphs if str(g.slide_id) not in held],
                [g for g in graphs if str(g.slide_id) in held],
            )
        n_eval = max(1, int(fraction * len(graphs))) if fraction > 0 and len(graphs) > 1 else 0
        held_idx = set(torch.randperm(len(graphs), generator=gen)[:n_eval].tolist())
        return (
            [g for i, g in enumerate(graphs) if i not in held_idx],
            [g for i, g in enumerate(graphs) if i in held_idx],
        )

    def checkpoint(self, run_key: str) -> Path:
        return self.state_dir / f"{run_key}.pt"

    @property
    def ledger(self) -> Path:
        """The site's privacy ledger: one per site, shared by all runs on the same data."""
        from hmgdm_core.privacy.ledger import LEDGER_NAME

        return self.state_dir / LEDGER_NAME


@functools.lru_cache(maxsize=4)
def _load_graphs(graphs_dir: Path, partition: tuple[int, int] | None) -> list[Data]:
    # Cached: simulation reuses its worker processes across rounds, so graphs load once.
    from hmgdm_core.graph.cache import load_graph_dir

    if partition is None:
        return load_graph_dir(graphs_dir)
    pid, n = partition
    own = Path(graphs_dir) / f"site-{pid}"
    if own.is_dir():
        # A study wrote each virtual site its own cache (label or quantity skew, stain shift).
        return load_graph_dir(own)
    graphs = load_graph_dir(graphs_dir)
    slides = sorted({str(g.slide_id) for g in graphs})
    if len(slides) >= n:
        mine = set(slides[pid::n])
        return [g for g in graphs if str(g.slide_id) in mine]
    return graphs[pid::n]


def site_model(site: Site, cfg: HmgdmConfig, msg: Message, graphs: list[Data]):
    """This site's model: its own last weights for what is not shared, the server's for the rest."""
    from hmgdm_core.data import graph_dims
    from hmgdm_core.train import build_model

    model = build_model(cfg, graph_dims(graphs))
    path = site.checkpoint(str(msg.content["config"]["run"]))
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    records = [msg.content[k] for k in (SHARED, FROZEN) if k in msg.content.array_records]
    load_into(model, *records)
    return model

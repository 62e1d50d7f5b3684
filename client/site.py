"""This site as every ClientApp handler sees it: where its graphs, labels and private
checkpoints are (`Site`, from the SuperNode's node config or a simulation partition) and the
handler prologue that turns a message into this site's model.
"""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import Context, Message
from pydantic import ConfigDict, Field
from torch_geometric.data import Data

from client.guard import Guard, run_key
from client.records import FROZEN, SHARED, SimulatedSites, load_into
from hmgdm_core.atomic import load_torch
from hmgdm_core.config import HmgdmConfig, parse_section
from hmgdm_core.data import holdout_split
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.privacy.config import LocalDP
from hmgdm_core.privacy.disclosure import LOG_NAME, DisclosureConfig, ReleaseLog
from hmgdm_core.section import Section


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Site(Section):
    """This site's settings, typed once: a deployed SuperNode's node config (written by
    `hmgdm-client join`, one kebab-case key per field), or a virtual site's share of the run
    config's `SimulatedSites` in simulation."""

    model_config = ConfigDict(
        extra="ignore", frozen=True, alias_generator=_kebab, populate_by_name=True
    )

    graphs_dir: Path | None = None  # the site's graph cache
    state_dir: Path | None = None  # private checkpoints, privacy ledger, events
    patients: Path | None = None  # slide_id,patient_id: the privacy unit of local DP
    privacy_config: Path | None = None  # the site's own TOML with its [local_dp]
    labels: Path | None = None  # labels CSV for federated fine-tuning and evaluation
    labels_id_column: str = "slide_id"
    labels_patient_column: str = "patient_id"
    clinical: Path | None = None  # clinical table (TCGA survival CSV) for federated Cox
    partition: tuple[int, int] | None = Field(None, exclude=True)  # simulation: (id, count)
    # The site's own local DP: the [local_dp] of its privacy_config file (of the simulation for
    # a virtual site); never read from a node config or anything a server sends.
    local_dp: LocalDP | None = Field(None, exclude=True)
    # What statistics about its patients may say: the [disclosure] of the same file (of the
    # simulation for a virtual site), the defaults without one; never from the server.
    disclosure: DisclosureConfig = Field(DisclosureConfig(), exclude=True)

    @classmethod
    def from_context(cls, context: Context) -> Site:
        node = context.node_config
        sim = SimulatedSites.from_run_config(context.run_config)
        # Only the simulation engine gives a node a partition id; `join` never writes one.
        if "partition-id" in node and sim is not None:
            return _simulated(sim, int(node["partition-id"]), int(node["num-partitions"]))
        return _deployed(tuple(sorted((str(k), str(v)) for k, v in node.items())))

    def node_config(self) -> dict[str, str]:
        """The SuperNode node config that gives a ClientApp this site (`hmgdm-client join`);
        what is left at its default is left out."""
        data = self.model_dump(by_alias=True, exclude_defaults=True)
        return {k: str(v) for k, v in data.items()}

    def graphs(self) -> list[Data]:
        if self.graphs_dir is None:
            raise GraphDataError(
                "this SuperNode has no 'graphs-dir' in its node config; start it with "
                "`hmgdm-client join --graphs DIR`"
            )
        return _load_graphs(self.graphs_dir, self.partition)

    def split(self, fraction: float, seed: int) -> tuple[list[Data], list[Data]]:
        """(train, held-out): whole slides are held out when the site has several."""
        return holdout_split(self.graphs(), fraction, seed)

    def checkpoint(self, key: object) -> Path:
        """The private checkpoint of the server's run `key` (checked: it names a file)."""
        return self.state / f"{run_key(key)}.pt"

    def patient_count(self, graphs: list[Data]) -> int:
        """Distinct patients behind `graphs` (by the site's table; else one per slide)."""
        from hmgdm_core.privacy.patients import read_patients

        table = read_patients(self.patients) if self.patients else {}
        return len({table.get(str(g.slide_id), str(g.slide_id)) for g in graphs})

    def guard(self, run: object) -> Guard:
        """The disclosure checks of a message of run `run`: this site's policy and release log."""
        return Guard(self.disclosure, str(run), ReleaseLog(self.state / LOG_NAME))

    @property
    def state(self) -> Path:
        """The site's private state directory (a clear error when the node config has none)."""
        if self.state_dir is None:
            raise GraphDataError(
                "this SuperNode has no 'state-dir' in its node config; start it with "
                "`hmgdm-client join --state-dir DIR`"
            )
        return self.state_dir

    @property
    def ledger(self) -> Path:
        """The site's privacy ledger: one per site, shared by all runs on the same data."""
        from hmgdm_core.privacy.ledger import LEDGER_NAME

        return self.state / LEDGER_NAME


def load_site_privacy(path: Path) -> tuple[LocalDP | None, DisclosureConfig]:
    """The [local_dp] (None when it has none: no local DP) and [disclosure] (its defaults when
    it has none) of a site's own TOML; a typo anywhere in the file is refused with its name."""
    from hmgdm_core.config import load_config, load_disclosure, load_local_dp

    load_config(path)
    return load_local_dp(path), load_disclosure(path)


@functools.lru_cache(maxsize=8)
def _deployed(node: tuple[tuple[str, str], ...]) -> Site:
    own = {k: v for k, v in node if k not in ("local-dp", "disclosure")}
    site = parse_section(Site, own, "node config")
    if (path := site.privacy_config) is None:
        return site
    local_dp, disclosure = load_site_privacy(path)
    return site.model_copy(update={"local_dp": local_dp, "disclosure": disclosure})


def _simulated(sim: SimulatedSites, pid: int, n: int) -> Site:
    return Site(
        graphs_dir=sim.graphs_dir,
        state_dir=sim.state_dir / f"site-{pid}",
        labels=sim.labels,
        labels_id_column=sim.labels_id_column,
        labels_patient_column=sim.labels_patient_column,
        clinical=sim.clinical_dir / f"site-{pid}.csv" if sim.clinical_dir else None,
        partition=(pid, n),
        local_dp=sim.local_dp,
        disclosure=sim.disclosure,
    )


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
    path = site.checkpoint(msg.content["config"].get("run"))
    if path.exists():
        model.load_state_dict(load_torch(path)["model"])
    records = [msg.content[k] for k in (SHARED, FROZEN) if k in msg.content.array_records]
    load_into(model, *records)
    return model

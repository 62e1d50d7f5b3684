"""Shared fixtures: the real data in ../shared/data (read-only) and small synthetic inputs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HMGDM_DATA", REPO.parent / "shared" / "data")).resolve()

# Config overrides for a model small enough that a test trains it in well under a second.
TINY_MODEL = {
    "model.hidden": 16,
    "model.encoder_layers": 2,
    "model.heads": 2,
    "model.ae_hidden": 16,
    "model.window_channels": 4,
    "model.latent_dim": 4,
    "model.edge_latent_dim": 2,
    "model.self_attn_layers": 1,
    "diffusion.timesteps": 50,
    "train.max_nodes": 25,
}


# Under pytest-xdist (`make test` runs two workers on two cores) each worker and every process it
# starts gets one compute thread: two workers of two threads each would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (by their `long` marker's seconds), then real-process and slow
    ones: `make test` hands tests to the two xdist workers two at a time in this order, so the
    long ones run side by side and the run does not end waiting on one started last."""

    def rank(item: pytest.Item) -> tuple[int, float]:
        if long := item.get_closest_marker("long"):
            return 0, -long.args[0]
        marks = {m.name for m in item.iter_markers()}
        return (1 if "integration" in marks else 2 if "slow" in marks else 3), 0.0

    items.sort(key=rank)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        raise FileNotFoundError(f"real test data not found at {DATA}; set HMGDM_DATA")
    return DATA


@pytest.fixture
def task_identity():
    """What Flower's app processes set before Messages are built; these tests build them here."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id = TaskIdentity._task_id = TaskIdentity._node_id = None


def cmdline(proc) -> str:
    """A psutil.Process's command line, or "" for one that just exited (a zombie until its
    parent reaps it: seen under load while a SuperNode starts its helpers)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.NoSuchProcess:  # psutil.ZombieProcess is one
        return ""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the only address tests ever use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunsCommand:
    """What an attacker puts in a checkpoint: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_malicious(path: Path, marker: Path) -> None:
    """A checkpoint-shaped pickle whose loading would create `marker`."""
    import torch

    blob = {"format": "hmgdm-checkpoint/1", "model": {}, "payload": RunsCommand(f"touch {marker}")}
    torch.save(blob, path)


def tiny_cache(root: Path, slides: int = 1) -> Path:
    """A graph cache of small random region graphs (one per slide), as build-graphs lays it out."""
    from region_graphs import random_region_graph

    from hmgdm_core.graph.cache import SlideGraphWriter, graph_path

    for i in range(slides):
        with SlideGraphWriter(graph_path(root, f"s{i}")) as writer:
            writer.add(random_region_graph(12 + i, seed=i, slide_id=f"s{i}"))
            writer.commit({"slide_id": f"s{i}", "config_hash": "x"})
    return root


def tiny_site_policy(directory: Path) -> str:
    """A site's own TOML for test cohorts of a few tiles: fewer patients than the default
    small-cell minimum of 10 (tests/client/test_disclosure.py tests the policy itself)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "site_policy.toml"
    path.write_text("[disclosure]\nmin_patients = 1\n")
    return str(path)

"""Real Flower processes on 127.0.0.1 for deployment tests; every one is stopped on teardown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DATA, free_port, tiny_site_policy

from client.commands_fed import supernode_command, write_keypair
from client.flower_env import flower_env, stop_tree
from server.certs import TlsFiles, make_certificates
from server.flwr_cli import register_site, submit_run
from server.superlink import SuperLink, start_superlink

KATHER = DATA / "kather2016_tiles"


def build_cache(out: Path, *classes: str) -> Path:
    """A graph cache from a few real Kather 2016 tiles (two sites get different classes)."""
    cmd = [str(Path(sys.executable).with_name("hmgdm-client")), "build-graphs",
           *(str(KATHER / c) for c in classes), "--out", str(out), "--mpp", "0.495",
           "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def site_caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "A": build_cache(root / "A", "01_TUMOR", "02_STROMA"),
        "B": build_cache(root / "B", "04_LYMPHO", "06_MUCOSA", "07_ADIPOSE"),
    }


@dataclass
class Federation:
    """A SuperLink with TLS and SuperNode auth, plus the SuperNodes a test starts."""

    root: Path
    tls: TlsFiles
    link: SuperLink
    port: int
    nodes: list[subprocess.Popen] = field(default_factory=list)
    node_ids: dict[str, str] = field(default_factory=dict)
    free_port = staticmethod(free_port)

    @property
    def home(self) -> Path:
        return self.link.flwr_home

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def new_key(self, name: str, register: bool = True) -> tuple[Path, Path]:
        keys = write_keypair(self.root / "keys" / name, name)
        if register:
            self.node_ids[name] = str(register_site(self.home, keys[1], name))
        return keys

    def join(self, name: str, graphs: Path, key: Path | None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("privacy_config", tiny_site_policy(self.root))  # 6-9 tiles a site
        cmd = supernode_command(
            superlink=self.address, graphs=graphs, state_dir=self.root / "sites" / name,
            root_cert=kwargs.pop("root_cert", self.tls.ca_cert), auth_key=key,
            local_port=free_port(), **kwargs,
        )  # fmt: skip
        return self.spawn(cmd, self.root / f"supernode_{name}.log")

    def submit(self, run_config: dict, timeout: float) -> str:
        """`flwr run` with `run_config` from the operator's side; its output once it ends."""
        proc = submit_run(self.home, run_config, self.root)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        return out

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, env=flower_env(), stdout=out, stderr=subprocess.STDOUT)
        self.nodes.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.nodes:
            stop_tree(proc)
        self.link.stop()


@pytest.fixture
def federation(tmp_path) -> Federation:
    tls = make_certificates(tmp_path / "tls", host="localhost")
    port = free_port()
    link = start_superlink(
        port=port, state_dir=tmp_path / "state", tls=tls, flwr_home=tmp_path / "flwr_home",
        log_path=tmp_path / "superlink.log",
    )  # fmt: skip
    fed = Federation(tmp_path, tls, link, port)
    try:
        yield fed
    finally:
        fed.stop()
        if os.environ.get("HMGDM_KEEP_TEST_LOGS"):
            shutil.copytree(tmp_path, os.environ["HMGDM_KEEP_TEST_LOGS"], dirs_exist_ok=True)


class Cleanup:
    """Processes a CLI test started; all are stopped (with their children) on teardown."""

    free_port = staticmethod(free_port)

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc


@pytest.fixture
def federation_cleanup():
    cleanup = Cleanup()
    try:
        yield cleanup
    finally:
        for proc in reversed(cleanup.procs):
            stop_tree(proc)

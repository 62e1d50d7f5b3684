"""Atomic writes: patient-derived files owner-only, reports by the umask, file and directory
fsynced. Torch files: what `save_torch` writes loads weights-only; a file that would run code
when unpickled is refused by every reader before anything in it runs."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import RunsCommand, write_malicious

from hmgdm_core.atomic import load_torch, save_torch
from hmgdm_core.downstream.finetune import load_slide_net
from hmgdm_core.exceptions import CheckpointError
from hmgdm_core.train import load_checkpoint
from server.strategy import load_last_round


def test_numpy_and_state_dicts_round_trip_as_tensors_and_plain_values(tmp_path):
    state = torch.nn.Linear(3, 2).state_dict()
    obj = {
        "model": state,
        "m_t": {"w": np.arange(4, dtype=np.float32)},
        "names": np.array(["a", "b"]),
        "loss": np.float64(0.5),
        "history": [{"round": 1, "sites": ("x", "y")}],
    }
    back = load_torch(save_torch(obj, tmp_path / "c.pt"))
    assert torch.equal(back["m_t"]["w"], torch.arange(4, dtype=torch.float32))
    assert back["names"] == ["a", "b"] and type(back["loss"]) is float
    assert back["history"] == [{"round": 1, "sites": ("x", "y")}]
    assert isinstance(back["model"], OrderedDict) and back["model"]._metadata == state._metadata


def test_an_object_that_is_no_tensor_or_plain_value_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\[0\]: a RunsCommand"):
        save_torch({"extra": [RunsCommand("true")]}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "reader",
    [
        pytest.param(lambda p: load_checkpoint(p), id="load_checkpoint"),
        pytest.param(lambda p: load_slide_net(p), id="load_slide_net"),
        pytest.param(lambda p: load_last_round(p.parent), id="load_last_round"),
        pytest.param(load_torch, id="load_torch"),
    ],
)
def test_a_malicious_pickle_is_refused_by_every_reader_and_never_runs(tmp_path, reader):
    marker = tmp_path / "pwned"
    path = tmp_path / "round_0001.pt"
    write_malicious(path, marker)
    with pytest.raises(CheckpointError) as err:
        reader(path)
    assert str(err.value).startswith(f"{path}: refused: loading it would call posix.system")
    assert "\n" not in str(err.value) and "--trust-checkpoint" in str(err.value)
    assert not marker.exists()


def test_classes_libraries_allow_list_for_torch_are_refused_too(tmp_path):
    # PyG adds its Data classes to torch's weights-only allow-list on import; a file from
    # another party must not reach their unpickling code.
    from torch_geometric.data import Data

    assert Data in torch.serialization.get_safe_globals()
    torch.save({"graph": Data(x=torch.zeros(2, 1))}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=r"would call torch_geometric\.data\.data\.Data"):
        load_torch(tmp_path / "g.pt")
    assert Data in torch.serialization.get_safe_globals()  # restored for everyone else


def test_trust_loads_a_legacy_file_and_junk_is_a_one_line_error(tmp_path):
    legacy = {"format": "x", "loss": np.float64(1.5)}  # how older versions wrote history
    torch.save(legacy, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="would call numpy"):
        load_torch(tmp_path / "old.pt")
    assert load_torch(tmp_path / "old.pt", trust=True)["loss"] == 1.5
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable checkpoint"):
        load_torch(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_torch(tmp_path / "none.pt")


def test_patient_derived_files_are_owner_only_and_reports_follow_the_umask(tmp_path):
    from region_graphs import random_region_graph

    from hmgdm_core.atomic import write_json
    from hmgdm_core.graph.cache import SlideGraphWriter, graph_path

    old = os.umask(0o027)  # a site that lets its group read reports
    try:
        private = write_json(tmp_path / "ledger.json", {"epsilon": 1.0})
        report = write_json(tmp_path / "metrics.json", {"accuracy": 0.9}, private=False)
        ckpt = save_torch({"w": torch.zeros(1)}, tmp_path / "c.pt")
        with SlideGraphWriter(graph_path(tmp_path, "s0")) as writer:
            writer.add(random_region_graph(5, seed=0))
            writer.commit({"slide_id": "s0"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (private, report, ckpt)}
    modes["s0.pt"] = graph_path(tmp_path, "s0").stat().st_mode & 0o777
    assert modes == {"ledger.json": 0o600, "metrics.json": 0o640, "c.pt": 0o600, "s0.pt": 0o600}


def test_a_write_is_fsynced_before_the_rename_and_its_directory_after(tmp_path, monkeypatch):
    import stat

    from hmgdm_core import atomic

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd)) or real_fsync(fd))
    monkeypatch.setattr(
        os, "replace", lambda a, b: renamed.append(len(synced)) or real_replace(a, b)
    )
    atomic.write_json(tmp_path / "ledger.json", {"epsilon": 2.0})
    kinds = ["dir" if stat.S_ISDIR(s.st_mode) else "file" for s in synced]
    assert kinds == ["file", "dir"] and renamed == [1]  # file, rename, then its directory
    assert synced[1].st_ino == tmp_path.stat().st_ino

"""`hmgdm-client build-graphs` as a user runs it: exit codes, summary, interruption and resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hmgdm_core.graph.cache import load_slide_graphs

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CLI = [sys.executable, "-c", "from client.cli import app; app()"]


def _config(tmp_path: Path, mpp: float = 0.5) -> Path:
    cfg = tmp_path / "graphs.toml"
    cfg.write_text(f"[graph]\ntarget_mpp = {mpp}\nentity_area_um2 = 400.0\ntile_size = 384\n")
    return cfg


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kw)


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_exit_code_and_summary(tmp_path, data_dir):
    out = tmp_path / "out"
    tiles = data_dir / "kather2016_tiles" / "02_STROMA"
    ok = _run(
        [
            "build-graphs",
            tiles,
            "--out",
            out,
            "--mpp",
            "0.495",
            "--config",
            _config(tmp_path),
            "--no-progress",
        ]
    )
    assert ok.returncode == 0, ok.stderr
    assert "build-graphs summary" in ok.stderr + ok.stdout
    assert all(r["status"] == "done" for r in _manifest(out).values())
    bad = _run(
        [
            "build-graphs",
            tiles,
            tmp_path / "nope.svs",
            "--out",
            out,
            "--mpp",
            "0.495",
            "--config",
            _config(tmp_path),
            "--no-progress",
        ]
    )
    assert bad.returncode == 1
    assert "nope.svs: no such file or directory" in bad.stderr + bad.stdout
    rows = _manifest(out)
    assert rows["nope"]["status"] == "error" and len(rows) == 4


def test_a_folder_without_images_exits_1_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = _run(["build-graphs", tmp_path / "empty", "--out", tmp_path / "o", "--no-progress"])
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 1
    assert len(lines) == 1 and "empty: no slides or images found" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_is_a_clear_error(tmp_path, data_dir):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[graph]\ntile_sise = 10\n")
    res = _run(
        ["build-graphs", data_dir / "kather2016_tiles", "--out", tmp_path / "o", "--config", cfg]
    )
    assert res.returncode == 2 and "unknown key 'graph.tile_sise'" in res.stderr + res.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_build_leaves_no_partial_graph_and_resumes(tmp_path, data_dir, sig):
    out = tmp_path / "out"
    slides = [
        data_dir / "slides" / "cmu-1-small-region.svs",
        data_dir / "slides" / "tcga-cr-7395-01a-01-ts1.svs",
    ]
    # The TCGA file records no resolution, so --mpp is given (it also overrides the SVS's own).
    args = [
        *CLI,
        "build-graphs",
        *map(str, slides),
        "--out",
        str(out),
        "--config",
        str(_config(tmp_path, mpp=1.0)),  # coarse: a few seconds per slide is plenty here
        "--mpp",
        "0.5",
        "--no-progress",
    ]
    # A runner that started us in the background (nohup, `cmd &`) ignores SIGINT, and an ignored
    # signal is inherited: restore the default so the CLI sees Ctrl-C as a user would send it.
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = out / "graphs" / "cmu-1-small-region.pt"
    deadline = time.monotonic() + 120

    # Interrupt while the second slide's archive is being written (its temp file exists).
    def writing_second() -> bool:
        return first.exists() and any((out / "graphs").glob(".tcga*.tmp"))

    while not writing_second() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "build finished before it could be interrupted"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun to resume" in err
    assert [p.name for p in (out / "graphs").glob("*.pt")] == [first.name]
    load_slide_graphs(first)  # the finished slide is intact
    again = _run(args[len(CLI) :])
    assert again.returncode == 0, again.stderr
    rows = _manifest(out)
    assert {r["status"] for r in rows.values()} == {"done"}
    assert not list((out / "graphs").glob(".*.tmp"))
    assert "skipped" in again.stderr + again.stdout

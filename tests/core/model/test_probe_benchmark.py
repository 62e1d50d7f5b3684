"""CI version of benchmarks/probe.py: the pipeline runs end to end and learns above chance."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[3] / "benchmarks" / "probe.py"


@pytest.mark.slow
def test_quick_probe_runs_and_the_synthetic_task_is_learnable(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("probe_benchmark", PROBE)
    probe = importlib.util.module_from_spec(spec)
    # Registered so worker processes can unpickle the benchmark's graph-building function.
    monkeypatch.setitem(sys.modules, "probe_benchmark", probe)
    spec.loader.exec_module(probe)
    result = probe.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    for key in ("hmgdm", "random_twin", "stage1_twin", "graphmae", "raw", "random_latents"):
        assert 0.0 <= result[f"synthetic_{key}"] <= 1.0
        assert result[f"synthetic_{key}_std"] >= 0.0  # every figure comes with its spread
    assert isinstance(result["synthetic_met"], bool) and result["met"] == result["synthetic_met"]
    # 3 balanced classes: chance is 1/3; the pretrained encoder must clearly beat it.
    assert result["synthetic_hmgdm"] > result["chance"] + 0.15
    # ...while pooled descriptors, blind to the graph, cannot (36 images: loose bound).
    assert result["synthetic_raw"] < result["chance"] + 0.2

"""A consortium checkpoint that would run code when unpickled: every hmgdm-client command that
loads one refuses it in one line, exits non-zero, and the code never runs (real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_cache, write_malicious

CLIENT = str(Path(sys.executable).with_name("hmgdm-client"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tiny_cache(tmp_path_factory.mktemp("cache"))


@pytest.mark.integration
@pytest.mark.parametrize(
    "command",
    [
        ["embed", "--graphs", "{cache}", "--out", "{out}/emb.csv"],
        ["explain", "s0", "--graphs", "{cache}", "--out", "{out}/s0.png"],
    ],
    ids=["embed", "explain"],
)
def test_a_malicious_checkpoint_is_refused_and_its_code_never_runs(cache, tmp_path, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "final.pt"
    write_malicious(evil, marker)
    args = [a.format(cache=cache, out=tmp_path) for a in command] + ["--checkpoint", str(evil)]
    res = subprocess.run([CLIENT, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert lines == [f"error {evil}: refused: loading it would call posix.system, not only read "
                     "tensors (a file from another party can run code this way); pass "
                     "--trust-checkpoint only for a legacy file you wrote yourself"]  # fmt: skip
    assert "Traceback" not in res.stderr
    assert not marker.exists()

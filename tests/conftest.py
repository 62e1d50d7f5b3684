"""Shared fixtures: the real data in ../shared/data (read-only) and small synthetic inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HMGDM_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        raise FileNotFoundError(f"real test data not found at {DATA}; set HMGDM_DATA")
    return DATA

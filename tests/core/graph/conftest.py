"""Real tiles shared by the superpixel, feature, edge and region-graph tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def kather_tile(data_dir) -> np.ndarray:
    """A real colorectal tumour tile, (150, 150, 3) uint8 at 0.495 µm/px."""
    path = sorted((data_dir / "kather2016_tiles" / "01_TUMOR").glob("*.tif"))[0]
    return np.asarray(Image.open(path).convert("RGB"))

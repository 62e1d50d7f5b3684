"""Atomic file writes: a temp file beside the target, then os.replace (never half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# Only for type hints: the ClientApp imports this module, and every import adds to each round.
if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then move the result onto `path`; on any error nothing changes."""
    # The temp file lives in the target directory so os.replace never crosses filesystems.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path | str, data: Any) -> Path:
    """Write `data` as indented JSON (NaN becomes null so other tools can read it)."""
    text = json.dumps(_nan_to_none(data), indent=2, sort_keys=True)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def save_torch(obj: Any, path: Path | str) -> Path:
    """`torch.save` a checkpoint."""
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


def write_csv(path: Path | str, frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV without its index."""
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))


def save_figure(path: Path | str, fig: Figure, dpi: int = 150) -> Path:
    """Save a matplotlib figure (format from the suffix of `path`)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format=fmt))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return _nan_to_none(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value

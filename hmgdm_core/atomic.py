"""Atomic, durable file writes (a temp file beside the target, fsynced, then os.replace and a
directory fsync: never half a file, never an older one after a power loss), owner-only unless
asked otherwise; and the torch file format: tensors and plain values, read without running code.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hmgdm_core.exceptions import CheckpointError

# Only for type hints: the ClientApp imports this module, and every import adds to each round.
if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def atomic_write(path: Path | str, write: Callable[[Path], None], *, private: bool = True) -> Path:
    """Call `write(tmp_path)`, then move the result onto `path`; on any error nothing changes.

    `private` (the default, for anything derived from patients: graphs, checkpoints, ledgers,
    embeddings): mode 0600. `private=False` for reports a person opens (metrics, plots): the
    mode the umask gives a new file.
    """
    # The temp file lives in the target directory so os.replace never crosses filesystems.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)  # mkstemp makes it 0600
    try:
        write(Path(tmp))
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)  # the rename itself survives a power loss only once its directory is
    return path


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o077)  # read it by setting it (the stricter value, should a thread race)
    os.umask(mask)
    return mask


def write_json(path: Path | str, data: Any, *, private: bool = True) -> Path:
    """Write `data` as indented JSON (NaN becomes null so other tools can read it)."""
    text = json.dumps(_nan_to_none(data), indent=2, sort_keys=True)
    return atomic_write(path, lambda p: p.write_text(text + "\n"), private=private)


def save_torch(obj: Any, path: Path | str) -> Path:
    """`torch.save` tensors and plain values (str, int, float, bool, None, lists, tuples, dicts)
    so that `load_torch` reads the file back with torch's weights-only unpickler.

    numpy arrays become tensors (or lists when not numeric) and numpy scalars Python numbers;
    any other object is a TypeError naming where it sits, before anything is written.
    """
    import torch

    obj = _weights_only(obj, "checkpoint")
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: Path | str, *, trust: bool = False) -> Any:
    """A file written by `save_torch`, loaded without running code from it.

    Only tensors and plain values load: a file that names any other Python callable (a
    pickle that would run a command when loaded) is refused with a one-line CheckpointError
    before anything in it runs. `trust=True` (`--trust-checkpoint`) loads a legacy file with
    full unpickling; only for a file you wrote yourself.
    """
    import torch

    if trust:
        return _torch_load(path, weights_only=False)
    # Libraries add classes to torch's weights-only allow-list on import (PyG adds its graph
    # types); a file from another party gets only torch's own audited list.
    extra = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return _torch_load(path, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(extra)


def _torch_load(path: Path | str, *, weights_only: bool) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as err:
        if found := re.search(r"GLOBAL ([\w.]+)", str(err)):
            raise CheckpointError(
                f"{path}: refused: loading it would call {found.group(1)}, not only read "
                "tensors (a file from another party can run code this way); pass "
                "--trust-checkpoint only for a legacy file you wrote yourself"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or foreign)") from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None


def _weights_only(value: Any, where: str) -> Any:
    """`value` with numpy replaced by tensors / Python values; containers kept when unchanged
    (a state_dict's OrderedDict keeps its version metadata)."""
    import torch

    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    # Exact types: a str or int subclass (an enum) would pickle as its class and be refused.
    if type(value) in (str, bool, int, float, type(None)) or isinstance(
        value, torch.Tensor | torch.Size | torch.dtype
    ):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(value))
        return _weights_only(value.tolist(), where)
    if type(value) in (dict, OrderedDict):
        items = {k: _weights_only(v, f"{where}[{k!r}]") for k, v in value.items()}
        for k in items:
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
        if all(items[k] is value[k] for k in items):
            return value
        return type(value)(items)
    if type(value) in (list, tuple):
        items = [_weights_only(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a weights-only file")


def write_csv(path: Path | str, frame: pd.DataFrame, *, private: bool = True) -> Path:
    """Write a DataFrame as CSV without its index."""
    return atomic_write(path, lambda p: frame.to_csv(p, index=False), private=private)


def save_figure(path: Path | str, fig: Figure, dpi: int = 150, *, private: bool = True) -> Path:
    """Save a matplotlib figure (format from the suffix of `path`)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(
        path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format=fmt), private=private
    )


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

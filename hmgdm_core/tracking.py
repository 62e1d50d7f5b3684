"""Run tracking: TensorBoard event files in RUN_DIR/tensorboard, written with torch's own
`SummaryWriter` while a run goes (`tensorboard --logdir RUN_DIR` shows them; nothing is sent
anywhere, so it works on an air-gapped hospital machine as on a laptop).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"


def summary_writer(run_dir: Path) -> SummaryWriter:
    """A writer appending to RUN_DIR/tensorboard (a resumed run adds a new events file)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among `values` (booleans count as 0/1)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def add_scalars(writer: SummaryWriter, scalars: Mapping[str, Any], step: int) -> None:
    """One TensorBoard scalar per finite number in `scalars` (tag -> value) at `step`."""
    for tag, value in numeric(scalars).items():
        writer.add_scalar(tag, value, step)
    writer.flush()  # a run watched live shows each round as it ends

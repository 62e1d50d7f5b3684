"""The ServerApp: reads the run mode from the run config and runs it (pretraining rounds,
federated fine-tuning + evaluation, or federated Cox on clinical tables).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hmgdm_core.exceptions import ConfigError
from server.cox import run_clinical_survival
from server.downstream import run_downstream
from server.pretraining import run_pretraining

MODES: dict[str, Callable[[Grid, Context], object]] = {
    "pretrain": run_pretraining,
    "downstream": run_downstream,
    "survival-clinical": run_clinical_survival,
}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    mode = str(context.run_config.get("mode", "pretrain"))
    if mode not in MODES:
        raise ConfigError(f"run config 'mode' is {mode!r}; expected one of {sorted(MODES)}")
    MODES[mode](grid, context)

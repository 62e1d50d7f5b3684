"""The ServerApp: reads the run config once, runs the mode it names (pretraining rounds,
federated fine-tuning + evaluation, or federated Cox on clinical tables) and records in the
run's summary and events whether it finished or why not.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from hmgdm_core.events import EVENTS_FILE, EventLog
from hmgdm_core.exceptions import HmgdmError
from server.cox import run_clinical_survival
from server.downstream import run_downstream
from server.pretraining import run_pretraining
from server.run_config import RunConfig, parse_run_config
from server.summary import STATUS_FAILED, mark_run

Mode = Callable[[Grid, RunConfig, EventLog], object]
MODES: dict[str, Mode] = {
    "pretrain": run_pretraining,
    "downstream": run_downstream,
    "survival-clinical": run_clinical_survival,
}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the mode the run config names; its summary says whether it finished or why not."""
    run = parse_run_config(context.run_config)
    events = EventLog(run.run_dir / EVENTS_FILE, log=log)
    mark_run(run.run_dir, run.mode, "running")
    try:
        MODES[run.mode](grid, run, events)
    except Exception as err:
        # The run's own record says why it ended; Flower's log has the traceback.
        reason = str(err) if isinstance(err, HmgdmError) else f"{type(err).__name__}: {err}"
        events.emit("run_failed", level=ERROR, mode=run.mode, reason=reason)
        mark_run(run.run_dir, run.mode, STATUS_FAILED, reason)
        raise
    if run.mode != "pretrain":  # pretraining writes its own summary, rounds and all
        mark_run(run.run_dir, run.mode, "finished")

"""The environment of every Flower process hmgdm starts (SuperLink, SuperNode, SuperExec, apps):
this interpreter's console scripts, fast task polling, nothing installed or reported at run time."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def flower_env() -> dict[str, str]:
    """os.environ plus the settings a hospital deployment needs; an operator's own values win
    for the tunables, never for dependency installation."""
    env = dict(os.environ)
    # Flower starts `flower-superexec`, `flwr-clientapp` and `flwr-serverapp` by bare name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Sites and operator install the environment beforehand (air-gapped hospitals).
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Flower sends usage events to telemetry.flower.ai by default; a hospital's machines
    # should not call out to anyone the consortium did not agree on.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # SuperExec polls for new tasks every second by default; a round pays that twice per hop.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    return env

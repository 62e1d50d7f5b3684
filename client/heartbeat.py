"""The site's heartbeat file: while `join` runs, the last time the SuperLink's Fleet API answered
this site over TLS (checked against the consortium CA), for healthchecks and monitoring.

Standard library and numpy-free imports only: the container healthcheck reads it in milliseconds.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from client.flower_env import fleet_answers

HEARTBEAT_FILE = "heartbeat.json"
INTERVAL_S = 30.0


def write_heartbeat(path: Path, superlink: str, error: str | None, last_ok: float | None) -> None:
    """Replace the heartbeat file atomically (a reader never sees half of it)."""
    record = {"time": time.time(), "superlink": superlink, "ok": error is None,
              "last_ok": last_ok, "error": error}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def start_heartbeat(
    path: Path, superlink: str, root_cert: Path | None, interval: float = INTERVAL_S
) -> threading.Thread:
    """Probe the SuperLink every `interval` s in a daemon thread and record each result."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def loop() -> None:
        last_ok = None
        while True:
            error = fleet_answers(superlink, root_cert)
            if error is None:
                last_ok = time.time()
            write_heartbeat(path, superlink, error, last_ok)
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    return thread


def heartbeat_problem(path: Path, max_age: float) -> str | None:
    """None if the SuperLink answered within `max_age` s, else why the site is not healthy."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        return f"{path}: no heartbeat ({type(err).__name__}); is `hmgdm-client join` running?"
    last_ok = record.get("last_ok")
    if last_ok is None or time.time() - last_ok > max_age:
        seen = "never" if last_ok is None else f"{time.time() - last_ok:.0f} s ago"
        return f"SuperLink {record.get('superlink')} last answered {seen}: {record.get('error')}"
    return None

"""Structured run events: one logfmt line per event in the log, one JSON line in `events.jsonl`.

Operators grep the log (`event=round_end round=3`); tools read the JSON lines. Every event
names its round and, when it concerns one site, the site.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"

LogFn = Callable[[int, str], None]


def logfmt(fields: dict[str, Any]) -> str:
    """`key=value` pairs; values with spaces, quotes or '=' are JSON-quoted, floats shortened."""

    def value(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, list | tuple):
            v = ",".join(map(str, v))
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True, separators=(",", ":"))
        s = str(v)
        return json.dumps(s) if (not s or any(c in s for c in ' "=')) else s

    return " ".join(f"{k}={value(v)}" for k, v in fields.items() if v is not None)


class EventLog:
    """Emits events to a log function and, when `path` is set, appends them to a JSONL file.

    `context` fields (e.g. `site=`) are added to every event. Each JSON line is written with
    one `write` on an O_APPEND descriptor, so concurrent writers never interleave within a line.
    """

    def __init__(
        self, path: Path | None = None, *, log: LogFn | None = None, **context: Any
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._log = log or logging.getLogger("hmgdm.events").log
        self.context = context

    def emit(self, event: str, *, level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **self.context, **fields}
        self._log(level, logfmt(record))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"time": round(time.time(), 3), **record}, default=str) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return record


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a file, skipping a torn last line left by a crash mid-write."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

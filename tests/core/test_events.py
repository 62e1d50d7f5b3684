"""Structured events: logfmt lines a person can grep, JSON lines a tool can read."""

from __future__ import annotations

import json
import logging

from hmgdm_core.events import EventLog, logfmt, read_events


def test_logfmt_quotes_only_values_that_would_split_a_line():
    line = logfmt({"event": "site_failed", "round": 2, "site": "hospital a", "reason": 'x="1"',
                   "loss": 0.123456789, "sites": ["a", "b"], "skip": None})  # fmt: skip
    assert line == (
        'event=site_failed round=2 site="hospital a" reason="x=\\"1\\"" loss=0.123457 sites=a,b'
    )


def test_events_go_to_the_log_and_to_json_lines_with_context(tmp_path):
    seen: list[tuple[int, str]] = []
    log = EventLog(tmp_path / "run" / "events.jsonl", log=lambda lvl, msg: seen.append((lvl, msg)),
                   site="A")  # fmt: skip
    log.emit("round_end", round=1, loss=0.5)
    log.emit("site_failed", level=logging.WARNING, round=2, reason="timeout")
    with open(tmp_path / "run" / "events.jsonl", "a") as fh:
        fh.write('{"event": "torn')  # a crash mid-line must not hide the earlier events
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert [(e["event"], e["site"], e["round"]) for e in events] == [
        ("round_end", "A", 1), ("site_failed", "A", 2),
    ]  # fmt: skip
    assert seen == [
        (logging.INFO, "event=round_end site=A round=1 loss=0.5"),
        (logging.WARNING, "event=site_failed site=A round=2 reason=timeout"),
    ]
    assert all(isinstance(e["time"], float) for e in events)
    assert json.loads(json.dumps(events)) == events

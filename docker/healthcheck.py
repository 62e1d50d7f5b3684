"""Container healthcheck: exit 0 when the service does its job, 1 (with the reason) when not.

  healthcheck.py fleet HOST:PORT CA_CERT       server: the Fleet API sites use answers over TLS
                                               checked against the consortium CA
  healthcheck.py heartbeat FILE MAX_AGE_S      site: `hmgdm-client join` heard from the SuperLink
                                               within MAX_AGE_S seconds (STATE/heartbeat.json)

Imports only the standard library and two small hmgdm modules: no torch, a few milliseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = "usage: healthcheck.py fleet HOST:PORT CA_CERT | heartbeat FILE MAX_AGE_S"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("fleet", "heartbeat"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "fleet":
        from client.flower_env import fleet_answers

        problem = fleet_answers(argv[1], Path(argv[2]), timeout=4.0)
    else:
        from client.heartbeat import heartbeat_problem

        problem = heartbeat_problem(Path(argv[1]), float(argv[2]))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

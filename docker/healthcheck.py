"""Container healthcheck: exit 0 when something accepts TCP connections on HOST:PORT.

Server image: the Fleet port sites connect to (the TLS proxy in front of the SuperLink).
Client image: the SuperNode's loopback ClientApp port (`hmgdm-client join --local-port`).
Standard library only, so it costs a few milliseconds and no torch import.
"""

from __future__ import annotations

import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: healthcheck.py HOST:PORT", file=sys.stderr)
        return 2
    host, port = argv[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return 0
    except OSError as err:
        print(f"{host}:{port} not accepting connections: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

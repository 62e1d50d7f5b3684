"""Logging set-up shared by every command: rich console handler, one line per event."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)


def setup_logging(verbose: int = 0) -> None:
    """INFO by default, DEBUG with -v; third-party chatter stays at WARNING unless -vv."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=verbose > 0)],
        force=True,
    )
    if verbose < 2:
        for noisy in ("PIL", "matplotlib", "flwr", "ray", "urllib3", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

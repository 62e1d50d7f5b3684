"""Undo the root log handler opacus installs at import (import this after opacus)."""

from __future__ import annotations

import logging

import opacus.utils.module_utils  # noqa: F401  (the module whose import calls basicConfig)

# opacus calls logging.basicConfig() at import. In Flower's ClientApp/ServerApp processes the
# root logger has no handler yet, so that handler would print every Flower log line twice.
_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
_root = logging.getLogger()
for _handler in list(_root.handlers):
    if _handler.formatter is not None and _handler.formatter._fmt == _OPACUS_FORMAT:
        _root.removeHandler(_handler)

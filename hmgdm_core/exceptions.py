"""Typed errors with messages that say what happened, to which file, and what to do."""

from __future__ import annotations

from pathlib import Path


class HmgdmError(Exception):
    """Base class: every error a user can cause by their input derives from this."""


class ConfigError(HmgdmError):
    """A config file or option is invalid (unknown key, wrong type, out of range)."""


class SlideReadError(HmgdmError):
    """A slide or image could not be read: missing, truncated, not an image, unsupported."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NoTissueError(SlideReadError):
    """A slide has no tissue at the configured thresholds, or too little for one entity."""


class GraphDataError(HmgdmError):
    """A graph cache is empty, corrupt, or holds graphs a model cannot use."""


class CheckpointError(HmgdmError):
    """A checkpoint is missing, corrupt, or was written with an incompatible config."""


class MissingDependencyError(HmgdmError):
    """An optional dependency is needed for the requested feature."""

    def __init__(self, package: str, feature: str) -> None:
        super().__init__(f"{feature} needs the '{package}' package: pip install {package}")


class LabelError(HmgdmError):
    """A labels file has rows that cannot be used (unknown slide, bad time or event, ...)."""

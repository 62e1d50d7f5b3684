"""The base of every config section: unknown keys rejected, values frozen, hashed by value."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def stable_hash(self) -> str:
        """A hash of the values (not of `repr`), stable across runs and Python versions."""
        return hash_values(self.model_dump(mode="json"))


def hash_values(values: dict) -> str:
    """16 hex digits of the sha256 of `values` as canonical JSON."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

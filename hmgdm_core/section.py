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
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

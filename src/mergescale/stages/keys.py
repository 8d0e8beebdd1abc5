"""Content keys: a short stable hash of everything a piece of work reads (settings, seeds, input identities,
the keys of the work it depends on), so a change reaches exactly the work downstream of it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def plain(x: Any) -> Any:
    """``x`` as JSON-able data (pydantic models dumped, tuples as lists, mapping keys as strings)."""
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    return x


def stage_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (pydantic models are dumped first); 16 hex digits."""
    blob = json.dumps(plain(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

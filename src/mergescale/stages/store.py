"""Cached, atomic build stages.

A stage has a name, a key (a hash of everything it reads: settings, seed, and the keys of the stages it
depends on, so a change propagates to every dependent stage and to nothing else) and output paths. It is
skipped when its record under ``DIR/.stages/`` holds the same key and every output exists. Otherwise it runs:

1. its old record is deleted first, then its old outputs (a kill from here on leaves no record, so the stage
   is redone next time, never trusted half-written);
2. it writes into temporary siblings ``.<name>.tmp-<pid>-<random>`` of its outputs
   (:class:`mergescale.io.atomic.AtomicPath`);
3. each temporary output is renamed into place;
4. the record is written (atomically), last.
Leftover temporary siblings of a killed run are removed when the stage runs again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mergescale.io.atomic import AtomicPath, remove, write_json_atomic
from mergescale.stages.keys import stage_key

__all__ = ["StageRecord", "StageStore", "remove", "stage_key", "write_json_atomic"]


class StageRecord(BaseModel):
    name: str
    key: str
    seconds: float
    finished: str
    info: dict[str, Any] = {}
    skipped: bool = False  # set on the returned copy when the cache answered (never stored)


class StageStore:
    """Records of finished stages under ``root/.stages``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / ".stages"

    def _record_path(self, name: str) -> Path:
        return self.dir / (name.replace("/", "__") + ".json")

    def record(self, name: str) -> StageRecord | None:
        path = self._record_path(name)
        if not path.is_file():
            return None
        try:
            return StageRecord.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError:  # a damaged record is no record: the stage runs again
            return None

    def done(self, name: str, key: str, outputs: Sequence[Path]) -> StageRecord | None:
        rec = self.record(name)
        if rec is None or rec.key != key or not all(p.exists() for p in outputs):
            return None
        return rec

    def run(
        self,
        name: str,
        key: str,
        outputs: Sequence[Path],
        fn: Callable[[list[Path]], dict[str, Any] | None],
    ) -> StageRecord:
        """Run ``fn(temporary_outputs)`` unless the stage is cached; returns the stage's record."""
        cached = self.done(name, key, outputs)
        if cached is not None:
            return cached.model_copy(update={"skipped": True})
        remove(self._record_path(name))
        temps = [AtomicPath(out) for out in outputs]
        for out in outputs:
            remove(out)
        start = time.perf_counter()
        try:
            info = fn([t.create() for t in temps]) or {}
        except BaseException:
            for tmp in temps:
                tmp.abort()
            raise
        for tmp in temps:
            tmp.commit()
        rec = StageRecord(
            name=name,
            key=key,
            seconds=round(time.perf_counter() - start, 3),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            info=info,
        )
        write_json_atomic(self._record_path(name), rec.model_dump(exclude={"skipped"}))
        return rec

    def all_records(self) -> dict[str, StageRecord]:
        """Every stored record, by stage name."""
        out: dict[str, StageRecord] = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                rec = StageRecord.model_validate_json(path.read_text(encoding="utf-8"))
            except ValueError:
                continue
            out[rec.name] = rec
        return out

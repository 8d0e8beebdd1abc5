"""A study's tasks by split: what the plan (:mod:`.grid`) and the results (:mod:`.results`) both ask of them.

No torch here: the report reads results without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    """A task of the suite: its split in the study (``held_in`` / ``held_out``) and its category."""

    name: str
    split: str
    category: str


class TaskSplits:
    """The held-in and held-out task names of anything holding ``tasks`` (name -> :class:`TaskInfo`)."""

    tasks: Mapping[str, TaskInfo]

    @property
    def held_in(self) -> list[str]:
        return [t.name for t in self.tasks.values() if t.split == "held_in"]

    @property
    def held_out(self) -> list[str]:
        return [t.name for t in self.tasks.values() if t.split == "held_out"]

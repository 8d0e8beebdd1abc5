"""Merging studies: a grid of merges and evaluations from one spec, resumable, on one machine or a Ray cluster.

>>> from mergescale.study import run_study, load_study
>>> run_study("examples/study-paper.yaml", "studies/paper", workers=2)      # doctest: +SKIP
>>> load_study("studies/paper").summary()[0].held_in.mean                   # doctest: +SKIP

See docs/study.md. Modules: :mod:`.spec` (the YAML), :mod:`.grid` (groups, draws, cells, keys), :mod:`.draws`
(one read per draw, merged in memory, evaluated), :mod:`.runner` (resume, executors, progress), :mod:`.store`
(SQLite), :mod:`.results` (typed records and the paper's aggregation).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunSummary", "StudyResults", "StudySpec", "load_spec", "load_study", "run_study"]

_LAZY = {
    "run_study": ("mergescale.study.runner", "run_study"),
    "RunSummary": ("mergescale.study.runner", "RunSummary"),
    "load_study": ("mergescale.study.results", "load_study"),
    "StudyResults": ("mergescale.study.results", "StudyResults"),
    "StudySpec": ("mergescale.study.spec", "StudySpec"),
    "load_spec": ("mergescale.study.spec", "load_spec"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergescale.study' has no attribute {name!r}")

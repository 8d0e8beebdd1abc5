"""Helpers of the study tests (fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHODS = [
    {"method": "linear"},
    {"method": "task_arithmetic", "lambda": [0.5, 1.0], "select": "validation"},
    {"method": "ties", "density": 0.5, "lambda": 1.0},
    {"method": "dare_ties", "density": 0.5, "lambda": 1.0},
]


def spec_dict(world_dir: Path, **changes: Any) -> dict[str, Any]:
    """A small study over the micro world: 2 groups (both base kinds of size xs), 4 methods, k in {2, 8}."""
    spec = {
        "name": "micro-study",
        "world": str(world_dir),
        "world_sizes": ["xs"],
        "methods": METHODS,
        "num_experts": [2, 8],
        "seeds": [0, 1],
        "eval": {"limit": 4, "batch_size": 8},
    }
    spec.update(changes)
    return spec


def table(study_dir: Path) -> list[tuple]:
    """The study's exported rows (every column: none varies between runs of the same work), in a fixed order."""
    from mergescale.study.results import load_study

    return sorted((tuple(sorted(row.items())) for row in load_study(study_dir).rows()), key=repr)

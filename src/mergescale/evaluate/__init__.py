"""Evaluation: task suites, fast log-likelihood / generation / perplexity scoring, the study's normalised
scores, and an lm-evaluation-harness backend. See docs/evaluation.md.

The names below are imported on first use, so reading results (``normalise``, ``results``) does not import
torch and transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CategoryResult",
    "EvalResults",
    "Evaluator",
    "GenerationRow",
    "ModelIdentity",
    "MultipleChoiceRow",
    "PerplexityRow",
    "Suite",
    "Task",
    "TaskResult",
    "evaluate",
    "load_suite",
    "load_task",
    "load_tasks",
]

_LAZY = {
    "Evaluator": "mergescale.evaluate.api",
    "evaluate": "mergescale.evaluate.api",
    "CategoryResult": "mergescale.evaluate.results",
    "EvalResults": "mergescale.evaluate.results",
    "ModelIdentity": "mergescale.evaluate.results",
    "TaskResult": "mergescale.evaluate.results",
    "GenerationRow": "mergescale.evaluate.tasks",
    "MultipleChoiceRow": "mergescale.evaluate.tasks",
    "PerplexityRow": "mergescale.evaluate.tasks",
    "Suite": "mergescale.evaluate.tasks",
    "Task": "mergescale.evaluate.tasks",
    "load_suite": "mergescale.evaluate.tasks",
    "load_task": "mergescale.evaluate.tasks",
    "load_tasks": "mergescale.evaluate.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergescale.evaluate' has no attribute {name!r}")

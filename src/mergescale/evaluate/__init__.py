"""Evaluation: task suites, fast log-likelihood / generation / perplexity scoring, the study's normalised
scores, and an lm-evaluation-harness backend. See docs/evaluation.md."""

from __future__ import annotations

from mergescale.evaluate.api import Evaluator, evaluate
from mergescale.evaluate.results import CategoryResult, EvalResults, ModelIdentity, TaskResult
from mergescale.evaluate.tasks import (
    GenerationRow,
    MultipleChoiceRow,
    PerplexityRow,
    Suite,
    Task,
    load_suite,
    load_task,
    load_tasks,
)

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

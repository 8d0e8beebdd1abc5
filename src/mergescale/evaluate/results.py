"""The results file of an evaluation (pydantic; JSON on disk) and its ``samples.jsonl`` companion.

``results.json``::

    {"mergescale_version": "0.1.0", "backend": "mergescale", "created": "...",
     "model": {"source": "folder", "path": "/abs/model", "hash": "3f2a...", "name": "model"},
     "settings": {"limit": null, "batch_size": 32, "device": "cpu", "dtype": "float32", "split": "test"},
     "tasks": {"sentiment": {"category": "sentiment_analysis", "kind": "multiple_choice",
                             "primary_metric": "acc", "metrics": {"acc": 0.71, "acc_norm": 0.69},
                             "n": 500, "seconds": 1.9, "num_fewshot": 0}},
     "categories": {"sentiment_analysis": {"score": 0.71, "tasks": ["sentiment"]}}}

A category's ``score`` is the mean of its tasks' primary metrics (the study's task → category step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from mergescale.errors import OutputError, TaskError
from mergescale.io.atomic import check_writable, write_text_atomic


class _Model(BaseModel):
    # NaN (an undefined score) and inf (ppl of a diverged model) survive the JSON round trip.
    model_config = ConfigDict(ser_json_inf_nan="constants")


class ModelIdentity(_Model):
    """Which model was evaluated: where it came from and a hash of its config and weight index."""

    source: Literal["folder", "hub", "memory"]
    path: str | None = None
    name: str | None = None
    hash: str


class TaskResult(_Model):
    """One task's scores: every metric, the example count and the seconds taken (encoding + scoring)."""

    category: str
    kind: str
    primary_metric: str
    metrics: dict[str, float]
    n: int
    seconds: float
    num_fewshot: int = 0
    split: str = "test"
    # Why every metric is NaN, when the model's log-likelihoods (or generation logits) were not finite and the
    # caller asked for an undefined score instead of an error (``on_nonfinite="undefined"``); else None.
    undefined: str | None = None


class CategoryResult(_Model):
    """Mean of the primary metric of a category's tasks."""

    score: float
    tasks: list[str]


class EvalSettings(_Model):
    limit: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    dtype: str | None = None
    split: str = "test"


class EvalResults(_Model):
    """Everything one evaluation of one model produced. ``samples`` (per-example logs) are not part of the JSON;
    :meth:`save` writes them to ``samples.jsonl`` beside it when there are any."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    mergescale_version: str
    backend: Literal["mergescale", "lm-eval"] = "mergescale"
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    model: ModelIdentity
    settings: EvalSettings = Field(default_factory=EvalSettings)
    tasks: dict[str, TaskResult]
    categories: dict[str, CategoryResult] = Field(default_factory=dict)

    _samples: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    # -- reading ---------------------------------------------------------------------------------------------
    def score(self, task_name: str, metric: str | None = None) -> float:
        """A task's score: its primary metric (the first of the task's ``metrics``) unless ``metric`` is given."""
        try:
            task = self.tasks[task_name]
        except KeyError:
            raise TaskError(
                f"no results for task {task_name!r}; available: {', '.join(sorted(self.tasks))}"
            ) from None
        name = metric or task.primary_metric
        try:
            return task.metrics[name]
        except KeyError:
            raise TaskError(
                f"task {task_name!r} has no metric {name!r}; available: {', '.join(task.metrics)}"
            ) from None

    def scores(self, metric: str | None = None) -> dict[str, float]:
        """Every task's score (primary metric unless ``metric`` is given), by task name."""
        return {name: self.score(name, metric) for name in self.tasks}

    @property
    def samples(self) -> list[dict[str, Any]]:
        """Per-example logs (``log_samples=True``): task, index, loglikelihoods, pred, gold / output, references."""
        return self._samples

    def set_samples(self, samples: Iterable[dict[str, Any]]) -> None:
        self._samples = list(samples)

    # -- files -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the results JSON atomically; with samples, also ``samples.jsonl`` in the same folder."""
        path = Path(path)
        check_results_path(path, samples=bool(self._samples))
        _atomic_write(path, self.model_dump_json(indent=2) + "\n")
        if self._samples:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self._samples)
            _atomic_write(samples_path(path), lines)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        """Read a results JSON (and its ``samples.jsonl``, if present)."""
        path = Path(path)
        try:
            results = cls.model_validate_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TaskError(f"{path}: cannot read results: {exc}") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise TaskError(f"{path}: not a mergescale results file: field '{field}': {err['msg']}") from None
        samples = samples_path(path)
        if samples.is_file():
            results._samples = [
                json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line
            ]
        return results


def check_results_path(path: str | Path, *, samples: bool = False) -> None:
    """Refuse a results path that is a folder (or whose ``samples.jsonl`` would be), or whose folder cannot be
    written, before anything is evaluated or written.

    Raises:
        OutputError: naming the path.
    """
    path = Path(path)
    for target in [path, samples_path(path)] if samples else [path]:
        if target.is_dir():
            raise OutputError(
                f"{target}: is a folder; give the results a file name (e.g. {target / 'results.json'})"
            )
    check_writable(path.absolute().parent, f"results file {path}")


def samples_path(results_path: Path) -> Path:
    """Where the per-example log of a results file goes: ``samples.jsonl`` in the same folder."""
    return results_path.with_name("samples.jsonl")


def category_means(tasks: dict[str, TaskResult]) -> dict[str, CategoryResult]:
    """Per category, the mean of its tasks' primary metrics (NaN scores are left out)."""
    by_cat: dict[str, list[str]] = {}
    for name, result in tasks.items():
        by_cat.setdefault(result.category, []).append(name)
    out: dict[str, CategoryResult] = {}
    for cat, names in sorted(by_cat.items()):
        values = [tasks[n].metrics[tasks[n].primary_metric] for n in names]
        values = [v for v in values if not math.isnan(v)]
        out[cat] = CategoryResult(score=sum(values) / len(values) if values else math.nan, tasks=names)
    return out


def _atomic_write(path: Path, text: str) -> None:
    """Write atomically (readers never see a half-written file); a refusal of the file system is an OutputError."""
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None

"""Evaluation tasks and suites: the documented YAML + JSONL format, loading and validation.

A task is a YAML file next to its data (see docs/evaluation.md)::

    name: sentiment
    category: sentiment_analysis      # used for the study's per-category means
    kind: multiple_choice             # or: generation, perplexity
    data: {train: train.jsonl, validation: validation.jsonl, test: test.jsonl}   # only test is required
    target_delimiter: " "             # between context and each choice (lm-evaluation-harness convention)
    num_fewshot: 0                    # few-shot examples drawn from train with a fixed seed
    metrics: [acc, acc_norm]          # generation: exact_match, f1, rouge_l; perplexity: loss, ppl

JSONL rows, one JSON object per line (extra fields are kept and ignored):
multiple choice ``{"context": str, "choices": [str, ...], "gold": int}``, generation
``{"prompt": str, "references": [str, ...]}``, perplexity ``{"text": str}``.

A suite (``suite.yaml``) lists task files (or folders of task files), relative to itself, as held-in or
held-out::

    name: world-v1
    held_in: [sentiment/task.yaml, topic/task.yaml]
    held_out: [nli/task.yaml]

Every error is a :class:`~mergescale.errors.TaskError` naming the file, the line and the field at fault.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mergescale.errors import TaskError

TaskKind = Literal["multiple_choice", "generation", "perplexity"]
Split = Literal["train", "validation", "test"]

# Metrics each task kind can report; the first of a task's `metrics` is its primary score.
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "generation": ("exact_match", "f1", "rouge_l"),
    "perplexity": ("loss", "ppl"),
}
# Metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER = frozenset({"loss", "ppl"})

SUITE_FILE_NAMES = ("suite.yaml", "suite.yml")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


# --------------------------------------------------------------------------------------------------------------
# Rows of the JSONL data files
# --------------------------------------------------------------------------------------------------------------


class _Row(BaseModel):
    # Extra fields are kept (a world generator may store ids or labels next to the row) and ignored.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class MultipleChoiceRow(_Row):
    """One multiple-choice example: score ``target_delimiter + choice`` given ``context`` for every choice."""

    context: str
    choices: list[str] = Field(min_length=1)
    gold: int

    @field_validator("choices")
    @classmethod
    def _choices_not_empty(cls, choices: list[str]) -> list[str]:
        for i, choice in enumerate(choices):
            if not choice:
                raise ValueError(f"choice {i} is an empty string")
        return choices

    @model_validator(mode="after")
    def _gold_in_range(self) -> MultipleChoiceRow:
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(
                f"gold {self.gold} is out of range for {len(self.choices)} choices (0..{len(self.choices) - 1})"
            )
        return self


class GenerationRow(_Row):
    """One generation example: greedy output for ``prompt``, scored against every reference (best one counts)."""

    prompt: str
    references: list[str] = Field(min_length=1)


class PerplexityRow(_Row):
    """One text whose tokens are all scored (validation loss)."""

    text: str = Field(min_length=1)


Row = MultipleChoiceRow | GenerationRow | PerplexityRow
ROW_MODELS: dict[str, type[_Row]] = {
    "multiple_choice": MultipleChoiceRow,
    "generation": GenerationRow,
    "perplexity": PerplexityRow,
}


# --------------------------------------------------------------------------------------------------------------
# Task and suite files
# --------------------------------------------------------------------------------------------------------------


class TaskData(BaseModel):
    """Data files of a task, relative to the task YAML (absolute once loaded). Only ``test`` is required."""

    model_config = ConfigDict(extra="forbid")

    train: str | None = None
    validation: str | None = None
    test: str

    def path(self, split: str) -> str | None:
        if split not in ("train", "validation", "test"):
            raise TaskError(f"unknown split {split!r}; available: train, validation, test")
        return getattr(self, split)


class GenerationSettings(BaseModel):
    """Greedy decoding settings of a generation task."""

    model_config = ConfigDict(extra="forbid")

    stop: list[str] = Field(default_factory=lambda: ["\n"])  # output is cut at the first stop sequence
    max_new_tokens: int = Field(default=32, ge=1)


class Task(BaseModel):
    """One evaluation task: what to score, on which data, reported as which metrics.

    Build it with :func:`load_task` (which resolves data paths relative to the YAML and checks every row), or
    in code with absolute data paths. Rows are read lazily and cached on the instance (:meth:`rows`).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME_PATTERN)
    category: str | None = None  # defaults to the task's name (a category of its own)
    kind: TaskKind = "multiple_choice"
    data: TaskData
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = Field(default=0, ge=0)
    fewshot_seed: int = 1234  # lm-evaluation-harness's default few-shot seed, so prompts match it
    metrics: list[str] | None = None  # default: every metric of the kind, in METRICS_BY_KIND order
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    description: str = ""  # free text for people; not part of any prompt

    _source: Path | None = PrivateAttr(default=None)
    _rows: dict[str, list[Any]] = PrivateAttr(default_factory=dict)
    _fingerprint: str | None = PrivateAttr(default=None)
    _encodings: dict[Any, Any] = PrivateAttr(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _metrics_fit_kind(cls, metrics: list[str] | None, info: ValidationInfo) -> list[str] | None:
        kind = info.data.get("kind", "multiple_choice")
        allowed = METRICS_BY_KIND[kind]
        if metrics is not None:
            if not metrics:
                raise ValueError("must list at least one metric")
            for metric in metrics:
                if metric not in allowed:
                    raise ValueError(
                        f"{metric!r} is not available for kind {kind}; available: {', '.join(allowed)}"
                    )
        return metrics

    @field_validator("num_fewshot")
    @classmethod
    def _fewshot_has_source(cls, num_fewshot: int, info: ValidationInfo) -> int:
        if num_fewshot > 0 and info.data.get("kind") == "perplexity":
            raise ValueError("must be 0 for kind perplexity")
        data = info.data.get("data")
        if num_fewshot > 0 and data is not None and data.train is None:
            raise ValueError(f"is {num_fewshot} but data has no train file to draw examples from")
        return num_fewshot

    @model_validator(mode="after")
    def _defaults(self) -> Task:
        if self.category is None:
            self.category = self.name
        if self.metrics is None:
            self.metrics = list(METRICS_BY_KIND[self.kind])
        return self

    # ----------------------------------------------------------------------------------------------------------
    @property
    def primary_metric(self) -> str:
        """The task's score: the first of its ``metrics``."""
        assert self.metrics is not None
        return self.metrics[0]

    @property
    def source(self) -> Path | None:
        """The YAML file this task was loaded from (None when built in code)."""
        return self._source

    def data_path(self, split: str = "test") -> Path | None:
        """Absolute path of a split's JSONL file, or None when the task has no such split."""
        rel = self.data.path(split)
        if rel is None:
            return None
        path = Path(rel)
        if not path.is_absolute() and self._source is not None:
            path = self._source.parent / path
        return path

    def rows(self, split: str = "test") -> list[Any]:
        """The validated rows of a split (read once, then cached on this task)."""
        if split not in self._rows:
            path = self.data_path(split)
            if path is None:
                raise TaskError(f"task {self.name!r} ({self._where()}): has no {split} data")
            self._rows[split] = read_rows(path, self.kind)
        return self._rows[split]

    def validate_data(self) -> dict[str, int]:
        """Read and check every data file of the task; return the row count of each split."""
        counts: dict[str, int] = {}
        for split in ("train", "validation", "test"):
            if self.data.path(split) is not None:
                counts[split] = len(self.rows(split))
        if self.num_fewshot and self.num_fewshot > len(self.rows("train")):
            raise TaskError(
                f"{self._where()}: field 'num_fewshot': {self.num_fewshot} examples asked for but train has only "
                f"{len(self.rows('train'))} rows"
            )
        return counts

    def fingerprint(self) -> str:
        """A hash of the task definition and the bytes of its data files (identifies cached encodings)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.model_dump_json(exclude={"data"}).encode())
            for split in ("train", "validation", "test"):
                path = self.data_path(split)
                digest.update(split.encode())
                if path is not None and path.exists():
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def encoding_cache(self) -> dict[Any, Any]:
        """Scratch space where the evaluator keeps this task's tokenised examples (keyed by tokenizer, model
        settings, split and limit), so repeated evaluations do not tokenise again."""
        return self._encodings

    def _where(self) -> str:
        return str(self._source) if self._source is not None else f"task {self.name}"


class SuiteFile(BaseModel):
    """The ``suite.yaml`` format: task files or folders, relative to the suite file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    held_in: list[str] = Field(default_factory=list)
    held_out: list[str] = Field(default_factory=list)


class Suite(BaseModel):
    """A loaded suite: held-in tasks (scored against each task's expert) and held-out tasks (against the base)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    held_in: list[Task]
    held_out: list[Task]
    source: Path | None = None

    @property
    def tasks(self) -> list[Task]:
        """Every task of the suite: held-in first, then held-out."""
        return [*self.held_in, *self.held_out]

    def split_of(self, task_name: str) -> Literal["held_in", "held_out"]:
        """Whether a task of this suite is held-in or held-out."""
        if any(t.name == task_name for t in self.held_in):
            return "held_in"
        if any(t.name == task_name for t in self.held_out):
            return "held_out"
        names = ", ".join(t.name for t in self.tasks)
        raise TaskError(f"suite {self.name!r} has no task {task_name!r}; available: {names}")

    def task(self, name: str) -> Task:
        """The task of this suite with that name."""
        for t in self.tasks:
            if t.name == name:
                return t
        names = ", ".join(t.name for t in self.tasks)
        raise TaskError(f"suite {self.name!r} has no task {name!r}; available: {names}")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_task(path: str | Path, *, check_data: bool = True) -> Task:
    """Load and validate one task YAML; with ``check_data`` also read and check every row of its data files."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must be a YAML mapping (name, kind, data, ...)")
    try:
        task = Task.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(_yaml_error(path, exc, lines)) from None
    task._source = path.resolve()
    for split in ("train", "validation", "test"):
        data_path = task.data_path(split)
        if data_path is not None and not data_path.is_file():
            line = lines.get(("data", split), lines.get(("data",), "?"))
            raise TaskError(f"{path}:{line}: field 'data.{split}': file not found: {data_path}")
    if check_data:
        task.validate_data()
    return task


def load_suite(path: str | Path, *, check_data: bool = True) -> Suite:
    """Load a ``suite.yaml`` (or a folder holding one) and every task it lists."""
    path = Path(path)
    if path.is_dir():
        path = _suite_file_in(path) or path / SUITE_FILE_NAMES[0]
    raw, lines = _read_yaml(path)
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a suite file must be a YAML mapping with held_in and held_out lists")
    try:
        spec = SuiteFile.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(_yaml_error(path, exc, lines)) from None
    groups: dict[str, list[Task]] = {"held_in": [], "held_out": []}
    for group in ("held_in", "held_out"):
        for i, entry in enumerate(getattr(spec, group)):
            target = path.parent / entry
            line = lines.get((group, i), "?")
            if not target.exists():
                raise TaskError(f"{path}:{line}: field '{group}[{i}]': no such task file or folder: {target}")
            groups[group].extend(_tasks_in(target, check_data=check_data))
    seen: dict[str, str] = {}
    for group, tasks in groups.items():
        for t in tasks:
            if t.name in seen:
                raise TaskError(f"{path}: task name {t.name!r} appears twice ({seen[t.name]} and {group})")
            seen[t.name] = group
    if not seen:
        raise TaskError(f"{path}: the suite lists no tasks (fields 'held_in' and 'held_out' are empty)")
    return Suite(
        name=spec.name or path.parent.name,
        held_in=groups["held_in"],
        held_out=groups["held_out"],
        source=path.resolve(),
    )


def load_tasks(source: str | Path | Task | Suite | Sequence[Task], *, check_data: bool = True) -> list[Task]:
    """Tasks from a task YAML, a folder of task YAMLs (searched recursively), a suite.yaml (or a folder with one),
    a :class:`Suite`, a :class:`Task` or a list of tasks. Task names must be unique."""
    if isinstance(source, Task):
        tasks = [source]
    elif isinstance(source, Suite):
        tasks = source.tasks
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise TaskError(f"{path}: no such task file, folder or suite")
        if path.is_file() and path.name in SUITE_FILE_NAMES or path.is_dir() and _suite_file_in(path):
            tasks = load_suite(path, check_data=check_data).tasks
        else:
            tasks = _tasks_in(path, check_data=check_data)
    else:
        tasks = list(source)
        for t in tasks:
            if not isinstance(t, Task):
                raise TaskError(f"expected Task objects, got {type(t).__name__}")
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskError(f"{source}: task names must be unique; repeated: {', '.join(duplicates)}")
    return tasks


def read_rows(path: Path, kind: str) -> list[Any]:
    """Read and validate a JSONL data file; errors name the file, the line and the field."""
    model = ROW_MODELS[kind]
    rows: list[Any] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read data file: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, a separator) carry no example
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        try:
            rows.append(model.model_validate(obj))
        except ValidationError as exc:
            raise TaskError(f"{path}:{number}: {_first_error(exc, kind)}") from None
    if not rows:
        raise TaskError(f"{path}: data file has no rows")
    return rows


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _suite_file_in(folder: Path) -> Path | None:
    for name in SUITE_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _tasks_in(path: Path, *, check_data: bool) -> list[Task]:
    if path.is_file():
        return [load_task(path, check_data=check_data)]
    files = sorted(
        p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.name not in SUITE_FILE_NAMES
    )
    if not files:
        raise TaskError(f"{path}: folder holds no task YAML files")
    return [load_task(p, check_data=check_data) for p in files]


class _LineLoader(yaml.SafeLoader):
    """A safe loader that also records, for every key path, the line where it appears."""


def _read_yaml(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TaskError(f"{path}{line}: invalid YAML: {problem}") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*prefix, i)
            lines[key] = item.start_mark.line + 1
            _collect_lines(item, key, lines)


def _yaml_error(path: Path, exc: ValidationError, lines: dict[tuple[Any, ...], int]) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    line = None
    for n in range(len(loc), 0, -1):  # the deepest key present in the file (a missing field: its parent)
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    where = f"{path}:{line}" if line is not None else str(path)
    field = _loc_text(loc) or "(file)"
    return f"{where}: field '{field}': {_message(err)}"


def _first_error(exc: ValidationError, kind: str) -> str:
    err = exc.errors()[0]
    field = _loc_text(tuple(err["loc"]))
    expected = ", ".join(f for f in ROW_MODELS[kind].model_fields)
    if err["type"] == "missing":
        return f"field '{field}': missing (a {kind} row needs: {expected})"
    return f"field '{field or '(row)'}': {_message(err)}"


def _loc_text(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _message(err: Any) -> str:
    msg = str(err["msg"])
    msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
    if err["type"] == "missing":
        return "missing"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    return f"{msg} (got {err['input']!r})" if err["type"] not in ("value_error",) and "input" in err else msg

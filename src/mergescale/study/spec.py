"""The study spec: what a user writes (YAML), validated once at the edge with pydantic.

```yaml
name: merging-at-scale
world: world                 # a built world: each size x {pt, it} becomes a group
# groups:                    # ... or real models: one entry per base, experts keyed by held-in task name
#   - {name: llama-8b-it, base: meta-llama/Llama-3.1-8B-Instruct, experts: {mcqa: ./experts/mcqa}, multitask: ./mt}
# tasks: ./suite.yaml        # held_in / held_out (required with groups:)
methods:
  - {method: linear}
  - {method: task_arithmetic, lambda: [0.5, 1.0], select: validation}
  - {method: ties, density: 0.2, lambda: 1.0}
num_experts: [2, 4, 6, 8]
seeds: [0, 1, 2]
eval: {limit: null, batch_size: 32, device: cpu}
```

Every error names the file and the key (``spec.yaml: methods[2].densty: unknown parameter of 'ties'; ...``).
Paths are relative to the spec file's folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergescale.errors import ConfigError
from mergescale.methods import get_method
from mergescale.methods.base import MergeMethod

Scalar = bool | int | float


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupSpec(_Strict):
    """One base model with its experts (keyed by held-in task) and, optionally, its multitask model."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str
    experts: dict[str, str]
    multitask: str | None = None
    base_kind: str | None = None  # e.g. pt / it: the paper's "pre-trained" vs "instruction-tuned" base
    size: str | None = None  # a label such as 8b; default: the base's parameter count

    @field_validator("experts")
    @classmethod
    def _some_experts(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one expert")
        return v


class EvalSpec(_Strict):
    """How every model of the study is evaluated."""

    limit: int | None = Field(None, ge=1)  # examples per task (None: the whole split)
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"
    dtype: str | None = None  # None: the merged tensors' dtype
    backend: Literal["mergescale", "lm-eval"] = "mergescale"


class HarnessTasks(_Strict):
    """lm-evaluation-harness task names (with ``eval.backend: lm-eval``); each task is its own category."""

    held_in: list[str] = Field(min_length=1)
    held_out: list[str] = Field(default_factory=list)


class MethodSpec(BaseModel):
    """A method and its parameters; a list value is a sweep (separate cells, or ``select: validation``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str
    select: Literal["cells", "validation"] = "cells"
    label: str | None = None  # how tables and figures name this entry (default: method + swept values)

    @property
    def params(self) -> dict[str, Scalar | list[Scalar]]:
        return dict(self.model_extra or {})

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    @property
    def swept(self) -> dict[str, list[Scalar]]:
        return {k: list(v) for k, v in self.params.items() if isinstance(v, list)}


class StrategySpec(_Strict):
    """An averaging strategy of the pre-training paper: SMA, EMA (with its α) or WMA."""

    strategy: Literal["sma", "ema", "wma"]
    alpha: float | None = Field(None, gt=0, lt=1)  # EMA's; default 0.2, the paper's better value

    @model_validator(mode="after")
    def _alpha(self) -> StrategySpec:
        if self.alpha is not None and self.strategy != "ema":
            raise ValueError("alpha is EMA's parameter")
        return self


class PMARunSpec(_Strict):
    """A pre-training run whose checkpoints the experiments average (with ``world:``, one per size is made)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    run: str  # the run folder: checkpoint-<step>/ (or step folders, or DCP checkpoints)
    annealed: str | None = None  # the annealed model, to measure the share of the anneal's gain recovered
    heldout: str | None = None  # held-out text: a perplexity task YAML, or a .txt / .jsonl of documents
    tasks: str | None = None  # tasks to score along the run (a suite / task YAML / folder); none by default
    data: str | None = None  # training text for PMA-init and spike recovery (.txt: one document a line)
    block_size: int = Field(64, ge=8)  # tokens per training sequence packed from ``data``


class AblationSpec(_Strict):
    """The window × interval × strategy grid at chosen end steps (each end step: one read of its checkpoints)."""

    windows: list[int] = Field(default_factory=lambda: [3, 6, 10], min_length=1)
    intervals: list[int | str | None] = Field(default_factory=lambda: [None], min_length=1)
    strategies: list[StrategySpec] = Field(
        # the paper's ablation compares EMA α = 0.1 with 0.2 (its finding on α), so both are in the default
        default_factory=lambda: [StrategySpec(strategy="sma"), StrategySpec(strategy="ema", alpha=0.1),
                                 StrategySpec(strategy="ema", alpha=0.2), StrategySpec(strategy="wma")],
        min_length=1,
    )  # fmt: skip
    # end steps: checkpoint steps, or the fractions "early" (30 %), "middle" (60 %), "late" (the last checkpoint)
    ends: list[int | Literal["early", "middle", "late"]] = Field(
        default_factory=lambda: ["early", "middle", "late"], min_length=1
    )


class PMAInitSpec(_Strict):
    """Continued training from the average vs from the last checkpoint (None fields: the world's anneal)."""

    steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    schedule: Literal["anneal", "constant", "finetune"] = "anneal"
    batch_size: int | None = Field(None, ge=1)
    window: int | None = Field(None, ge=1)  # the averaged window (default: the curves' window)


class SpikeSpec(_Strict):
    """A copy of the run trained with a deliberate loss spike, recovered from an average vs a rollback."""

    branch: float = Field(0.5, gt=0, lt=1)  # the checkpoint the copy branches from, as a fraction of the run
    factor: float = Field(100.0, gt=1)  # learning-rate multiplier during the spike
    at: int = Field(20, ge=2)  # the step (from the branch) whose loss first shows the spike
    length: int = Field(3, ge=1)
    steps: int = Field(40, ge=2)
    save_every: int = Field(4, ge=1)
    k: int = Field(3, ge=1)  # checkpoints before the spike that are averaged (the paper used 3)
    resume_steps: int = Field(20, ge=1)
    lr: float | None = Field(None, gt=0)  # default: the world's stable-phase rate
    batch_size: int | None = Field(None, ge=1)


class PMASpec(_Strict):
    """The pre-training paper's experiments (Li et al. 2025) on one or more runs."""

    runs: list[PMARunSpec] | None = None  # default with ``world:``: every size's pre-training run
    strategies: list[StrategySpec] = Field(
        default_factory=lambda: [StrategySpec(strategy="sma"), StrategySpec(strategy="ema", alpha=0.2),
                                 StrategySpec(strategy="wma")],
        min_length=1,
    )  # fmt: skip
    window: int = Field(10, ge=1)  # N of the curves along the run (the paper's default)
    interval: int | str | None = None  # V: steps (50) or tokens (2B) between averaged checkpoints
    along_run: bool = True
    ends: int | None = Field(None, ge=1)  # the curve's newest T end steps (default: every full window)
    every: int = Field(1, ge=1)  # along the run, every this many checkpoints
    ablation: AblationSpec | None = AblationSpec()
    pma_init: PMAInitSpec | None = PMAInitSpec()
    spike: SpikeSpec | None = SpikeSpec()
    heldout_limit: int | None = Field(None, ge=1)  # held-out documents scored per model (default: all)
    task_limit: int | None = Field(None, ge=1)  # examples per task along the run (with ``tasks``)
    world_tasks: Literal["held_out", "none"] = "held_out"  # with ``world:``: score the world's held-out tasks


class StudySpec(_Strict):
    """A merging study: groups × methods × number of experts × seeds, every merge evaluated."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    world: str | None = None
    groups: list[GroupSpec] | None = None
    tasks: str | HarnessTasks | None = None
    methods: list[MethodSpec] = Field(default_factory=list)
    num_experts: list[int] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval: EvalSpec = EvalSpec()
    diagnostics: bool = True  # task-vector statistics per draw (cosine, sign agreement, norms)
    world_sizes: list[str] | None = None  # with world: only these sizes (default: every size)
    world_kinds: list[str] | None = None  # with world: only these base kinds (default: pt and it)
    merging: bool = True  # with world: run the merging grid (false: the PMA experiments alone)
    pma: PMASpec | None = None  # the pre-training paper's experiments

    @field_validator("num_experts")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        for k in v:
            if k < 1:
                raise ValueError(f"every number of experts must be at least 1, got {k}")
        if len(set(v)) != len(v):
            raise ValueError("repeated values")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("repeated values")
        return v

    @property
    def has_merging(self) -> bool:
        return self.merging and (self.groups is not None or self.world is not None) and bool(self.methods)

    @model_validator(mode="after")
    def _sources(self) -> StudySpec:
        pma_alone = self.pma is not None and self.pma.runs is not None and self.world is None
        if not pma_alone and (self.world is None) == (self.groups is None):
            raise ValueError("give exactly one of 'world' (a built world) or 'groups' (models)")
        if self.merging and (self.groups is not None or self.world is not None):
            if not self.methods:
                raise ValueError("'methods' is required for merging (or set merging: false)")
            if not self.num_experts:
                raise ValueError("'num_experts' is required for merging (or set merging: false)")
        if self.groups is not None and self.tasks is None:
            raise ValueError("'tasks' (a suite.yaml with held_in / held_out) is required with 'groups'")
        if self.groups is not None:
            names = [g.name for g in self.groups]
            if len(set(names)) != len(names):
                raise ValueError(f"group names must be unique, got {names}")
        if isinstance(self.tasks, HarnessTasks) and self.eval.backend != "lm-eval":
            raise ValueError("tasks given as harness names need eval.backend: lm-eval (or a suite.yaml path)")
        if self.eval.backend == "lm-eval" and any(m.select == "validation" for m in self.methods):
            raise ValueError("select: validation needs eval.backend: mergescale (harness tasks fix their own splits)")
        return self


def _loc(err: dict[str, Any]) -> str:
    out = ""
    for part in err["loc"]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "union[", "list[", "literal[")):
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_spec(data: Any, label: str = "spec") -> StudySpec:
    """Validate a spec given as data; :class:`ConfigError` naming ``label`` and the key on failure."""
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping at the top level")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _loc(err)
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            known = list(_fields_at(parent))
            raise ConfigError(f"{label}: unknown key {where!r}{_suggest(str(err['loc'][-1]), known)}") from None
        if err["type"] == "missing":
            raise ConfigError(f"{label}: missing required key {where!r}") from None
        raise ConfigError(f"{label}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    for i, entry in enumerate(spec.methods):
        check_method_entry(entry, f"{label}: methods[{i}]")
    return spec


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key was found (for the "did you mean" hint)."""
    names = [p for p in loc if not isinstance(p, int)]
    model = {
        (): StudySpec,
        ("groups",): GroupSpec,
        ("eval",): EvalSpec,
        ("tasks", "HarnessTasks"): HarnessTasks,
        ("pma",): PMASpec,
        ("pma", "runs"): PMARunSpec,
        ("pma", "ablation"): AblationSpec,
        ("pma", "pma_init"): PMAInitSpec,
        ("pma", "spike"): SpikeSpec,
    }.get(tuple(names))
    return list(model.model_fields) if model is not None else []


def check_method_entry(entry: MethodSpec, where: str) -> None:
    """The method exists and every parameter is one of its own, with values in range (each sweep value too)."""
    try:
        method = entry.merge_method
    except ConfigError as exc:
        raise ConfigError(f"{where}.method: {exc}") from None
    specs = {s.name: s for s in (*method.model_params, *method.global_params)}
    for key, value in entry.params.items():
        spec = specs.get(key)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            raise ConfigError(
                f"{where}.{key}: unknown parameter of {method.name!r}{_suggest(key, list(specs))}; known: {known}"
            )
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"{where}.{key}: an empty list sweeps nothing")
        for v in values:
            reason = spec.check(v)
            if reason:
                raise ConfigError(f"{where}.{key}: {reason}")
    if entry.select == "validation" and not entry.swept:
        raise ConfigError(f"{where}.select: 'validation' chooses among swept values, but no parameter is a list")


def load_spec(path: str | Path) -> tuple[StudySpec, Path]:
    """Read and validate a spec file; returns the spec and the folder its relative paths start from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_spec(data, str(path)), path.parent.resolve()

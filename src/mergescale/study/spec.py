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


class StudySpec(_Strict):
    """A merging study: groups × methods × number of experts × seeds, every merge evaluated."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    world: str | None = None
    groups: list[GroupSpec] | None = None
    tasks: str | HarnessTasks | None = None
    methods: list[MethodSpec] = Field(min_length=1)
    num_experts: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval: EvalSpec = EvalSpec()
    diagnostics: bool = True  # task-vector statistics per draw (cosine, sign agreement, norms)
    world_sizes: list[str] | None = None  # with world: only these sizes (default: every size)
    world_kinds: list[str] | None = None  # with world: only these base kinds (default: pt and it)

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

    @model_validator(mode="after")
    def _sources(self) -> StudySpec:
        if (self.world is None) == (self.groups is None):
            raise ValueError("give exactly one of 'world' (a built world) or 'groups' (models)")
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
    model = {(): StudySpec, ("groups",): GroupSpec, ("eval",): EvalSpec, ("tasks", "HarnessTasks"): HarnessTasks}.get(
        tuple(names)
    )
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

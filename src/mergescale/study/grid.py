"""From a spec to the study's work: groups (models resolved and identified), draws (which experts are merged)
and cells (one merge, or one baseline model, to evaluate), each with a content key.

Order: spec → groups (``world:`` expanded into every size × base kind, or the spec's ``groups:``) → draws, one
per (k, seed) and shared by every group and method (the paper compares methods and base kinds on the same
experts) → merge cells (group × method entry × swept values × draw) and baseline cells (per group: the base, each
expert, the multitask model). A cell's key hashes everything its scores depend on: the method and its resolved
parameters, the draw, the identities (content hashes) of the models it reads, the tasks' files and the
evaluation settings. A changed spec entry or input model changes exactly the keys of the cells that read it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergescale import __version__
from mergescale.errors import ConfigError, InputModelError, TaskError
from mergescale.evaluate.loading import folder_hash
from mergescale.io.checkpoint import resolve_model_path
from mergescale.stages.keys import stage_key
from mergescale.study.spec import HarnessTasks, MethodSpec, StudySpec
from mergescale.study.task_splits import TaskInfo, TaskSplits

# Bump when what a cell computes changes in a way its inputs do not show (invalidates stored cells).
CELL_FORMAT = 1

Role = Literal["base", "expert", "multitask"]
Scalar = bool | int | float


@dataclass(frozen=True)
class ModelRef:
    """A model of the study: what the spec said, the local folder it resolved to, and its content hash."""

    ref: str
    path: str
    identity: str


@dataclass(frozen=True)
class StudyGroup:
    """One base model with its experts (by held-in task) and optional multitask model."""

    name: str
    base_kind: str | None
    size: str | None
    parameters: int | None
    base: ModelRef
    experts: dict[str, ModelRef]
    multitask: ModelRef | None = None


@dataclass(frozen=True)
class Draw:
    """The experts (held-in tasks) merged for ``k`` experts and ``seed``; shared by every group and method."""

    k: int
    seed: int
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class MergeCell:
    """One merge to evaluate: a method entry with resolved parameters over a group's experts of one draw.

    ``candidates`` holds one parameter set, or with ``select == "validation"`` every swept combination: each is
    merged, the one best on the held-in tasks' validation split is kept and its test scores are reported.
    """

    key: str
    group: str
    entry: int
    method: str
    label: str
    select: str
    candidates: tuple[dict[str, Scalar], ...]
    k: int
    seed: int
    experts: tuple[str, ...]

    @property
    def draw_id(self) -> tuple[str, int, int]:
        return (self.group, self.k, self.seed)


@dataclass(frozen=True)
class BaselineCell:
    """A model evaluated once per group: the base (every task), an expert (its own task) or the multitask model
    (every task); with ``validation`` also on the held-in validation split (to normalise selection)."""

    key: str
    group: str
    role: Role
    task: str | None
    model: ModelRef
    tasks: tuple[str, ...]
    validation: tuple[str, ...] = ()


@dataclass
class StudyPlan(TaskSplits):
    """Everything the runner executes, resolved and keyed."""

    spec: StudySpec
    spec_dir: Path
    spec_key: str
    tasks_source: str | HarnessTasks
    tasks_identity: str
    tasks: dict[str, TaskInfo]
    groups: list[StudyGroup]
    draws: list[Draw]
    cells: list[MergeCell] = field(default_factory=list)
    baselines: list[BaselineCell] = field(default_factory=list)

    def group(self, name: str) -> StudyGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------------------------
def local_path(ref: str, spec_dir: Path) -> Path:
    """A relative path from a spec: beside the spec file when it exists there, else from the working folder."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    beside = spec_dir / path
    return beside if beside.exists() or not path.exists() else path


def _model(ref: str, spec_dir: Path, where: str, identities: dict[str, str]) -> ModelRef:
    candidate = local_path(ref, spec_dir)
    try:
        folder = resolve_model_path(str(candidate) if candidate.exists() else ref)
    except InputModelError as exc:
        raise InputModelError(f"{where}: {exc}") from None
    key = str(folder.resolve())
    if key not in identities:
        if not (folder / "config.json").is_file():
            raise InputModelError(f"{where}: {folder} is not a Hugging Face model folder (no config.json)")
        identities[key] = folder_hash(folder)
    return ModelRef(ref=ref, path=key, identity=identities[key])


def _world_groups(spec: StudySpec, spec_dir: Path, identities: dict[str, str]) -> tuple[list[StudyGroup], Path]:
    from mergescale.world.layout import BASE_KINDS, WorldLayout

    assert spec.world is not None
    root = local_path(spec.world, spec_dir)
    lay = WorldLayout(root)
    if not lay.world_json.is_file() or not lay.suite.is_file():
        raise ConfigError(
            f"world: {root} is not a built world (no world.json / tasks/suite.yaml); "
            f"build it first: mergescale world build -o {root}"
        )
    world = json.loads(lay.world_json.read_text(encoding="utf-8"))
    sizes = list(world["sizes"])
    kinds = list(world.get("base_kinds", BASE_KINDS))
    for wanted, have, key in ((spec.world_sizes, sizes, "world_sizes"), (spec.world_kinds, kinds, "world_kinds")):
        unknown = sorted(set(wanted or []) - set(have))
        if unknown:
            raise ConfigError(f"{key}: {', '.join(unknown)} not in the world; it has {', '.join(have)}")
    groups = []
    for size in spec.world_sizes or sizes:
        for kind in spec.world_kinds or kinds:
            where = f"world: {size}/{kind}"
            experts = {
                task: _model(str(lay.expert(size, kind, task)), spec_dir, f"{where} expert {task}", identities)
                for task in world["tasks"]["held_in"]
            }
            groups.append(
                StudyGroup(
                    name=f"{size}-{kind}",
                    base_kind=kind,
                    size=size,
                    parameters=world["sizes"][size].get("parameters"),
                    base=_model(str(lay.base(size, kind)), spec_dir, f"{where} base", identities),
                    experts=experts,
                    multitask=_model(str(lay.multitask(size, kind)), spec_dir, f"{where} multitask", identities),
                )
            )
    return groups, lay.suite


def _spec_groups(spec: StudySpec, spec_dir: Path, identities: dict[str, str]) -> list[StudyGroup]:
    assert spec.groups is not None
    groups = []
    for i, g in enumerate(spec.groups):
        where = f"groups[{i}] ({g.name})"
        base = _model(g.base, spec_dir, f"{where}.base", identities)
        experts = {t: _model(ref, spec_dir, f"{where}.experts.{t}", identities) for t, ref in g.experts.items()}
        multitask = _model(g.multitask, spec_dir, f"{where}.multitask", identities) if g.multitask else None
        groups.append(
            StudyGroup(
                name=g.name,
                base_kind=g.base_kind,
                size=g.size,
                parameters=_parameter_count(Path(base.path)),
                base=base,
                experts=experts,
                multitask=multitask,
            )
        )
    return groups


def _parameter_count(folder: Path) -> int | None:
    """Parameters of a model folder, from its weight headers (no weights read)."""
    from mergescale.engine.plan import TIED_HEADS, tied_embeddings
    from mergescale.io.checkpoint import open_checkpoint

    try:
        source = open_checkpoint(folder)
    except InputModelError:
        return None
    try:
        tied = tied_embeddings(source.config)
        return sum(i.numel for n, i in source.info().items() if not (tied and n in TIED_HEADS))
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------------------------
def _suite_tasks(suite_path: Path) -> tuple[dict[str, TaskInfo], str]:
    from mergescale.evaluate.tasks import load_suite

    suite = load_suite(suite_path)
    tasks = {t.name: TaskInfo(t.name, "held_in", t.category or t.name) for t in suite.held_in}
    tasks |= {t.name: TaskInfo(t.name, "held_out", t.category or t.name) for t in suite.held_out}
    digest = hashlib.sha256()
    files = [suite_path.resolve()]
    for t in suite.tasks:
        if t.source is not None:
            files.append(t.source)
        files += [p for s in ("train", "validation", "test") if (p := t.data_path(s)) is not None]
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return tasks, digest.hexdigest()[:16]


def _harness_tasks(tasks: HarnessTasks) -> tuple[dict[str, TaskInfo], str]:
    out = {n: TaskInfo(n, "held_in", n) for n in tasks.held_in}
    out |= {n: TaskInfo(n, "held_out", n) for n in tasks.held_out}
    try:
        from importlib.metadata import version

        harness = version("lm_eval")
    except Exception:  # not installed: the runner says so before evaluating
        harness = "?"
    return out, stage_key("lm-eval", harness, tasks)


# ---------------------------------------------------------------------------------------------------------------
# draws and cells
# ---------------------------------------------------------------------------------------------------------------
def draw_experts(pool: list[str], k: int, seed: int) -> tuple[str, ...]:
    """The ``k`` held-in tasks whose experts are merged for ``seed``: a seeded sample of ``pool`` (in the pool's
    order), the same for every group and method, and the same whatever else the study contains."""
    if not 1 <= k <= len(pool):
        raise ConfigError(f"num_experts: {k} is out of range; the study has {len(pool)} experts per group")
    picked = set(random.Random(f"mergescale-draw:{k}:{seed}").sample(sorted(pool), k))
    return tuple(t for t in pool if t in picked)


def _label(entry: MethodSpec, values: dict[str, Scalar] | None) -> str:
    if entry.label:
        return entry.label if values is None or not entry.swept else f"{entry.label} {_fmt(values)}"
    if not entry.swept:
        return entry.method
    if values is None:
        return f"{entry.method} ({', '.join(entry.swept)}: val)"
    return f"{entry.method} {_fmt(values)}"


def _fmt(values: dict[str, Scalar]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _combinations(entry: MethodSpec) -> list[dict[str, Scalar]]:
    """Every parameter set of an entry: the product of its swept values, the others fixed."""
    fixed = {k: v for k, v in entry.params.items() if not isinstance(v, list)}
    swept = entry.swept
    return [fixed | dict(zip(swept, combo, strict=True)) for combo in itertools.product(*swept.values())]


def expand(spec: StudySpec, spec_dir: Path) -> StudyPlan:
    """Resolve every model (hashing each once), load the task suite and list draws, merges and baselines.

    Raises one-line :class:`ConfigError`, :class:`InputModelError` or :class:`TaskError` naming the key, before
    any merge: a missing model or task, an expert whose task is not a held-in task of the suite, k out of range.
    """
    identities: dict[str, str] = {}
    if spec.world is not None:
        groups, suite_path = _world_groups(spec, spec_dir, identities)
        tasks_source: str | HarnessTasks = str(suite_path)
    else:
        assert spec.tasks is not None
        if isinstance(spec.tasks, HarnessTasks):
            tasks_source = spec.tasks
        else:
            path = local_path(spec.tasks, spec_dir)
            if not path.exists():
                raise TaskError(f"tasks: {path} does not exist")
            tasks_source = str(path)
        groups = _spec_groups(spec, spec_dir, identities)
    tasks, tasks_identity = (
        _harness_tasks(tasks_source) if isinstance(tasks_source, HarnessTasks) else _suite_tasks(Path(tasks_source))
    )
    held_in = [t.name for t in tasks.values() if t.split == "held_in"]
    for g in groups:
        for task in g.experts:
            if task not in held_in:
                raise ConfigError(
                    f"group {g.name!r}: expert {task!r} is not a held-in task of the suite; held-in: {', '.join(held_in)}"
                )
    # draws come from the held-in tasks every group has an expert for
    pool = [t for t in held_in if all(t in g.experts for g in groups)]
    draws = [Draw(k, seed, draw_experts(pool, k, seed)) for k in spec.num_experts for seed in spec.seeds]
    eval_key = spec.eval.model_dump(mode="json")
    plan = StudyPlan(
        spec=spec,
        spec_dir=spec_dir,
        spec_key=stage_key("study-spec", spec),
        tasks_source=tasks_source,
        tasks_identity=tasks_identity,
        tasks=tasks,
        groups=groups,
        draws=draws,
    )
    held_out = plan.held_out
    any_selection = any(e.select == "validation" for e in spec.methods)
    for g in groups:
        validation = tuple(held_in) if any_selection else ()
        plan.baselines.append(_baseline(g, "base", None, g.base, (*held_in, *held_out), validation, plan, eval_key))
        for task, ref in g.experts.items():
            plan.baselines.append(
                _baseline(g, "expert", task, ref, (task,), (task,) if any_selection else (), plan, eval_key)
            )
        if g.multitask is not None:
            plan.baselines.append(_baseline(g, "multitask", None, g.multitask, (*held_in, *held_out), (), plan, eval_key))
        for draw in draws:
            for i, entry in enumerate(spec.methods):
                combos = _combinations(entry)
                per_cell = [combos] if entry.select == "validation" else [[c] for c in combos]
                for candidates in per_cell:
                    values = None if entry.select == "validation" else {k: candidates[0][k] for k in entry.swept}
                    key = stage_key(
                        "study-merge", CELL_FORMAT, g.name, g.base.identity,
                        [g.experts[t].identity for t in draw.tasks], entry.method, candidates, entry.select,
                        draw.k, draw.seed, draw.tasks, eval_key, plan.tasks_identity,
                    )  # fmt: skip
                    plan.cells.append(
                        MergeCell(
                            key=key,
                            group=g.name,
                            entry=i,
                            method=entry.method,
                            label=_label(entry, values),
                            select=entry.select,
                            candidates=tuple(candidates),
                            k=draw.k,
                            seed=draw.seed,
                            experts=draw.tasks,
                        )
                    )
    return plan


def _baseline(
    g: StudyGroup,
    role: Role,
    task: str | None,
    model: ModelRef,
    tasks: tuple[str, ...],
    validation: tuple[str, ...],
    plan: StudyPlan,
    eval_key: Any,
) -> BaselineCell:
    key = stage_key(
        "study-baseline", CELL_FORMAT, g.name, role, task, model.identity, tasks, validation, eval_key,
        plan.tasks_identity,
    )  # fmt: skip
    return BaselineCell(key=key, group=g.name, role=role, task=task, model=model, tasks=tasks, validation=validation)


def versions() -> dict[str, str]:
    """Versions recorded with every cell."""
    import torch
    import transformers

    return {"mergescale": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
